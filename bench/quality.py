"""How well each quality scorer tells good records from bad ones, and what picking by quality does to training.

    python bench/quality.py MODEL [--n 100] [--judge-n 40] [--backend vllm] [--train-n 64] [--skip-train]

MODEL: SmolLM2-135M-Instruct (a model directory or .gguf file), used as the IFD model, as the judge and as the
student. The labelled set is built at run time from ../shared/data/alpaca_data.json: a seeded sample of `--n`
real records (positives) and the same records corrupted in five known ways (negatives):
    swapped    the output of another record
    unrelated  the instruction replaced by an unrelated phrase (a name and title, a label, a statement)
    cut        the output cut to its first three words
    echo       the output replaced by the instruction itself
    demo_copy  the instance replaced by a demonstration of our instance prompt ("25 degrees Celsius" -> ...)
Scorers: `checks` (the always-on checks: not_a_task, copies_demo, echoes_instruction, format_leak; 1 passes,
0 fails), `ifd` (its part of quality: 2 * (1 - IFD) clipped to [0, 1]), `ifd_raw` (-IFD, unclipped), `judge`
(its part of quality, on the first `--judge-n` records of each kind: four requests per record), `quality`
(ifd and judge combined, on those records). Prints the AUROC of each scorer per corruption and over all of
them, next to the no-scorer baseline of 0.5 (ties count half).

Training effect: a LoRA on MODEL trained on `--train-n` records picked by the IFD quality part from the pool of
real and corrupted records, against `--train-n` records picked at random from the same pool, same steps and
seed; held-out loss (per reference token) on heldout/, and the ratio random / quality. Also prints the
task-form check's false rejections on all 52,002 Alpaca instructions.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_data.json"
NAMES = ["John Smith, CEO of XYZ Corporation", "Leonardo da Vinci, Renaissance artist",
         "Tone: The tone is formal and professional.", "The management strategy is based on innovation.",
         "Marie Curie, physicist and chemist", "Opinion: The article discusses the benefits of AI.",
         "A quiet village by the sea", "The weather in spring is usually mild."]


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(a positive scores above a negative), ties half (Mann-Whitney U / (n_pos * n_neg))."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def demos() -> list:
    from selfinstruct.generate.parse import demo_instances
    from selfinstruct.prompts import render

    return demo_instances(render("self_instruct/instances_input_first.jinja", instruction=""), False)


def labelled(n: int, seed: int) -> dict[str, list[tuple[str, str, str]]]:
    data = json.loads(ALPACA.read_text())
    rng = random.Random(seed)
    real = [(r["instruction"], r["input"], r["output"]) for r in rng.sample(data, n)]
    shown = demos()
    return {
        "real": real,
        "swapped": [(i, x, real[(k + 1 + rng.randrange(n - 1)) % n][2]) for k, (i, x, _) in enumerate(real)],
        "unrelated": [(rng.choice(NAMES), x, o) for _, x, o in real],
        "cut": [(i, x, " ".join(o.split()[:3])) for i, x, o in real],
        "echo": [(i, x, i) for i, x, _ in real],
        "demo_copy": [(i, d.input, d.output) for (i, _, _), d in zip(real, [rng.choice(shown) for _ in real],
                                                                    strict=True)],
    }


def checks(item: tuple[str, str, str], shown: list) -> float:
    from selfinstruct.copies import instance_copy
    from selfinstruct.seeds import Instance
    from selfinstruct.taskform import looks_like_task

    i, x, o = item
    return float(looks_like_task(i) and not instance_copy(Instance(x, o), shown, i))


def score(model: str, sets: dict[str, list], judge_n: int, backend: str) -> dict[str, dict[str, list[float]]]:
    """Per kind, per scorer: the values (higher = better)."""
    from selfinstruct.config import Config, EngineConfig, TeacherConfig
    from selfinstruct.generate.vetting import Candidate, Gate
    from selfinstruct.generators import make_generator
    from selfinstruct.generators.base import choice_mode
    from selfinstruct.prompts import Prompts
    from selfinstruct.scoring import IFDScorer, ifd_part, judge_part

    cfg = Config()
    cfg.quality.max_ifd = None
    ifd = IFDScorer(model, device="auto", batch_size=8)
    judge = make_generator(TeacherConfig(model=model, backend=backend, cache=None,
                                         engine=EngineConfig(max_model_len=2048))) \
        if judge_n else None
    gate = Gate(cfg.quality, Prompts(), ifd, judge, choice_mode(judge) if judge else None)
    shown = demos()
    out: dict[str, dict[str, list[float]]] = {}
    for kind, items in sets.items():
        t = time.monotonic()
        cands = [Candidate(*it) for it in items]
        gate.q.scorers = ["ifd"]
        gate.vet(cands, lambda r: [])
        if judge_n:
            gate.q.scorers = ["judge"]
            gate.vet(cands[:judge_n], lambda r: [])
        ifd_q = [ifd_part(c.scores.get("ifd")) or 0.0 for c in cands]
        judged = [judge_part(c.scores["judge"]) or 0.0 for c in cands[:judge_n]]
        out[kind] = {"checks": [checks(it, shown) for it in items], "ifd": ifd_q,
                     "ifd_raw": [-(c.scores.get("ifd") or 1.0) for c in cands], "judge": judged,
                     "quality": [(a + b) / 2 for a, b in zip(ifd_q, judged, strict=False)]}
        print(f"  scored {kind}: {len(items)} records in {time.monotonic() - t:.0f} s", flush=True)
    if judge:
        judge.close()
    return out


def report(values: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    kinds = [k for k in values if k != "real"]
    table: dict[str, dict[str, float]] = {}
    for scorer in ("checks", "ifd_raw", "ifd", "judge", "quality"):
        pos = values["real"][scorer]
        if not pos:  # --judge-n 0: no judge, no combined score
            continue
        row = {k: auroc(pos, values[k][scorer]) for k in kinds}
        row["all"] = auroc(pos, [v for k in kinds for v in values[k][scorer]])
        table[scorer] = row
    print("\nAUROC, real records against each corruption (no scorer: 0.5)")
    print(f"{'scorer':<10}" + "".join(f"{k:>11}" for k in [*kinds, "all"]))
    for scorer, row in table.items():
        print(f"{scorer:<10}" + "".join(f"{row[k]:>11.3f}" for k in [*kinds, "all"]))
    return table


def train_effect(model: str, values: dict, sets: dict, n: int, seed: int, work: Path) -> dict[str, float]:
    """LoRA on n records picked by IFD quality vs n at random from the same pool; held-out loss of each."""
    from selfinstruct.config import Config
    from selfinstruct.evaluate import heldout_items, heldout_loss

    pool = [(it, q) for kind in sets for it, q in zip(sets[kind], values[kind]["ifd"], strict=True)]
    real = set(sets["real"])
    by_quality = [it for it, _ in sorted(pool, key=lambda p: -p[1])[:n]]
    at_random = [it for it, _ in random.Random(seed).sample(pool, n)]
    cfg = Config()
    cfg.train.student, cfg.eval.heldout = model, str(ROOT / "heldout")
    items = heldout_items(cfg)
    result: dict[str, float] = {"base": heldout_loss(cfg, None, items)}
    for name, picked in (("quality", by_quality), ("random", at_random)):
        d = work / name
        d.mkdir()
        rows = [{"instruction": i, "input": x, "output": o} for i, x, o in picked]
        (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "train.yaml").write_text("train:\n  epochs: 2\n  batch_size: 8\n  learning_rate: 0.0003\n"
                                      "  max_length: 384\n  logging_steps: 4\n  lora_r: 8\n  seed: 0\n")
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "selfinstruct.cli", "train", "--data", str(d / "data.jsonl"),
                        "--student", model, "--out", str(d / "out"), "--config", str(d / "train.yaml")],
                       check=True, capture_output=True, text=True)
        result[name] = heldout_loss(cfg, d / "out" / "adapter", items)
        result[f"{name}_corrupted_share"] = round(sum(it not in real for it in picked) / n, 3)
        print(f"  trained on {n} {name}-picked records in {time.monotonic() - t:.0f} s: held-out loss "
              f"{result[name]}", flush=True)
    print(f"\nheld-out loss per reference token: base {result['base']}, random pick {result['random']}, quality "
          f"pick {result['quality']}; ratio random / quality = {result['random'] / result['quality']:.3f}; "
          f"corrupted records picked: random {result['random_corrupted_share']}, quality "
          f"{result['quality_corrupted_share']}")
    return result


def task_form_rate() -> float:
    from selfinstruct.taskform import looks_like_task

    data = json.loads(ALPACA.read_text())
    bad = sum(not looks_like_task(r["instruction"]) for r in data)
    print(f"task-form check: {bad} of {len(data)} Alpaca instructions fail ({100 * bad / len(data):.2f}%)")
    return bad / len(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--judge-n", type=int, default=40, help="Records per kind the judge rates (0: no judge).")
    p.add_argument("--backend", default="auto")
    p.add_argument("--train-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--json", metavar="FILE", help="Also write every figure here.")
    args = p.parse_args()
    from selfinstruct.modeling import resolve_model

    model = resolve_model(args.model)
    figures: dict = {"task_form_false_rejections": task_form_rate()}
    sets = labelled(args.n, args.seed)
    values = score(model, sets, args.judge_n, args.backend)
    figures["auroc"] = report(values)
    if not args.skip_train:
        with tempfile.TemporaryDirectory() as work:
            figures["training"] = train_effect(model, values, sets, args.train_n, args.seed, Path(work))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
