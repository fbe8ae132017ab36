"""`selfinstruct run`: rounds of generate -> train -> evaluate -> report, resumable per stage.

    out = run_rounds(cfg)

    <run>/config.yaml                  the resolved config
    <run>/round-K/generate/            a generate run (generated.jsonl, rejected.jsonl, stats.json, dataset/)
    <run>/round-K/train/               the adapter and metrics
    <run>/round-K/train-data/dataset/  train_from base: rounds 1..K's train and test splits
    <run>/round-K/eval/                responses.jsonl, judgements.jsonl, eval.json
    <run>/base/                        the base student's responses and held-out loss
    <run>/report.json, <run>/plots/    per-round numbers and their plots (report.py)
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
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from selfinstruct.config import Config
from selfinstruct.configfile import dump_yaml
from selfinstruct.decontam import NgramIndex
from selfinstruct.errors import RunError, UserError
from selfinstruct.htmlreport import write_html_report
from selfinstruct.manifest import write_manifest
from selfinstruct.modeling import check_model
from selfinstruct.prompts import Prompts
from selfinstruct.records import read_jsonl, write_atomic, write_json
from selfinstruct.report import report_table, write_report
from selfinstruct.roles import check_servable, share_engine
from selfinstruct.rundir import Ownership, check, kind_of, locked

console = Console(stderr=True, soft_wrap=True)


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
        c.train.data = str(rd / "train-data")
    else:
        c.train.data = str(rd / "generate")
        c.train.init_adapter = str(run_dir / f"round-{k - 1}" / "train" / "adapter")
    return c


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
    if cfg.teacher.backend != "openai" and not cfg.teacher.server.base_urls and not cfg.teacher.server.launch:
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
    """Round k's training data, `round-k/train-data/dataset`: the train splits of rounds 1..k's datasets as its
    train split and their test splits as its test split (trains_on_all_rounds), so `run` trains and evaluates
    on the same split as `selfinstruct train --data <generate run>` would."""
    from selfinstruct.dataset import union_of_splits

    gens = [run_dir / f"round-{j}" / "generate" for j in range(1, k + 1)]
    if not any(read_jsonl(g / "generated.jsonl") for g in gens):
        gen = gens[-1]
        raise RunError(f"round {k}: the generator accepted no record, so there is nothing to train on "
                       f"(why: {gen / 'stats.json'}, {gen / 'rejected.jsonl'}). Try a stronger "
                       "teacher, longer max_tokens, or more instructions.")
    path = run_dir / f"round-{k}" / "train-data"
    path.mkdir(exist_ok=True)
    union_of_splits(gens, path / "dataset")
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
        console.print(f"report: {write_html_report(run_dir)}", highlight=False, markup=False)
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
