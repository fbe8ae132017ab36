"""Held-out evaluation of students: their responses, a pairwise judge run in both orders, win rates
with a 95% confidence interval, and held-out loss.

    evaluate_round(cfg, run_dir, k)     # what `selfinstruct run` does after round k's training
    selfinstruct eval RUN_DIR           # every trained round of a run, then its report

The held-out set is `eval.heldout` (our heldout/ tasks, or any file in a seed format): one item per
task, its first instance (instruction + input as one user message, the reference output for the
loss). Students: the base (`train.student`, prompted with its own chat template, or as plain text
without one) and each round's adapter (prompted with the chat template it was trained with).

Win rate of a candidate against a reference: the judge (`prompts/judge/pairwise.jinja`; the
teacher unless `eval.judge`) sees each item twice, the candidate's response first, then second.
Each order scores the candidate 1 (judged better), 0.5 (a tie, [[C]]) or 0. An item's score is the
mean over the orders with a parseable verdict (unparseable verdicts are counted and left out; an
item with none is left out), so a judge that always prefers the first position scores 0.5. Win
rate = mean item score; 95% CI = mean +- 1.96 * s / sqrt(n), s the sample standard deviation of
the item scores, clipped to [0, 1] (n < 2: [0, 1]). Wins / ties / losses count items scoring
above / at / below 0.5.

Held-out loss: mean cross-entropy per reference-output token (the training loss's masking), so the
base and every round are compared on the same tokens.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from selfinstruct.config import Config
from selfinstruct.errors import JudgeError, UserError
from selfinstruct.generators import Generator, Request, make_generator
from selfinstruct.generators.base import choice_mode
from selfinstruct.prompts import Prompts
from selfinstruct.records import JsonlAppender, read_jsonl, user_turn, write_atomic, write_json
from selfinstruct.roles import judge_config, student_config
from selfinstruct.seeds import load_tasks

T_JUDGE = "judge/pairwise.jinja"
T_JUDGE_REPLY = "judge/pairwise_reply.jinja"  # a chat judge's reply starts with the verdict's "[[" (prefilled)
VERDICTS = ("[[A]]", "[[B]]", "[[C]]")
TEMPLATES = {T_JUDGE: {"instruction": "Say hi.", "answer_a": "Hi.", "answer_b": "Hello."}, T_JUDGE_REPLY: {}}
Z95 = 1.959963984540054

_BRACKET = re.compile(r"\[\[\s*(a|b|c|tie)\s*\]\]")
_SOLE = re.compile(r"^\W*(?:response|answer|assistant|output)?\s*\(?([ab])\)?\W*$")
_TIE = re.compile(r"\b(tie|equally (?:good|bad|helpful)|neither is better|both (?:responses |answers )?"
                  r"(?:are )?(?:equally )?(?:good|bad|fine|correct|wrong))\b")
_BETTER = re.compile(r"\b(?:response|answer|assistant|output)?\s*\(?([ab])\)?\s+is\s+"
                     r"(?:clearly\s+|slightly\s+|much\s+)?(?:better|superior|stronger|preferred|more helpful)")
_WINNER = re.compile(r"\b(?:verdict|winner|choice|prefer(?:red)?|better(?: response)?)\s*(?:is|:)?\s*\(?"
                     r"(?:response|answer|assistant)?\s*\(?([ab])\b\)?")


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from a judge's reply; None when it says none of them clearly. The bracketed
    form wins (its last occurrence); then a bare letter, "tie"-like phrases, "A is better", "winner: B"."""
    low = re.sub(r"[*_`]", "", text.lower()).strip()
    brackets = _BRACKET.findall(low)
    if brackets:
        v = brackets[-1]
        return {"a": "A", "b": "B"}.get(v, "tie")
    for pattern in (_SOLE, _BETTER, _WINNER):
        m = pattern.search(low)
        if m:
            return m.group(1).upper()
    if _TIE.search(low):
        return "tie"
    return None


def order_score(verdict: str | None, candidate_is_a: bool) -> float | None:
    """The candidate's score in one order: 1 win, 0.5 tie, 0 loss, None unparseable."""
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    return 1.0 if (verdict == "A") == candidate_is_a else 0.0


def item_score(candidate_first: str | None, candidate_second: str | None) -> float | None:
    """Mean over both orders (`candidate_first`: the verdict when the candidate was Response A)."""
    scores = [s for s in (order_score(candidate_first, True), order_score(candidate_second, False)) if s is not None]
    return statistics.fmean(scores) if scores else None


def win_rate(scores: list[float | None]) -> dict[str, Any]:
    valid = [s for s in scores if s is not None]
    n = len(valid)
    out: dict[str, Any] = {"n": n, "unjudged": len(scores) - n,
                           "wins": sum(s > 0.5 for s in valid), "ties": sum(s == 0.5 for s in valid),
                           "losses": sum(s < 0.5 for s in valid)}
    if n == 0:
        return {**out, "win_rate": None, "ci95": None}
    mean = statistics.fmean(valid)
    if n < 2:
        return {**out, "win_rate": mean, "ci95": [0.0, 1.0]}
    half = Z95 * statistics.stdev(valid) / math.sqrt(n)
    return {**out, "win_rate": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)]}


# ---------------------------------------------------------------- running it


def heldout_items(cfg: Config) -> list[dict[str, str]]:
    try:
        tasks = load_tasks(cfg.eval.heldout)
    except UserError as e:
        raise UserError(f"held-out set (--heldout / eval.heldout): {e.problem}", e.path, e.line) from None
    if cfg.eval.max_items is not None:
        tasks = tasks[: cfg.eval.max_items]
    return [{"id": t.id, "prompt": user_turn(t.instruction, t.instances[0].input), "reference": t.instances[0].output}
            for t in tasks]


def responses(cfg: Config, adapter: str | Path | None, items: list[dict[str, str]], path: Path) -> list[str]:
    """The student's greedy responses to the held-out prompts, read from `path` when already there."""
    if path.exists():
        rows = read_jsonl(path)
        if [r["id"] for r in rows] == [i["id"] for i in items]:
            return [r["response"] for r in rows]
    teacher = make_generator(student_config(cfg, adapter))
    try:
        outs = teacher.generate([Request(i["prompt"], cfg.eval.response_sampling) for i in items])
    finally:
        teacher.close()
    texts = [o[0].text.strip() for o in outs]
    write_atomic(path, "".join(json.dumps({"id": i["id"], "prompt": i["prompt"], "response": t},
                                          ensure_ascii=False) + "\n" for i, t in zip(items, texts, strict=True)))
    return texts


def heldout_loss(cfg: Config, adapter: str | Path | None, items: list[dict[str, str]]) -> float | None:
    """Mean loss per reference-output token of the student (transformers + PEFT)."""
    import torch
    from transformers import AutoTokenizer

    from selfinstruct.masking import IGNORE, prepare_tokenizer, tokenize_conversation
    from selfinstruct.modeling import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(cfg.train.student, "auto", "auto", cfg.teacher.trust_remote_code, "student")
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
        tok = AutoTokenizer.from_pretrained(str(adapter))
    prepare_tokenizer(tok, cfg.train.chat_template)
    total, count = 0.0, 0
    with torch.inference_mode():
        for item in items:
            conv = [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["reference"]}]
            row = tokenize_conversation(tok, conv, cfg.train.max_length)
            labels = torch.tensor([row["labels"]], device=model.device)
            n = int((labels[:, 1:] != IGNORE).sum())
            if n == 0:
                continue
            loss = model(input_ids=torch.tensor([row["input_ids"]], device=model.device), labels=labels).loss
            total += float(loss) * n
            count += n
    return round(total / count, 5) if count else None


def compare(cfg: Config, judge: Generator, items: list[dict[str, str]], candidate: list[str], reference: list[str],
            label: str, out: Path) -> dict[str, Any]:
    """Judge candidate vs reference on every item in both orders; judgements appended to `out`."""
    # The verdict is a choice where the judge's backend enforces one (vLLM, transformers); elsewhere the reply
    # is prefilled with the verdict's "[[" and parsed (the choice is still asked for, a server may honour it).
    prompts = Prompts(cfg.generate.prompts_dir)
    mode = choice_mode(judge)
    prefill = None if mode == "choice" else prompts.render(T_JUDGE_REPLY)
    requests = []
    for item, c, r in zip(items, candidate, reference, strict=True):
        for a, b in ((c, r), (r, c)):
            requests.append(Request(prompts.render(T_JUDGE, instruction=item["prompt"], answer_a=a, answer_b=b),
                                    cfg.eval.judge_sampling, prefill=prefill, choices=VERDICTS))
    outs = judge.generate(requests)
    scores, rows = [], []
    for k, item in enumerate(items):
        first, second = outs[2 * k][0].text, outs[2 * k + 1][0].text
        v1, v2 = parse_verdict(first), parse_verdict(second)
        s = item_score(v1, v2)
        scores.append(s)
        rows.append({"comparison": label, "id": item["id"], "candidate_first": {"raw": first[:500], "verdict": v1},
                     "candidate_second": {"raw": second[:500], "verdict": v2}, "score": s, "verdict_mode": mode})
    with JsonlAppender(out) as f:
        f.write_many(rows)
    result = win_rate(scores)
    unparsed = sum(r[o]["verdict"] is None for r in rows for o in ("candidate_first", "candidate_second"))
    total = 2 * len(rows)
    result.update(unparsed_verdicts=unparsed, unparsed_share=round(unparsed / total, 4) if total else 0.0,
                  verdict_mode=mode)
    if total and unparsed / total > cfg.eval.max_unparsed_share:
        sample = next((r["candidate_first"]["raw"] for r in rows if r["candidate_first"]["verdict"] is None), "")
        raise JudgeError(
            f"{label}: the judge's verdict could not be read in {unparsed} of {total} verdicts "
            f"({100 * unparsed / total:.0f}%), more than eval.max_unparsed_share = {cfg.eval.max_unparsed_share}. "
            f"A reply: {sample[:200]!r}. Its raw replies are in {out}. Use a judge that follows the "
            "[[A]] / [[B]] / [[C]] format (eval.judge), give it more eval.judge_sampling.max_tokens, or raise "
            "eval.max_unparsed_share.")
    return result


def evaluate_round(cfg: Config, run_dir: Path, k: int) -> dict[str, Any]:
    """Round k's student against the base and against round k-1's; writes round-k/eval/eval.json."""
    items = heldout_items(cfg)
    if not items:
        raise UserError("the held-out set is empty", cfg.eval.heldout)
    base_dir, out = run_dir / "base", run_dir / f"round-{k}" / "eval"
    base_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    base = responses(cfg, None, items, base_dir / "responses.jsonl")
    if not (base_dir / "eval.json").exists():
        write_json(base_dir / "eval.json", {"heldout_loss": heldout_loss(cfg, None, items), "items": len(items)})
    adapter = run_dir / f"round-{k}" / "train" / "adapter"
    mine = responses(cfg, adapter, items, out / "responses.jsonl")
    previous = base if k == 1 else responses(cfg, run_dir / f"round-{k - 1}" / "train" / "adapter", items,
                                             run_dir / f"round-{k - 1}" / "eval" / "responses.jsonl")
    (out / "judgements.jsonl").unlink(missing_ok=True)  # a re-run judges afresh (answers come from the cache)
    judge = make_generator(judge_config(cfg))
    try:
        vs_base = compare(cfg, judge, items, mine, base, "vs_base", out / "judgements.jsonl")
        vs_prev = vs_base if k == 1 else compare(cfg, judge, items, mine, previous, "vs_previous",
                                                 out / "judgements.jsonl")
    finally:
        judge.close()
    result = {"round": k, "items": len(items), "judge": judge_config(cfg).model, "vs_base": vs_base,
              "vs_previous": vs_prev, "heldout_loss": heldout_loss(cfg, adapter, items),
              "base_heldout_loss": json.loads((base_dir / "eval.json").read_text())["heldout_loss"]}
    write_json(out / "eval.json", result)
    return result
