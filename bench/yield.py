"""Yield of each recipe on a real chat teacher: accepted records per 100 teacher requests, how many of them the
judge calls valid, and the share of copies among the candidates.

    python bench/yield.py MODEL [--recipes self-instruct,alpaca,evol] [--target 30] [--budget 150]
                                [--backend vllm] [--before REV] [--before-budget 32] [--list-format text]

Each recipe runs on MODEL (a model directory or .gguf file; made for SmolLM2-135M-Instruct) until it has
`--target` accepted instructions (`--num-instructions`; evol: `--target` seed instructions evolved one
round) or has spent `--budget` teacher requests, all stages counted (instruction lists, Yes/No
questions, instances, rewrites, Equal checks, responses), at CPU-sized lengths (`max_tokens` 256,
Alpaca's lists 384) and 4 prompts per step, no response cache, seed 0, the recipes' own temperatures.
A stall (generate.max_stalled_requests, 64) ends a run as it would end the user's. The quality gate runs as
a user's would (IFD on MODEL itself, quality.max_ifd 1). Prints per recipe: how it stopped (done, budget, or
the stall), requests spent, accepted records and instructions per 100 requests, records the judge (MODEL, the
four audit questions, asked after the run and not counted as generation requests) calls a valid task and all
valid per 100 requests, the share of copies (copies_demo, echoes_instruction, format_leak, shared_instance
among the records plus those rejections), generated tokens per accepted record, the top rejection reasons
and the loud-stall alerts.

`--before REV` also runs the same with the code of git revision REV (a temporary worktree put first on
PYTHONPATH) for `--before-budget` requests, on the transformers backend (vLLM's CPU build could not run
before it was fixed); the same recipe is then also run after on transformers, so before and after
compare on one backend. Every run is a fresh process.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import Future
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE_TOKENS = 256  # max_tokens of every stage (CPU-sized), Alpaca's 20-task lists excepted
ALPACA_TOKENS = 384


class BudgetSpent(Exception):
    pass


class Budget:
    """The teacher, stopped once `budget` requests are spent (the step in progress is not finished)."""

    def __init__(self, inner: object, budget: int):
        self.inner, self.budget, self.spent = inner, budget, 0

    def generate(self, requests: list) -> list:
        if self.spent >= self.budget:
            raise BudgetSpent
        self.spent += len(requests)
        return self.inner.generate(requests)

    concurrent = False  # no prefetch: every request counted when it is made

    def submit(self, requests: list) -> Future:
        fut: Future = Future()
        fut.set_result(self.generate(requests))
        return fut

    def __getattr__(self, name: str) -> object:  # name, chat, close, stats, enforces_choices
        return getattr(self.inner, name)


def one(model: str, method: str, backend: str, budget: int, target: int, out: Path, list_format: str) -> dict:
    """Run `method` to `target` or until `budget` requests are spent; what it accepted and rejected, from the
    run directory."""
    import selfinstruct
    from selfinstruct.generate import loop

    try:
        from selfinstruct.configfile import load_config
    except ImportError:  # a --before commit older than the config file's own module
        from selfinstruct.config import load_config

    overrides = {"teacher.model": model, "teacher.backend": backend, "teacher.cache": None,
                 "teacher.engine.max_model_len": 2048, "generate.method": method, "generate.seed": 0,
                 "generate.seeds": str(ROOT / "seeds"), "generate.out": str(out),
                 "generate.num_instructions": target, "generate.request_batch_size": 4,
                 "generate.evol.rounds": 1, "generate.evol.batch_size": 8, "generate.evol.max_inputs": target}
    if list_format != "text":
        overrides["generate.list_format"] = list_format
    judging = importlib.util.find_spec("selfinstruct.scoring") is not None  # code with the quality gate
    if judging:  # the gate as a user who asks for it runs it: IFD on MODEL, quality.max_ifd 1
        overrides["quality.ifd_model"], overrides["quality.scorers"] = model, ["ifd"]
    cfg = load_config(None, overrides)
    g = cfg.generate
    short = {"max_tokens": STAGE_TOKENS}
    g.instruction_sampling = dataclasses.replace(g.instruction_sampling, **short)
    g.instance_sampling = dataclasses.replace(g.instance_sampling, **short)
    g.alpaca.sampling = dataclasses.replace(g.alpaca.sampling, max_tokens=ALPACA_TOKENS)
    g.evol.evolve_sampling = dataclasses.replace(g.evol.evolve_sampling, **short)
    g.evol.response_sampling = dataclasses.replace(g.evol.response_sampling, **short)

    made = []
    factory = "make_generator" if hasattr(loop, "make_generator") else "make_teacher"  # older commits' name
    real = getattr(loop, factory)

    def budgeted(tcfg: object, *more: object) -> Budget:  # make_generator's signature, whatever it is
        made.append(Budget(real(tcfg, *more), budget))
        return made[-1]

    setattr(loop, factory, budgeted)
    try:
        loop.run_generate(cfg)
        stopped = "done"
    except BudgetSpent:
        stopped = "budget"
    except Exception as e:  # noqa: BLE001 - a stall or a crash is a result here, reported as such
        stopped = f"{type(e).__name__}: {str(e)[:200]}"
    if not made:  # it failed before it had a teacher
        raise SystemExit(f"{method}: {stopped}")
    teacher = made[0]
    records = [json.loads(x) for x in (out / "generated.jsonl").read_text().splitlines()] if made else []
    reasons = collections.Counter(json.loads(x)["reason"]
                                  for x in (out / "rejected.jsonl").read_text().splitlines())
    state = json.loads((out / "state.json").read_text())
    stats = teacher.inner.stats if hasattr(teacher.inner, "stats") else {}
    tokens_out = stats.get("tokens_out", 0)
    valid = judge(model, backend, records) if judging and records else {"task": None, "all": None}
    copied = sum(reasons[r] for r in COPIES)
    return {"code": str(Path(selfinstruct.__file__).parent.parent), "method": method, "backend": backend,
            "stopped": stopped, "requests": teacher.spent, "records": len(records),
            "instructions": len({r["instruction"] for r in records}), "valid_task": valid["task"],
            "all_valid": valid["all"], "copy_share": copied / (copied + len(records)) if copied + len(records) else 0,
            "tokens_out": tokens_out, "reasons": dict(reasons.most_common(4)),
            "alerts": sorted(state.get("alerts", {}))}


COPIES = ("copies_demo", "echoes_instruction", "format_leak", "shared_instance")


def judge(model: str, backend: str, records: list[dict]) -> dict[str, int]:
    """How many records the judge (MODEL, loaded again: the run closed its teacher) calls a valid task, and valid
    in all three audit questions."""
    from selfinstruct.config import EngineConfig, Sampling, TeacherConfig
    from selfinstruct.generators import make_generator
    from selfinstruct.generators.base import choice_mode
    from selfinstruct.prompts import Prompts
    from selfinstruct.scoring import all_valid, judge_requests, read_judgements

    items = [(r["instruction"], r["input"], r["output"]) for r in records]
    teacher = make_generator(TeacherConfig(model=model, backend=backend, cache=None,
                                           engine=EngineConfig(max_model_len=2048)))
    try:
        outs = teacher.generate(judge_requests(Prompts(), items, Sampling(temperature=0.0, max_tokens=4)))
    finally:
        teacher.close()
    judged = read_judgements(outs, choice_mode(teacher))
    return {"task": sum(bool(j["task"]) for j in judged), "all": sum(all_valid(j) for j in judged)}


def run_child(args: argparse.Namespace, method: str, backend: str, pythonpath: str | None, label: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"yield-{label}-{method}-")) / "run"
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    budget = args.before_budget if label.startswith("before") or backend != args.backend else args.budget
    cmd = [sys.executable, __file__, args.model, "--one", method, "--backend", backend, "--budget", str(budget),
           "--target", str(args.target), "--out", str(out), "--list-format", args.list_format]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out.parent / "output.log").write_text(r.stdout + r.stderr)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"label": label, "method": method, "backend": backend, "stopped": f"crashed: see {out.parent}",
                "requests": 0, "records": 0, "instructions": 0, "tokens_out": 0, "reasons": {}, "alerts": [],
                "valid_task": None, "all_valid": None, "copy_share": 0}
    return {"label": label, **json.loads(lines[-1])}


def show(row: dict) -> None:
    n = max(row["requests"], 1)
    per_record = f"{row['tokens_out'] / row['records']:.0f}" if row["records"] else "-"

    def per100(k: str) -> str:
        return "-" if row.get(k) is None else f"{100 * row[k] / n:5.1f}"

    print(f"{row['label']:7} {row['method']:13} {row['backend']:12} requests {row['requests']:3}  "
          f"records {row['records']:3} ({100 * row['records'] / n:5.1f}/100)  "
          f"instructions {row['instructions']:3} ({100 * row['instructions'] / n:5.1f}/100)  "
          f"judged valid task {per100('valid_task')}/100, all valid {per100('all_valid')}/100  "
          f"copies {100 * row.get('copy_share', 0):.0f}%  tokens/record {per_record:>5}  stopped: {row['stopped']}")
    print(f"        top rejections: {row['reasons']}  alerts: {row['alerts'] or 'none'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a model directory or .gguf file (SmolLM2-135M-Instruct)")
    ap.add_argument("--recipes", default="self-instruct,alpaca,evol")
    ap.add_argument("--budget", type=int, default=150, help="most teacher requests per recipe")
    ap.add_argument("--target", type=int, default=30, help="accepted instructions (evol: inputs evolved)")
    ap.add_argument("--before-budget", type=int, default=32, help="with --before: requests per recipe")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    ap.add_argument("--before", metavar="REV", help="also run git revision REV (e.g. 982d830)")
    ap.add_argument("--list-format", default="text", choices=["text", "json"])
    ap.add_argument("--only-before", action="store_true", help="with --before: run only the old code")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.one, args.backend, args.budget, args.target, Path(args.out),
                             args.list_format)))
        return
    methods = args.recipes.split(",")
    worktree = None
    if args.before:
        worktree = Path(tempfile.mkdtemp(prefix="yield-before-")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.before],
                       check=True, capture_output=True)
    try:
        for method in methods:
            if worktree:
                show(run_child(args, method, "transformers", str(worktree), "before"))
                if not args.only_before:
                    show(run_child(args, method, "transformers", None, "after"))
            if not args.only_before:
                show(run_child(args, method, args.backend, None, "after"))
    finally:
        if worktree:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)


if __name__ == "__main__":
    main()
