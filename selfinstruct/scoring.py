"""Quality scores of records: an LLM judge's audit and Instruction-Following Difficulty, combined into one number.

    ifd = IFDScorer("HuggingFaceTB/SmolLM2-135M-Instruct").score([(instruction, input, output), ...])
    requests = judge_requests(prompts, items, sampling, mode)      # 4 per item, sent to any generator
    judged = read_judgements(outs)                                  # one dict per item
    q = quality({"ifd": 0.62, "judge": {...}})                      # in [0, 1]

**judge** (pointwise): the Self-Instruct paper's audit questions (Wang et al., 2023, Table 2), asked one at a
time of the judge (`prompts/judge/pointwise.jinja`): is the instruction a valid, sensible task? is the input
appropriate for it? is the output a correct and acceptable response? and an overall score from 1 to 5.
Each answer is a choice (Yes / No, 1-5), enforced where the backend can (vLLM structured outputs, the
likelihood of each choice on transformers) and parsed elsewhere; an answer that cannot be read is None and
counted (`unparsed`).

**ifd**: IFD = L(output | instruction + input) / L(output), mean cross-entropy per output token of a small
causal LM (Li et al., 2024, "From Quantity to Quality"; Superfiltering, Li et al., 2024, shows a small model
ranks like a large one). The conditioned loss scores the output as the assistant's reply to the user turn in
the model's chat template (a plain "instruction, blank line, input, blank line" prefix without one); the
loss alone scores the output after the tokenizer's BOS token (its EOS where it has none). IFD >= 1: the
instruction does not help predict the output, a mismatched or empty pair.

**quality**, in [0, 1], higher is better: the mean of the parts that ran. judge: the mean of its answers
that were read (each Yes 1, No 0; the overall score as (s - 1) / 4). ifd: 2 * (1 - IFD), clipped to [0, 1]:
an instruction that clearly helps predict the output (IFD <= 0.5) gives 1, one that does not help (IFD >= 1)
gives 0. IFD tells mismatched pairs from matched ones; it does not reward "easier" pairs below 0.5 (an output
that echoes the instruction or stops after a few words has a low IFD: copy detection and the judge catch
those; bench/quality.py measures each scorer per kind of fault).
"""

from __future__ import annotations

import re
from typing import Any

from selfinstruct.config import Sampling
from selfinstruct.generators import Completion, Request
from selfinstruct.prompts import Prompts
from selfinstruct.records import user_turn

T_POINTWISE = "judge/pointwise.jinja"
QUESTIONS = ("task", "input", "output", "overall")
YES_NO = ("Yes", "No")
SCORES = ("1", "2", "3", "4", "5")
TEMPLATES = {T_POINTWISE: {"instruction": "Say hi.", "input": "", "output": "Hi.", "question": "task"}}
SCORERS = ("ifd", "judge")

Item = tuple[str, str, str]  # instruction, input, output


# ---------------------------------------------------------------- the judge


def judge_requests(prompts: Prompts, items: list[Item], sampling: Sampling) -> list[Request]:
    """The four audit questions for every item, item by item (len(items) * 4 requests)."""
    return [Request(prompts.render(T_POINTWISE, instruction=i, input=x, output=o, question=q), sampling,
                    choices=SCORES if q == "overall" else YES_NO)
            for i, x, o in items for q in QUESTIONS]


def _yes_no(text: str) -> bool | None:
    word = re.match(r"\W*(\w+)", text)
    return {"yes": True, "no": False}.get(word.group(1).lower()) if word else None


def _score(text: str) -> int | None:
    m = re.match(r"\D*?([1-5])(?!\d)", text)
    return int(m.group(1)) if m else None


def read_judgements(outs: list[list[Completion]], mode: str) -> list[dict[str, Any]]:
    """One judgement per item from its four answers (the order of judge_requests)."""
    judged = []
    for k in range(0, len(outs), len(QUESTIONS)):
        texts = [o[0].text for o in outs[k:k + len(QUESTIONS)]]
        j: dict[str, Any] = {q: _yes_no(t) for q, t in zip(QUESTIONS[:3], texts[:3], strict=True)}
        j["score"] = _score(texts[3])
        j["unparsed"] = sum(v is None for v in (j["task"], j["input"], j["output"], j["score"]))
        j["mode"] = mode
        judged.append(j)
    return judged


def judge_part(j: dict[str, Any]) -> float | None:
    """The judge's share of `quality`: the mean of its answers that were read."""
    parts = [float(j[q]) for q in ("task", "input", "output") if j.get(q) is not None]
    if j.get("score") is not None:
        parts.append((j["score"] - 1) / 4)
    return sum(parts) / len(parts) if parts else None


def all_valid(j: dict[str, Any]) -> bool:
    """The audit's last column: a valid task, an appropriate input and a correct output."""
    return bool(j.get("task") and j.get("input") and j.get("output"))


# ---------------------------------------------------------------- IFD


class IFDScorer:
    """Instruction-Following Difficulty from a small causal LM, `batch_size` sequences at a time."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", max_length: int = 512,
                 batch_size: int = 8, trust_remote_code: bool = False, role: str = "IFD"):
        from selfinstruct.modeling import load_model_and_tokenizer

        self.name = model
        self.model, self.tok = load_model_and_tokenizer(model, device, dtype, trust_remote_code, role)
        self.max_length, self.batch_size = max_length, batch_size
        self.start = [t for t in (self.tok.bos_token_id if self.tok.bos_token_id is not None
                                  else self.tok.eos_token_id,) if t is not None]
        self.chat = bool(getattr(self.tok, "chat_template", None))

    def _prefix(self, instruction: str, input: str) -> list[int]:
        turn = user_turn(instruction, input)
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": turn}], tokenize=False,
                                                add_generation_prompt=True)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.start + self.tok(turn + "\n\n", add_special_tokens=False)["input_ids"]
        return ids[-self.max_length:]  # the end of a long prompt is what the output follows

    def score(self, items: list[Item]) -> list[dict[str, float | None]]:
        """Per item: {"ifd", "loss", "loss_alone"}; all None for an output with no token."""
        rows: list[tuple[list[int], int]] = []  # (ids, where the output starts)
        for instruction, input, output in items:
            out = self.tok(output.strip(), add_special_tokens=False)["input_ids"][: self.max_length]
            prefix = self._prefix(instruction, input)
            rows += [(prefix + out, len(prefix)), (self.start + out, len(self.start))]
        losses = self._losses(rows)
        result = []
        for k in range(len(items)):
            cond, alone = losses[2 * k], losses[2 * k + 1]
            ifd = None if cond is None or not alone else round(cond / alone, 4)
            result.append({"ifd": ifd, "loss": cond, "loss_alone": alone})
        return result

    def _losses(self, rows: list[tuple[list[int], int]]) -> list[float | None]:
        """Mean loss of the tokens from each row's output start on (None where there is none to predict)."""
        import torch

        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch
        losses: list[float | None] = [None] * len(rows)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                batch = order[b:b + self.batch_size]
                width = max(len(rows[i][0]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(batch):
                    seq = rows[i][0]
                    ids[r, : len(seq)] = torch.tensor(seq)
                    mask[r, : len(seq)] = 1
                logits = self.model(input_ids=ids.to(self.model.device),
                                    attention_mask=mask.to(self.model.device)).logits.float()
                logp = logits[:, :-1].log_softmax(-1).cpu()
                for r, i in enumerate(batch):
                    seq, start = rows[i]
                    first = max(start, 1)  # the first token of a sequence has nothing to be predicted from
                    if first >= len(seq):
                        continue
                    targets = torch.tensor(seq[first:])
                    picked = logp[r, first - 1: len(seq) - 1].gather(1, targets[:, None])
                    losses[i] = round(float(-picked.mean()), 5)
        return losses


# ---------------------------------------------------------------- combined


def ifd_part(ifd: float | None) -> float | None:
    return None if ifd is None else min(1.0, max(0.0, 2.0 * (1.0 - ifd)))


def quality(scores: dict[str, Any]) -> float | None:
    """`scores.quality` from the scorers that ran (module docstring); None when none gave a value."""
    parts = [p for p in (ifd_part(scores.get("ifd")) if "ifd" in scores else None,
                         judge_part(scores["judge"]) if "judge" in scores else None) if p is not None]
    return round(sum(parts) / len(parts), 4) if parts else None
