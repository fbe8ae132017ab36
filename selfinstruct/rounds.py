"""`selfinstruct run`: rounds of generate -> train -> evaluate -> report, resumable per stage.

    out = run_rounds(cfg)

    <run>/config.yaml                  the resolved config
    <run>/round-K/generate/            a generate run (generated.jsonl, rejected.jsonl, stats.json, dataset/)
    <run>/round-K/train/               the adapter and metrics (train-data.jsonl: what it trained on)
    <run>/round-K/eval/                responses.jsonl, judgements.jsonl, eval.json
    <run>/base/                        the base student's responses and held-out loss
    <run>/report.json, <run>/plots/    per-round numbers and their plots
    each stage directory: manifest.json, written (atomically) when the stage is complete

A stage with a manifest is skipped on a re-run; a stage without one is resumed: generation from its
last checkpoint (state.json), training from its last Trainer checkpoint, evaluation redone (its
teacher and judge answers come back from the response cache).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from selfinstruct.config import Config
from selfinstruct.configfile import dump_yaml
from selfinstruct.decontam import NgramIndex
from selfinstruct.errors import RunError, UserError
from selfinstruct.manifest import write_manifest
from selfinstruct.modeling import check_model
from selfinstruct.prompts import Prompts
from selfinstruct.records import json_line, read_jsonl, write_atomic, write_json
from selfinstruct.rundir import Ownership, check, kind_of, locked

console = Console(stderr=True)


def stage_done(d: Path) -> bool:
    path = d / "manifest.json"
    return path.exists() and "stage" in json.loads(path.read_text())


def stage(d: Path, name: str, k: int, work: Callable[[], dict[str, Any]]) -> None:
    """Round k's stage `name` in directory `d`: skipped when its manifest says it finished; else `work()` runs
    and its summary goes into the manifest (on top of the run manifest generate writes there), atomically."""
    if stage_done(d):
        return
    started = time.monotonic()
    summary = work()
    path = d / "manifest.json"
    base = json.loads(path.read_text()) if path.exists() else {}
    write_json(path, {**base, "stage": name, "round": k, "finished_at": datetime.now().isoformat(),
                      "seconds": round(time.monotonic() - started, 2), **summary})


def trains_on_all_rounds(cfg: Config, k: int) -> bool:
    """Round k trains a fresh adapter on every round's records so far (train_from base, or round 1), rather
    than continuing round k-1's adapter on round k's own records."""
    return cfg.rounds.train_from == "base" or k == 1


def round_config(cfg: Config, run_dir: Path, k: int) -> Config:
    """Round k's generate and train settings, derived from the run's config."""
    c = copy.deepcopy(cfg)
    rd = run_dir / f"round-{k}"
    earlier = [str(run_dir / f"round-{j}" / "generate") for j in range(1, k)]
    c.generate.out, c.generate.resume = str(rd / "generate"), True
    c.generate.seed = cfg.generate.seed + 1000 * (k - 1)  # new demonstrations each round
    c.generate.dedup_against = [*cfg.generate.dedup_against, *earlier]
    if c.quality.scorers is None:  # the student is loaded every round anyway: IFD scores every record
        c.quality.scorers = ["ifd"]
    if Path(cfg.eval.heldout).exists():  # nothing the students are evaluated on may be trained on
        c.quality.decontaminate = [*cfg.quality.decontaminate, cfg.eval.heldout]
    if k > 1 and cfg.rounds.generator == "student":
        from selfinstruct.roles import student_config

        c.teacher = student_config(cfg, run_dir / f"round-{k - 1}" / "train" / "adapter")
        c.eval.judge = cfg.eval.judge or cfg.teacher.model  # the teacher still judges the records
    c.train.out, c.train.resume = str(rd / "train"), True
    if trains_on_all_rounds(cfg, k):
        c.train.data = str(rd / "train-data.jsonl")
    else:
        c.train.data = str(rd / "generate")
        c.train.init_adapter = str(run_dir / f"round-{k - 1}" / "train" / "adapter")
    return c


def check_servable(cfg: Config) -> None:
    """When vLLM serves the students (eval.backend vllm or openai), their adapters must be ones it can
    load: plain LoRA with rank <= teacher.max_lora_rank (our defaults). DoRA or a larger rank is the
    user opting out, which only the transformers backend can then run."""
    from selfinstruct.roles import student_config

    if student_config(cfg, None).backend not in ("vllm", "openai"):  # auto resolves as it will run
        return
    if cfg.train.use_dora:
        raise UserError("train.use_dora makes adapters vLLM cannot serve; use eval.backend: transformers, or "
                        "plain LoRA")
    if cfg.train.lora_r > cfg.teacher.max_lora_rank:
        raise UserError(f"train.lora_r {cfg.train.lora_r} > teacher.max_lora_rank {cfg.teacher.max_lora_rank}: "
                        "vLLM would refuse the adapters; raise max_lora_rank (and the server's --max-lora-rank) "
                        "or lower lora_r")


def share_engine(cfg: Config) -> Config:
    """When students run on in-process vLLM, the teacher's and judge's engines get LoRA support too, so
    one engine serves them all when they share a base model (an engine start costs a minute or more)."""
    from selfinstruct.roles import student_config

    if student_config(cfg, None).backend != "vllm":
        return cfg
    return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, enable_lora=True))


def free_accelerator() -> None:
    """Training needs the GPU memory a vLLM engine holds: end it first (on CPU it stays, for the next stage)."""
    import sys

    import torch

    if "vllm" in sys.modules and torch.cuda.is_available():
        from selfinstruct.generators.vllm import shutdown_engines

        shutdown_engines()


# ---------------------------------------------------------------- selfinstruct run, in named steps


def check_run(cfg: Config) -> None:
    """Bad templates, seeds, held-out files or model names fail now, before anything is written, not hours
    into round 1."""
    from selfinstruct.evaluate import TEMPLATES as JUDGE_TEMPLATES
    from selfinstruct.evaluate import heldout_items
    from selfinstruct.generate.loop import RECIPES

    recipe = RECIPES[cfg.generate.method]
    samples = dict(recipe.templates)
    if cfg.rounds.evaluate:
        heldout_items(cfg)
        samples.update(JUDGE_TEMPLATES)
    Prompts(cfg.generate.prompts_dir).check(samples)
    check_servable(cfg)
    # Models that later stages load here: the student (trained every round), and the teacher and judge
    # when they run in-process, so a typo fails now and not after round 1's generation.
    trust = cfg.teacher.trust_remote_code
    check_model(cfg.train.student, trust, "student")
    if "ifd" in (cfg.quality.scorers or ["ifd"]) and cfg.quality.ifd_model:
        check_model(cfg.quality.ifd_model, trust, "IFD")
    NgramIndex.from_paths(cfg.quality.decontaminate, cfg.quality.ngram)  # a bad evaluation file fails now
    if cfg.teacher.backend != "openai" and not cfg.teacher.base_urls and not cfg.teacher.launch:
        check_model(cfg.teacher.model, trust, "teacher")
        if cfg.rounds.evaluate and cfg.eval.judge:
            check_model(cfg.eval.judge, trust, "judge")
    recipe.inputs(cfg.generate.seeds)


def prepare_run(cfg: Config, owner: Ownership) -> tuple[Config, Path]:
    """The run directory (claimed and locked, with config.yaml) and the config as the run records it."""
    owner.take()
    run_dir = owner.path
    cfg = dataclasses.replace(share_engine(cfg), rounds=dataclasses.replace(cfg.rounds, out=str(run_dir)))
    write_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    return cfg, run_dir


def train_data(run_dir: Path, k: int) -> Path:
    """Round k's train-data.jsonl: every record rounds 1..k accepted (trains_on_all_rounds)."""
    rows = [r for j in range(1, k + 1) for r in read_jsonl(run_dir / f"round-{j}" / "generate" / "generated.jsonl")]
    if not rows:
        gen = run_dir / f"round-{k}" / "generate"
        raise RunError(f"round {k}: the generator accepted no record, so there is nothing to train on "
                       f"(why: {gen / 'stats.json'}, {gen / 'rejected.jsonl'}). Try a stronger "
                       "teacher, longer max_tokens, or more instructions.")
    path = run_dir / f"round-{k}" / "train-data.jsonl"
    write_atomic(path, "".join(json_line(r) for r in rows))
    return path


def run_round(cfg: Config, run_dir: Path, k: int) -> None:
    """Round k's stages, each skipped when finished: generate, train, evaluate; then the report."""
    from selfinstruct.generate.loop import run_generate
    from selfinstruct.train import run_train

    c = round_config(cfg, run_dir, k)
    rd = run_dir / f"round-{k}"

    def generate() -> dict[str, Any]:
        stats = json.loads((run_generate(c, round_no=k) / "stats.json").read_text())
        return {"generator": stats["teacher"], "accepted_records": stats["accepted_records"]}

    def train() -> dict[str, Any]:
        if trains_on_all_rounds(cfg, k):
            train_data(run_dir, k)
        free_accelerator()
        metrics = json.loads((run_train(c) / "metrics.json").read_text())
        return {"train_examples": metrics["train_examples"], "train_loss": metrics["train_loss"]}

    stage(rd / "generate", "generate", k, generate)
    stage(rd / "train", "train", k, train)
    if cfg.rounds.evaluate:
        stage(rd / "eval", "eval", k, lambda: evaluate_stage(c, run_dir, k))


def evaluate_stage(cfg: Config, run_dir: Path, k: int) -> dict[str, Any]:
    from selfinstruct.evaluate import evaluate_round

    return {"win_rate_vs_base": evaluate_round(cfg, run_dir, k)["vs_base"]["win_rate"]}


def write_run_manifest(cfg: Config, run_dir: Path) -> None:
    """The run's manifest: every stage's seconds and the teacher's tokens, from the stage manifests."""
    stages = [json.loads(p.read_text()) for k in range(1, cfg.rounds.rounds + 1)
              for p in sorted((run_dir / f"round-{k}").glob("*/manifest.json"))]
    write_manifest(run_dir, {f"round-{m['round']}/{m['stage']}": m["seconds"] for m in stages},
                   {"tokens_in": sum(m.get("teacher_tokens", {}).get("in", 0) for m in stages),
                    "tokens_out": sum(m.get("teacher_tokens", {}).get("out", 0) for m in stages)})


def run_rounds(cfg: Config) -> Path:
    """`selfinstruct run`: check, prepare the directory, run every round (resuming), write the manifest. The
    directory is locked for the whole run (one process at a time)."""
    owner = Ownership(Path(cfg.rounds.out or Path("outputs") / f"{datetime.now():%Y%m%d-%H%M%S}-rounds"), "run")
    check(owner.path, "run")
    check_run(cfg)
    try:
        cfg, run_dir = prepare_run(cfg, owner)
        for k in range(1, cfg.rounds.rounds + 1):
            console.rule(f"round {k} of {cfg.rounds.rounds}")
            run_round(cfg, run_dir, k)
            console.print(report_table(write_report(run_dir)))
        write_run_manifest(cfg, run_dir)
    finally:
        owner.release()
    return run_dir


def evaluate_run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """`selfinstruct eval RUN`: every trained round without a finished evaluation, then the report."""
    from selfinstruct.evaluate import TEMPLATES as JUDGE_TEMPLATES

    Prompts(cfg.generate.prompts_dir).check(JUDGE_TEMPLATES)
    cfg = share_engine(cfg)
    if kind_of(run_dir) != "run":
        raise UserError("not a `selfinstruct run` directory", run_dir)
    k = 1
    with locked(run_dir):  # not while a `run` is writing it
        while stage_done(run_dir / f"round-{k}" / "train"):
            stage(run_dir / f"round-{k}" / "eval", "eval", k, lambda k=k: evaluate_stage(cfg, run_dir, k))
            k += 1
    if k == 1:
        raise UserError("no round of this run has finished training yet", run_dir)
    report = write_report(run_dir)
    Console().print(report_table(report))
    return report


# ---------------------------------------------------------------- the report


def write_report(run_dir: Path) -> dict[str, Any]:
    """report.json and plots/ from what the stages wrote (so a resumed run reports the same)."""
    rounds = []
    k = 1
    while (run_dir / f"round-{k}").exists():
        rd = run_dir / f"round-{k}"
        row: dict[str, Any] = {"round": k}
        if (rd / "generate" / "stats.json").exists():
            s = json.loads((rd / "generate" / "stats.json").read_text())
            row.update(generator=s["teacher"], accepted_instructions=s["accepted_instructions"],
                       accepted_records=s["accepted_records"], rejected=s["rejected"])
        if (rd / "train" / "manifest.json").exists():
            m = json.loads((rd / "train" / "metrics.json").read_text())
            row.update(train_examples=m["train_examples"], train_loss=m["train_loss"])
        if (rd / "eval" / "manifest.json").exists():
            e = json.loads((rd / "eval" / "eval.json").read_text())
            row.update(vs_base=e["vs_base"], vs_previous=e["vs_previous"], heldout_loss=e["heldout_loss"])
        rounds.append(row)
        k += 1
    base = run_dir / "base" / "eval.json"
    report = {"base_heldout_loss": json.loads(base.read_text())["heldout_loss"] if base.exists() else None,
              "rounds": rounds}
    write_json(run_dir / "report.json", report)
    plot_report(report, run_dir / "plots")
    return report


def report_table(report: dict[str, Any]) -> Table:
    t = Table(title="rounds")
    for col in ("round", "generator", "accepted", "rejected", "trained on", "win vs base [95% CI]",
                "win vs previous", "held-out loss"):
        t.add_column(col, justify="left" if col == "generator" else "right", overflow="fold")
    t.add_row("base", "", "", "", "", "", "", _num(report["base_heldout_loss"]))
    for r in report["rounds"]:
        gen = str(r.get("generator", ""))
        gen = f"student {gen.split('+', 1)[1]}" if "+" in gen else Path(gen).name
        t.add_row(str(r["round"]), gen, str(r.get("accepted_records", "")),
                  str(sum(r.get("rejected", {}).values())), str(r.get("train_examples", "")),
                  _rate(r.get("vs_base")), _rate(r.get("vs_previous")), _num(r.get("heldout_loss")))
    return t


def _rate(w: dict[str, Any] | None) -> str:
    if not w or w["win_rate"] is None:
        return "-"
    lo, hi = w["ci95"]
    return f"{w['win_rate']:.2f} [{lo:.2f},{hi:.2f}]"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def plot_report(report: dict[str, Any], out: Path) -> None:
    """win_rate.png, heldout_loss.png, accepted.png, rejections.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selfinstruct.stats import _save

    out.mkdir(parents=True, exist_ok=True)
    rounds = report["rounds"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, colour in (("vs_base", "#4C72B0"), ("vs_previous", "#DD8452")):
        pts = [(r["round"], r[key]) for r in rounds if r.get(key) and r[key]["win_rate"] is not None]
        if pts:
            xs, ws = [p[0] for p in pts], [p[1] for p in pts]
            ys = [w["win_rate"] for w in ws]
            err = [[y - w["ci95"][0] for y, w in zip(ys, ws, strict=True)],
                   [w["ci95"][1] - y for y, w in zip(ys, ws, strict=True)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, color=colour, label=key.replace("_", " "))
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_xlabel("round")
    ax.set_ylabel("win rate (95% CI)")
    ax.legend()
    ax.set_title("Held-out win rate by round")
    _save(fig, out / "win_rate.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(0, report["base_heldout_loss"])] + [(r["round"], r.get("heldout_loss")) for r in rounds]
    pts = [p for p in pts if p[1] is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#55A868")
    ax.set_xlabel("round (0 = base)")
    ax.set_ylabel("loss per reference token")
    ax.set_title("Held-out loss by round")
    _save(fig, out / "heldout_loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r["round"] for r in rounds], [r.get("accepted_records", 0) for r in rounds], color="#4C72B0")
    ax.set_xlabel("round")
    ax.set_ylabel("accepted records")
    ax.set_title("Accepted records by round")
    _save(fig, out / "accepted.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    totals = Counter()
    for r in rounds:
        totals.update(r.get("rejected", {}))
    bottom = [0] * len(rounds)
    for reason, _ in totals.most_common(8):
        vals = [r.get("rejected", {}).get(reason, 0) for r in rounds]
        ax.bar([r["round"] for r in rounds], vals, bottom=bottom, label=reason)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xlabel("round")
    ax.set_ylabel("rejected candidates")
    ax.set_title("Rejections by reason and round (top 8 reasons)")
    if totals:
        ax.legend(fontsize=7)
    _save(fig, out / "rejections.png")
