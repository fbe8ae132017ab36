"""A generate run from seeds to dataset: the table of methods, and the loop that steps one until it is done.

    run_dir = run_generate(cfg)        # selfinstruct generate
    run_dir = generate(run)            # the loop, on a Run made elsewhere (tests, selfinstruct run)

Imports point one way: cli -> rounds -> loop -> recipes (self_instruct, alpaca, evol) -> run core
(run.py) -> filters / parse / dedup. The run directory's layout is in run.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from selfinstruct.config import Config
from selfinstruct.configfile import dump_yaml
from selfinstruct.errors import StalledError, StorageError
from selfinstruct.generate import alpaca, evol, self_instruct
from selfinstruct.generate.checkpoint import check_run_dir, default_run_dir, pool_tasks, pool_texts, verify_checkpoint
from selfinstruct.generate.run import Run, Stages, records_of_run, restore
from selfinstruct.generate.scheduler import Scheduler, drive
from selfinstruct.generate.vetting import apply_journal, make_gate, select_top
from selfinstruct.generators import make_generator
from selfinstruct.generators.base import choice_mode
from selfinstruct.generators.launch import launched_server
from selfinstruct.htmlreport import write_html_report
from selfinstruct.prompts import Prompts
from selfinstruct.records import read_jsonl, write_atomic, write_json
from selfinstruct.roles import launched
from selfinstruct.rundir import Ownership, kind_of
from selfinstruct.seeds import SeedTask, load_tasks

console = Console(stderr=True, soft_wrap=True)


def _instructions(run: Run) -> tuple[str, int, int]:
    return "instructions", run.accepted_instructions, run.cfg.generate.num_instructions


def _target_reached(run: Run) -> bool:
    return run.target_reached


def _worth_for_target(run: Run) -> int:
    """Steps worth having in flight for a num_instructions target: as many as still seem needed, plus one (a
    step begun past the end is wasted work). Needed: at the rate the steps so far accepted instructions,
    or, before any did, at one instruction per list request."""
    gained = run.accepted_instructions - run.resumed_accepted
    rate = gained / (run.step - run.resumed_at) if gained else run.cfg.generate.request_batch_size
    return max(1, math.ceil((run.cfg.generate.num_instructions - run.accepted_instructions) / rate) + 1)


@dataclass(frozen=True)
class Recipe:
    """A method: its next step's stages (run.Stages: a method may change phase), when it is done, what its
    progress bar shows, the templates it renders (with sample variables, checked at start-up), how it reads
    --seeds, what it does once the run's files are restored, and its own sections of stats.json.
    `has_target`: num_instructions bounds it."""

    stages: Callable[[Run], Stages]
    done: Callable[[Run], bool]
    progress: Callable[[Run], tuple[str, int, int]]
    templates: dict[str, dict[str, Any]]
    inputs: Callable[[str], list[SeedTask]] = load_tasks
    start: Callable[[Run], None] = lambda run: None
    stats: Callable[[Run, list[dict], list[dict]], dict[str, Any]] | None = None
    has_target: bool = True
    worth: Callable[[Run], int] = lambda run: run.depth  # steps worth having in flight now


RECIPES: dict[str, Recipe] = {
    "self-instruct": Recipe(lambda run: self_instruct.STAGES, _target_reached, _instructions,
                            self_instruct.TEMPLATES, worth=_worth_for_target),
    "alpaca": Recipe(lambda run: alpaca.STAGES, _target_reached, _instructions, alpaca.TEMPLATES,
                     worth=_worth_for_target),
    "evol": Recipe(lambda run: evol.STAGES, evol.done, evol.progress, evol.TEMPLATES, inputs=evol.input_tasks,
                   start=evol.start, stats=evol.stats, has_target=False),
    "self-instruct+evol": Recipe(evol.combined_stages, evol.done, evol.progress,
                                 {**self_instruct.TEMPLATES, **evol.TEMPLATES}, start=evol.start_combined,
                                 stats=evol.stats,
                                 worth=lambda run: run.depth if evol.evolving(run) else _worth_for_target(run)),
}


def run_generate(cfg: Config, round_no: int = 1) -> Path:
    """Generate until the method is done (or the teacher stalls); write stats and dataset. Records of
    round `round_no` (selfinstruct run) carry it, and ids r<round>-NNNNNN. Returns the run directory."""
    gcfg = cfg.generate
    recipe = RECIPES[gcfg.method]
    # Everything that can fail on bad input fails before anything is written.
    prompts = Prompts(gcfg.prompts_dir)
    prompts.check(recipe.templates)
    seeds = recipe.inputs(gcfg.seeds)
    extra_pool = pool_texts(gcfg.dedup_against)  # read now: a bad file fails before anything is written
    extra_tasks = pool_tasks(gcfg.dedup_against)
    out = Path(gcfg.out) if gcfg.out else default_run_dir(gcfg.method)
    check_run_dir(out, gcfg.resume)
    cfg = dataclasses.replace(cfg, generate=dataclasses.replace(gcfg, out=str(out)))  # as config.yaml records it
    owner = Ownership(out, "generate")
    with contextlib.ExitStack() as stack:
        stack.callback(owner.release)
        if kind_of(out) == "generate":  # a run of ours: lock it before anything costly (one process at a time)
            owner.take()
        gate = make_gate(cfg, prompts)  # the IFD model and the evaluation sets load now: a bad one fails early
        stack.callback(gate.close)
        teacher_cfg = cfg.teacher
        if teacher_cfg.server.launch:  # the server's log belongs to the run, so the directory comes first
            owner.take()
            server = stack.enter_context(launched_server(teacher_cfg, out / "teacher-server.log"))
            teacher_cfg = launched(teacher_cfg, server.url)
        teacher = make_generator(teacher_cfg, server.check if teacher_cfg.server.launch else None)
        stack.callback(teacher.close)
        gate.judge_mode = gate.judge_mode or choice_mode(teacher)  # the teacher judges unless eval.judge is another
        owner.take()
        apply_journal(out)  # a keep_top selection cut short is finished first: its facts are the checkpoint's
        verify_checkpoint(out)  # a resumed run's files are what it wrote, before anything is rewritten
        write_atomic(out / "config.yaml", dump_yaml(cfg))
        return generate(Run(dir=out, cfg=cfg, teacher=teacher, seeds=seeds, extra_pool=extra_pool,
                            extra_tasks=extra_tasks, prompts=prompts, round=round_no, gate=gate))


def generate(run: Run) -> Path:
    """Step the run's method until it is done or stalls (resuming from the run's files), then finish."""
    gcfg = run.cfg.generate
    how = RECIPES[gcfg.method]
    restore(run)
    how.start(run)
    run.open()
    run.depth = gcfg.steps_in_flight if run.teacher.concurrent else 1
    sch = Scheduler(run, how.stages, how.done, how.worth, gcfg.max_in_flight)
    run.resumed_at, run.resumed_accepted = run.step, run.accepted_instructions
    started = time.monotonic()
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as bar:
            what, completed, total = how.progress(run)
            task = bar.add_task(what, total=total, completed=completed, info="")

            def show() -> None:
                what, completed, total = how.progress(run)
                alert = f" · [bold red]{escape(run.last_alert)}[/]" if run.last_alert else ""
                bar.update(task, description=what, completed=completed, total=total,
                           info=f"{run.n_records} records · {sum(run.reasons.values())} rejected{alert}")

            stopped = "done" if run.selected else drive(sch, show)  # a selected run is finished
    except OSError as e:  # the disk, not the input: what was checkpointed is safe
        raise StorageError(f"cannot write {e.filename or run.dir}: {e.strerror or e}. Everything accepted up "
                           "to the last completed step is on disk; free space (or fix permissions) and run the "
                           "same command with --resume.") from None
    finally:
        run.close()
    try:
        stats = finish(run, stopped, time.monotonic() - started)
    except OSError as e:
        raise StorageError(f"cannot write {e.filename or run.dir}: {e.strerror or e}. The records are complete; "
                           "free space and run the same command with --resume to write stats and dataset.") from None
    print_summary(stats)
    console.print(f"report: {write_html_report(run.dir)}", highlight=False, markup=False)
    if stopped == "stalled":
        raise stalled(run, stats)
    return run.dir


def stalled(run: Run, stats: dict[str, Any]) -> StalledError:
    """Why the run stopped: the top rejections and the worst alert, with its likely fix."""
    top = ", ".join(f"{k} {v}" for k, v in Counter(stats["rejected"]).most_common(3)) or "nothing parsed"
    worst = max(run.alerts.values(), key=lambda a: a["candidates"], default=None)
    why = (f" Every {worst['stage']} candidate failed as {worst['reason']} in {worst['steps']} step(s); a reply: "
           f"{worst['sample'][:160]!r}. Likely fix: {worst['fix']}.") if worst else ""
    return StalledError(
        f"the teacher produced no acceptable instruction in {run.cfg.generate.max_stalled_requests} "
        f"requests in a row; stopped with {stats['accepted_instructions']} of "
        f"{stats['target_instructions']} instructions (top rejections: {top}).{why} Stats: "
        f"{run.dir / 'stats.json'}. Check the teacher model (--teacher) or raise generate.max_stalled_requests.")


def finish(run: Run, stopped: str, elapsed: float) -> dict[str, Any]:
    """stats.json and the dataset, both rebuilt from generated.jsonl, so a resumed run writes the same."""
    from selfinstruct.audit import summarise
    from selfinstruct.dataset import save_dataset
    from selfinstruct.manifest import write_manifest
    from selfinstruct.publish import write_card
    from selfinstruct.stats import diversity, plot_diversity

    recipe = RECIPES[run.cfg.generate.method]
    if stopped == "done":  # quality.keep_top: the best fraction stays, the rest become low_quality rejections
        run.reasons["low_quality"] += select_top(run.dir, run.cfg.quality.keep_top)
    records = records_of_run(run)
    stats = {
        "method": run.cfg.generate.method,
        "teacher": run.teacher.name,
        "stopped": stopped,
        "seed_tasks": len(run.seeds),
        "target_instructions": run.cfg.generate.num_instructions if recipe.has_target else None,
        "accepted_instructions": len({r["instruction"] for r in records}),
        "accepted_records": len(records),
        "requests": {k.removeprefix("requests/"): v for k, v in run.counts.items() if k.startswith("requests/")},
        "counts": {k: v for k, v in run.counts.items() if not k.startswith("requests/")},
        "rejected": dict(run.reasons.most_common()),
        "rejected_total": sum(run.reasons.values()),
        "teacher_calls": run.teacher.stats,
        "alerts": list(run.alerts.values()),
        "steps": run.step,
        "elapsed_s": round(elapsed, 2),
    }
    rejected = read_jsonl(run.dir / "rejected.jsonl")
    if recipe.stats is not None:
        stats.update(recipe.stats(run, records, rejected))
    if run.gate is not None and run.gate.active:  # the accepted records' scores, and every scored candidate's
        scored = [r["scores"] for r in rejected if isinstance(r.get("scores"), dict)]
        stats["quality"] = {"accepted": summarise([r["scores"] for r in records], run.cfg.quality),
                            "scored": summarise([r["scores"] for r in records] + scored, run.cfg.quality)}
    stats["diversity"] = diversity(records, [s.instruction for s in run.seeds])
    stats["dataset"] = save_dataset(records, run.dir / "dataset", run.cfg.generate.test_size,
                                    run.cfg.generate.seed)
    plot_diversity(stats["diversity"], run.dir / "plots")
    write_json(run.dir / "stats.json", stats)
    write_card(run.dir, stats, run.cfg, records)
    write_manifest(run.dir, {"generate": elapsed}, stats["teacher_calls"], method=stats["method"],
                   teacher=stats["teacher"], stopped=stopped)
    return stats


def print_summary(stats: dict[str, Any]) -> None:
    from selfinstruct.audit import tables
    from selfinstruct.stats import alerts_table, counts_table

    console.print(counts_table(stats, f"{stats['method']} with {stats['teacher']}"))
    if stats.get("quality", {}).get("accepted", {}).get("records"):
        for t in tables(stats["quality"]["accepted"]):
            console.print(t)
    if stats.get("alerts"):
        console.print(alerts_table(stats["alerts"]))
