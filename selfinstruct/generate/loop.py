"""A generate run: its directory, its durable state, and the steps from seeds to dataset.

    run_dir = run_generate(cfg)        # selfinstruct generate

Layout of a run directory:
    config.yaml       the resolved config          generated.jsonl   accepted records (append + fsync)
    rejected.jsonl    rejected candidates + reason  state.json        counters and step, per batch
    stats.json        the final counts              dataset/          HF datasets DatasetDict (train/test)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from selfinstruct.config import Config, dump_yaml
from selfinstruct.dedup import RougePool
from selfinstruct.errors import StorageError, UserError
from selfinstruct.filters import check_evolved_instruction, check_instruction, is_rouge_similar
from selfinstruct.generate.alerts import raise_alert, uniform_failure
from selfinstruct.prompts import check_templates, use_prompts_dir
from selfinstruct.records import JsonlAppender, Record, read_jsonl, read_rows, write_atomic, write_json
from selfinstruct.seeds import SeedTask, load_tasks, record_text
from selfinstruct.teacher import Completion, Request, Teacher, make_teacher
from selfinstruct.teacher.launch import launched_server

console = Console(stderr=True)
OUTPUT_FILES = ("generated.jsonl", "rejected.jsonl")


@dataclass
class Run:
    """Everything a recipe step reads and writes. Counters are checkpointed to state.json per step."""

    dir: Path
    cfg: Config
    teacher: Teacher
    seeds: list[SeedTask]
    extra_pool: list[str] = field(default_factory=list)  # instructions of generate.dedup_against
    pool: RougePool = field(default_factory=RougePool)
    machine: list[tuple[str, str]] = field(default_factory=list)  # (instruction, first record id)
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    step: int = 0
    demo_pool_size: int = 0  # machine instructions the next step's prompts may show (see self_instruct)
    stalled_requests: int = 0
    evol_round: int = 0  # Evol-Instruct: rounds finished, and the next slot of the current round
    evol_pos: int = 0
    slots: list[Any] | None = None  # Evol-Instruct lineages (generate.evol.Slot), rebuilt on resume
    n_records: int = 0
    round: int = 1
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # stages that came to nothing (alerts.py)
    last_alert: str = ""
    _accepted: JsonlAppender | None = None
    _rejected: JsonlAppender | None = None
    _prefetched: dict[int, tuple[list[Request], Future]] = field(default_factory=dict)

    def open(self) -> None:
        self._accepted = JsonlAppender(self.dir / "generated.jsonl")
        self._rejected = JsonlAppender(self.dir / "rejected.jsonl")

    def close(self) -> None:
        for f in (self._accepted, self._rejected):
            if f is not None:
                f.close()
        for requests, future in self._prefetched.values():  # the run ended first; answers stay cached
            self.counts["prefetched_unused"] += len(requests)
            with contextlib.suppress(Exception):
                future.result()
        self._prefetched.clear()

    def prefetch(self, step: int, requests: list[Request]) -> None:
        """Send step `step`'s requests now, where the teacher serves concurrent calls, so it never
        idles while the current step filters and writes."""
        if getattr(self.teacher, "concurrent", False) and step not in self._prefetched:
            self.counts["prefetched"] += len(requests)
            self._prefetched[step] = (requests, self.teacher.submit(requests))

    def fetch(self, step: int, requests: list[Request]) -> list[list[Completion]]:
        """The answers to `requests`: from a prefetch if it asked exactly these, else from the teacher."""
        sent = self._prefetched.pop(step, None)
        if sent is not None and sent[0] == requests:
            self.counts["prefetched_used"] += len(requests)
            return sent[1].result()
        if sent is not None:
            self.counts["prefetched_unused"] += len(sent[0])
        return self.teacher.generate(requests)

    def alert(self, stage: str, outcomes: list[str], replies: list[str]) -> None:
        """Say so when every candidate of `stage` in this step failed for one reason ("" = a success)."""
        reason = uniform_failure(outcomes)
        if reason is not None:
            self.last_alert = raise_alert(self.alerts, stage, reason, len(outcomes), replies)

    def next_id(self) -> str:
        self.n_records += 1
        return f"r{self.round}-{self.n_records:06d}"

    def reject(self, rows: list[dict[str, Any]]) -> None:
        """Each row needs `stage` and `reason`; they are written and counted."""
        for r in rows:
            self.reasons[r["reason"]] += 1
        self._rejected.write_many(rows)

    def accept(self, records: list[Record]) -> None:
        self._accepted.write_many([r.to_json() for r in records])

    def checkpoint(self) -> None:
        """After a step's appends are fsynced: the step, counters and file sizes that belong together."""
        write_json(self.dir / "state.json", {
            "step": self.step, "stalled_requests": self.stalled_requests, "n_records": self.n_records,
            "demo_pool_size": self.demo_pool_size, "evol_round": self.evol_round, "evol_pos": self.evol_pos,
            "counts": dict(self.counts), "reasons": dict(self.reasons), "alerts": self.alerts,
            "sizes": {name: (self.dir / name).stat().st_size for name in OUTPUT_FILES}})

    def screen(self, instruction: str, n_fresh: int | None, exclude: Collection[int] = (),
               instruction_filters: bool = True) -> tuple[bool, str, dict[str, Any]]:
        """Self-Instruct's instruction filters (unless `instruction_filters` is off: evolved instructions),
        then ROUGE-L against the pool (leaving out the indices in `exclude`), then the target cap
        (`n_fresh`: instructions this step has kept so far; None: no cap). A kept instruction joins the
        pool at once, so later candidates of the same step see it; its pool position is returned as
        extra["pool_index"]."""
        check = (lambda t: check_instruction(t, self.cfg.filters)) if instruction_filters else check_evolved_instruction
        ok, reason = check(instruction)
        if not ok:
            return False, reason, {}
        score, j = self.pool.best(instruction, exclude)
        extra = {"rouge_max": round(score, 4), "nearest": self.pool.texts[j] if j >= 0 else ""}
        if is_rouge_similar(score, self.cfg.filters):
            return False, "rouge_similar", extra
        if n_fresh is not None and self.accepted_instructions + n_fresh >= self.cfg.generate.num_instructions:
            return False, "over_target", extra
        self.pool.add(instruction)
        return True, "", {**extra, "pool_index": len(self.pool) - 1}

    @property
    def accepted_instructions(self) -> int:
        return len(self.machine)


def default_run_dir(method: str) -> Path:
    return Path("outputs") / f"{datetime.now():%Y%m%d-%H%M%S}-{method}"


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse to mix two runs in one directory unless asked to resume (writes nothing)."""
    if out.exists() and not out.is_dir():
        raise UserError("--out exists and is not a directory", out)
    if not resume and out.is_dir() and any((out / f).exists() for f in ("generated.jsonl", "state.json")):
        raise UserError("this directory already holds a run: pass --resume to continue it, or another --out", out)


def make_run_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the run directory: {e.strerror}", out) from None


def _restore(run: Run) -> None:
    """Rebuild the in-memory state of an interrupted run from its files."""
    for s in run.seeds:
        run.pool.add(s.instruction)
    for text in run.extra_pool:
        run.pool.add(text)
    state_path = run.dir / "state.json"
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else None
    # Rows appended after the last checkpoint belong to a step that did not finish: cut them, the
    # step is redone with the same seeds.
    for name in OUTPUT_FILES:
        path = run.dir / name
        keep = state["sizes"][name] if state else 0
        if path.exists() and path.stat().st_size > keep:
            with path.open("r+b") as fh:
                fh.truncate(keep)
    if state is None:
        return
    run.step, run.stalled_requests = state["step"], state["stalled_requests"]
    run.demo_pool_size = state["demo_pool_size"]
    run.evol_round, run.evol_pos = state.get("evol_round", 0), state.get("evol_pos", 0)
    run.counts, run.reasons = Counter(state["counts"]), Counter(state["reasons"])
    run.alerts = state.get("alerts", {})
    records = read_jsonl(run.dir / "generated.jsonl")
    run.n_records = len(records)
    for rec in records:
        if not run.machine or run.machine[-1][0] != rec["instruction"]:
            run.machine.append((rec["instruction"], rec["id"]))
            run.pool.add(rec["instruction"])
    for rej in read_jsonl(run.dir / "rejected.jsonl"):
        if rej.get("in_pool"):
            run.pool.add(rej["instruction"])


def pool_texts(paths: list[str]) -> list[str]:
    """Instructions of other data (files, or run directories' generated.jsonl) for the ROUGE-L pool."""
    texts = []
    for p in map(Path, paths):
        src = p / "generated.jsonl" if p.is_dir() and (p / "generated.jsonl").exists() else p
        texts += [record_text(row, f, line) for f, line, row in read_rows(src)]
    return texts


@dataclass(frozen=True)
class Recipe:
    """How a method advances (`step`), when it is finished, and what its progress bar shows."""

    step: Callable[[Run], None]
    done: Callable[[Run], bool]
    progress: Callable[[Run], tuple[str, int, int]]


def _target_reached(run: Run) -> bool:
    return run.accepted_instructions >= run.cfg.generate.num_instructions


def _instructions(run: Run) -> tuple[str, int, int]:
    return "instructions", run.accepted_instructions, run.cfg.generate.num_instructions


def template_samples(method: str) -> dict[str, dict[str, Any]]:
    """Every template `method` renders, with sample variables (for check_templates at start-up)."""
    from selfinstruct.generate import alpaca, evol, self_instruct

    parts = {"self-instruct": [self_instruct.TEMPLATES], "alpaca": [alpaca.TEMPLATES], "evol": [evol.TEMPLATES],
             "self-instruct+evol": [self_instruct.TEMPLATES, evol.TEMPLATES]}[method]
    return {k: v for p in parts for k, v in p.items()}


def recipe(method: str) -> Recipe:
    from selfinstruct.generate import alpaca, evol, self_instruct

    return {
        "self-instruct": Recipe(self_instruct.step, _target_reached, _instructions),
        "alpaca": Recipe(alpaca.step, _target_reached, _instructions),
        "evol": Recipe(evol.step, evol.done, evol.progress),
        "self-instruct+evol": Recipe(evol.combined_step, evol.done, evol.progress),
    }[method]


def run_generate(cfg: Config, round_no: int = 1) -> Path:
    """Generate until the method is done (or the teacher stalls); write stats and dataset. Records of
    round `round_no` (selfinstruct run) carry it, and ids r<round>-NNNNNN."""
    from selfinstruct.generate.evol import input_tasks

    gcfg = cfg.generate
    # Everything that can fail on bad input fails before anything is written.
    use_prompts_dir(gcfg.prompts_dir)
    check_templates(template_samples(gcfg.method))
    seeds = input_tasks(gcfg.seeds) if gcfg.method == "evol" else load_tasks(gcfg.seeds)
    extra_pool = pool_texts(gcfg.dedup_against)  # read now: a bad file fails before anything is written
    out = Path(gcfg.out) if gcfg.out else default_run_dir(gcfg.method)
    check_run_dir(out, gcfg.resume)
    with contextlib.ExitStack() as stack:
        if cfg.teacher.launch:  # the server's log belongs to the run, so the directory comes first
            make_run_dir(out)
            url = stack.enter_context(launched_server(cfg.teacher, out / "teacher-server.log"))
            cfg.teacher = dataclasses.replace(cfg.teacher, backend="openai", base_urls=[url])
        teacher = make_teacher(cfg.teacher)
        stack.callback(teacher.close)
        make_run_dir(out)
        cfg.generate.out = str(out)
        write_atomic(out / "config.yaml", dump_yaml(cfg))
        return _generate(Run(dir=out, cfg=cfg, teacher=teacher, seeds=seeds, extra_pool=extra_pool,
                             round=round_no), recipe(gcfg.method))


def _generate(run: Run, how: Recipe) -> Path:
    gcfg = run.cfg.generate
    _restore(run)
    run.open()
    started = time.monotonic()
    stopped = "done"
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as bar:
            what, completed, total = how.progress(run)
            task = bar.add_task(what, total=total, completed=completed, info="")
            while not how.done(run):
                if run.stalled_requests >= gcfg.max_stalled_requests:
                    stopped = "stalled"
                    break
                run.last_alert = ""
                how.step(run)
                run.checkpoint()
                what, completed, total = how.progress(run)
                alert = f" · [bold red]{escape(run.last_alert)}[/]" if run.last_alert else ""
                bar.update(task, description=what, completed=completed, total=total,
                           info=f"{run.n_records} records · {sum(run.reasons.values())} rejected{alert}")
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
    if stopped == "stalled":
        raise StalledError(run, stats)
    return run.dir


class StalledError(Exception):
    """The teacher made no progress within the request budget (CLI exit code 1)."""

    def __init__(self, run: Run, stats: dict[str, Any]):
        top = ", ".join(f"{k} {v}" for k, v in Counter(stats["rejected"]).most_common(3)) or "nothing parsed"
        worst = max(run.alerts.values(), key=lambda a: a["candidates"], default=None)
        why = (f" Every {worst['stage']} candidate failed as {worst['reason']} in {worst['steps']} step(s); a reply: "
               f"{worst['sample'][:160]!r}. Likely fix: {worst['fix']}.") if worst else ""
        super().__init__(
            f"the teacher produced no acceptable instruction in {run.cfg.generate.max_stalled_requests} "
            f"requests in a row; stopped with {stats['accepted_instructions']} of "
            f"{stats['target_instructions']} instructions (top rejections: {top}).{why} Stats: "
            f"{run.dir / 'stats.json'}. Check the teacher model (--teacher) or raise generate.max_stalled_requests.")


def finish(run: Run, stopped: str, elapsed: float) -> dict[str, Any]:
    """stats.json and the dataset, both rebuilt from generated.jsonl, so a resumed run writes the same."""
    from selfinstruct.dataset import save_dataset
    from selfinstruct.manifest import write_manifest
    from selfinstruct.publish import write_card
    from selfinstruct.stats import diversity, plot_diversity

    records = read_jsonl(run.dir / "generated.jsonl")
    stats = {
        "method": run.cfg.generate.method,
        "teacher": run.teacher.name,
        "stopped": stopped,
        "seed_tasks": len(run.seeds),
        "target_instructions": None if run.cfg.generate.method == "evol" else run.cfg.generate.num_instructions,
        "accepted_instructions": len({r["instruction"] for r in records}),
        "accepted_records": len(records),
        "requests": {k.removeprefix("requests/"): v for k, v in run.counts.items() if k.startswith("requests/")},
        "counts": {k: v for k, v in run.counts.items() if not k.startswith("requests/")},
        "rejected": dict(run.reasons.most_common()),
        "rejected_total": sum(run.reasons.values()),
        "teacher_calls": getattr(run.teacher, "stats", {}),
        "alerts": list(run.alerts.values()),
        "steps": run.step,
        "elapsed_s": round(elapsed, 2),
    }
    if "evol" in run.cfg.generate.method:
        from selfinstruct.generate.evol import ensure_slots
        from selfinstruct.stats import evol_stats

        stats["evol"] = evol_stats(records, read_jsonl(run.dir / "rejected.jsonl"),
                                   [s.root for s in ensure_slots(run)], run.cfg.generate.evol.rounds)
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
    from selfinstruct.stats import alerts_table, counts_table

    console.print(counts_table(stats, f"{stats['method']} with {stats['teacher']}"))
    if stats.get("alerts"):
        console.print(alerts_table(stats["alerts"]))
