"""A generate run's state: its directory, durable appends, counters, the ROUGE-L pool, screening and
checkpointing; a step's buffered effects (Step); and what a recipe's step is (Stages). It knows no recipe
and no thread: each recipe keeps its own state in a small dataclass that it serialises itself under its own
key of state.json ("recipes": {KEY: ...}); scheduler.py runs the steps, several at once, in order.

    run = Run(dir=out, cfg=cfg, teacher=gen, seeds=seeds)
    restore(run)                 # cut what a crash left past the checkpoint; counters, pool, recipe states
    run.open()
    s = Step(k)                  # step k's effects: counts, rejections, records, alerts, buffered
    ...                          # a recipe's Stages fill it (scheduler.py calls them)
    s.apply(run); run.checkpoint()          # in step order: rows appended (fsync), counters, state.json

Layout of a run directory:
    config.yaml       the resolved config          generated.jsonl   accepted records (append + fsync)
    rejected.jsonl    rejected candidates + reason  state.json        counters and step, per batch
    stats.json        the final counts              dataset/          HF datasets DatasetDict (train/test)
    selection.json    while quality.keep_top is being applied (vetting.py): the journal that finishes it
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from selfinstruct.config import Config, Sampling
from selfinstruct.copies import InstanceIndex
from selfinstruct.dedup import RougePool
from selfinstruct.filters import check_evolved_instruction, check_instruction, is_rouge_similar
from selfinstruct.generate.alerts import raise_alert, uniform_failure
from selfinstruct.generate.checkpoint import OUTPUT_FILES, verify_checkpoint
from selfinstruct.generate.vetting import Candidate, Gate, apply_journal
from selfinstruct.generators import Completion, Generator, Request
from selfinstruct.prompts import OURS, Prompts
from selfinstruct.records import (
    JsonlAppender,
    Record,
    read_jsonl,
    write_json,
)
from selfinstruct.seeds import SeedTask


class RecipeState(Protocol):
    """A recipe's own part of state.json: what it needs, beyond the core's counters, to resume exactly."""

    KEY: ClassVar[str]

    def to_json(self) -> dict[str, Any]: ...

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecipeState: ...


S = TypeVar("S", bound=RecipeState)
NEVER = math.inf  # a step that must never run (Stages.reads): it waits to be cancelled


@dataclass
class Run:
    """Everything a recipe step reads and writes. The core's counters and each recipe's state are
    checkpointed to state.json after every step."""

    dir: Path
    cfg: Config
    teacher: Generator
    seeds: list[SeedTask]
    extra_pool: list[str] = field(default_factory=list)  # instructions of generate.dedup_against
    extra_tasks: list[SeedTask] = field(default_factory=list)  # and their instances (shared_instance)
    prompts: Prompts = OURS
    gate: Gate | None = None  # quality scores, thresholds, decontamination (vetting.py); None: off
    round: int = 1
    pool: RougePool = field(default_factory=RougePool)
    machine: list[tuple[str, str]] = field(default_factory=list)  # (instruction, first record id)
    instances: InstanceIndex = field(default_factory=InstanceIndex)  # accepted (input, output) pairs
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    step: int = 0
    stalled_requests: int = 0
    n_records: int = 0
    selected: bool = False  # quality.keep_top has been applied: the run is finished, nothing more is generated
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # stages that came to nothing (alerts.py)
    last_alert: str = ""
    states: dict[str, RecipeState] = field(default_factory=dict)  # by KEY, made on first use
    saved: dict[str, dict[str, Any]] = field(default_factory=dict)  # state.json's recipe states, not yet loaded
    depth: int = 1  # steps in flight (set by the scheduler; Self-Instruct's demos lag behind it)
    resumed_at: int = 0  # the first step this process runs
    resumed_accepted: int = 0  # accepted instructions when this process began
    _accepted: JsonlAppender | None = None
    _rejected: JsonlAppender | None = None

    def state(self, cls: type[S]) -> S:
        """The recipe state of type `cls`: the one in use, else the checkpointed one, else a fresh one."""
        st = self.states.get(cls.KEY)
        if st is None:
            st = self.states[cls.KEY] = cls.from_json(self.saved.get(cls.KEY, {}))
        return st  # type: ignore[return-value]

    def open(self) -> None:
        self._accepted = JsonlAppender(self.dir / "generated.jsonl")
        self._rejected = JsonlAppender(self.dir / "rejected.jsonl")

    def close(self) -> None:
        for f in (self._accepted, self._rejected):
            if f is not None:
                f.close()

    def next_id(self) -> str:
        self.n_records += 1
        return f"r{self.round}-{self.n_records:06d}"

    def checkpoint(self) -> None:
        """After a step's appends are fsynced: the step, counters, recipe states and file sizes that belong
        together."""
        recipes = {**self.saved, **{k: s.to_json() for k, s in self.states.items()}}
        write_json(self.dir / "state.json", {
            "step": self.step, "stalled_requests": self.stalled_requests, "n_records": self.n_records,
            "counts": dict(self.counts), "reasons": dict(self.reasons), "alerts": self.alerts, "recipes": recipes,
            "selected": self.selected,
            "files": {f.path.name: f.facts() for f in (self._accepted, self._rejected)}})

    def screen(self, instruction: str, n_fresh: int | None, exclude: Collection[int] = (),
               instruction_filters: bool = True) -> tuple[bool, str, dict[str, Any]]:
        """Self-Instruct's instruction filters (unless `instruction_filters` is off: evolved instructions),
        then ROUGE-L against the pool (leaving out the indices in `exclude`), then the target cap
        (`n_fresh`: instructions this step has kept so far; None: no cap). A kept instruction joins the
        pool at once, so later candidates of the same step see it; its pool position is returned as
        extra["pool_index"]."""
        filters = self.cfg.filters
        check = ((lambda t: check_instruction(t, filters)) if instruction_filters else
                 (lambda t: check_evolved_instruction(t, filters.require_task_form)))
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

    @property
    def target_reached(self) -> bool:
        return self.accepted_instructions >= self.cfg.generate.num_instructions


class Step:
    """Step k's buffered effects (counts, rejections, records, alerts): the recipe's stages fill them, and
    `apply` writes them to the run, in step order."""

    def __init__(self, k: int):
        self.k = k
        self.counts: Counter = Counter()
        self.rejected: list[dict[str, Any]] = []
        self.records: list[Record] = []
        self.alerts: list[tuple[str, str, int, list[str]]] = []
        self.stall: int | None = None  # requests that count towards a stall when the step accepts nothing

    def admit(self, run: Run, c: Candidate, stage: str, **extra: Any) -> bool:
        """In step order: whether `c` becomes a record. A vetted reason, or an (input, output) pair already
        accepted under another instruction (shared_instance), rejects it (counted, with its scores)."""
        if not c.reason and run.instances.shared(c.instance, c.instruction):
            c.reason = "shared_instance"
        if c.reason:
            self.reject([c.rejection(stage, **extra)])
            return False
        run.instances.add(c.instance, c.instruction)
        return True

    def alert(self, stage: str, outcomes: list[str], replies: list[str]) -> None:
        """Say so when every candidate of `stage` in this step failed for one reason ("" = a success)."""
        reason = uniform_failure(outcomes)
        if reason is not None:
            self.alerts.append((stage, reason, len(outcomes), replies))

    def reject(self, rows: list[dict[str, Any]]) -> None:
        """Each row needs `stage` and `reason`; written and counted by `apply`."""
        self.rejected += rows

    def apply(self, run: Run) -> None:
        """In step order: the step's rows appended (fsync), its counters and alerts, the run's next step.
        The caller checkpoints after it (scheduler.py)."""
        run.last_alert = ""
        for stage, reason, n, replies in self.alerts:
            run.last_alert = raise_alert(run.alerts, stage, reason, n, replies)
        run.counts.update(self.counts)
        for r in self.rejected:
            run.reasons[r["reason"]] += 1
        run._accepted.write_many([r.to_json() for r in self.records])
        run._rejected.write_many(self.rejected)
        if self.stall is not None:
            run.stalled_requests = 0 if self.records else run.stalled_requests + self.stall
        run.step = self.k + 1


W = TypeVar("W")
Ask = Callable[[list[Request]], list[list[Completion]]]


def _never(*_: object) -> float:
    return -math.inf


def _nothing_more(run: Run, s: Step, w: Any, ask: Ask) -> list[Candidate]:
    return []


@dataclass(frozen=True)
class Stages(Generic[W]):
    """What one step of a recipe does, as plain functions. scheduler.py calls them in this order and gives
    each the guarantee it names; none of them waits, takes a lock or starts a thread. `W` is the recipe's
    own record of the step's work, made by `prepare` and handed to the stages after it.

    reads(run, k)           the last step whose commit step k's requests must see (-inf: none; NEVER: the
                            step is past the method's end and waits to be cancelled)
    prepare(run, s) -> W    the step's work, its first requests in `requests(w)` (the run as of `reads`)
    take(run, s, w, outs)   the answers to those requests: parsing and the checks that need no shared state
    screen_after(run, s, w) the last step whose commit screening must see (-inf: the previous screen is
                            enough)
    screen(run, s, w)       in step order, after the previous step's screen: checks against the ROUGE-L pool
    expand(run, s, w, ask)  more teacher requests (`ask(requests)` returns their answers); the candidates
                            whose quality is then scored (vetting.py)
    commit(run, s, w)       in step order: records and the recipe's state
    committed(run, s)       after the step's rows are written, before its checkpoint: True when the method
                            changed phase (the steps after this one start afresh)
    """

    prepare: Callable[[Run, Step], W]
    requests: Callable[[W], list[Request]]
    take: Callable[[Run, Step, W, list[list[Completion]]], None]
    commit: Callable[[Run, Step, W], None]
    reads: Callable[[Run, int], float] = _never
    screen: Callable[[Run, Step, W], None] | None = None
    screen_after: Callable[[Run, Step, W], float] = _never
    expand: Callable[[Run, Step, W, Ask], list[Candidate]] = _nothing_more
    committed: Callable[[Run, Step], bool] | None = None


def restore(run: Run) -> None:
    """Rebuild the in-memory state of an interrupted run from its files (nothing, for a new run)."""
    for s in run.seeds:
        run.pool.add(s.instruction)
    for text in run.extra_pool:
        run.pool.add(text)
    for t in run.extra_tasks:  # earlier rounds' pairs: a copy of one is a shared instance here too
        run.instances.add_records({"instruction": t.instruction, "input": i.input, "output": i.output}
                                  for i in t.instances)
    apply_journal(run.dir)  # a keep_top selection cut short: finish it first (its facts are the checkpoint's)
    state = verify_checkpoint(run.dir)
    # Rows appended after the last checkpoint belong to a step that did not finish: cut them, the
    # step is redone with the same seeds.
    for name in OUTPUT_FILES:
        path = run.dir / name
        keep = state["files"][name]["size"] if state else 0
        if path.exists() and path.stat().st_size > keep:
            with path.open("r+b") as fh:
                fh.truncate(keep)
    if state is None:
        return
    run.step, run.stalled_requests = state["step"], state["stalled_requests"]
    run.counts, run.reasons = Counter(state["counts"]), Counter(state["reasons"])
    run.alerts = state.get("alerts", {})
    run.selected = state.get("selected", False)
    run.saved = state.get("recipes", {})
    records = read_jsonl(run.dir / "generated.jsonl")
    run.n_records = state.get("n_records", len(records))  # ids go on from the last, also after a selection
    run.instances.add_records(records)
    for rec in records:
        if not run.machine or run.machine[-1][0] != rec["instruction"]:
            run.machine.append((rec["instruction"], rec["id"]))
            run.pool.add(rec["instruction"])
    for rej in read_jsonl(run.dir / "rejected.jsonl"):
        if rej.get("in_pool"):
            run.pool.add(rej["instruction"])


def records_of_run(run: Run) -> list[dict[str, Any]]:
    """The run's accepted records so far (generated.jsonl; none yet on a fresh run)."""
    path = run.dir / "generated.jsonl"
    return read_jsonl(path) if path.exists() else []


# ---------------------------------------------------------------- helpers every recipe's requests use


def seeded(s: Sampling, rng: random.Random, **changes: object) -> Sampling:
    """`s` with a per-request seed drawn from the step's RNG (and any other `changes`)."""
    return dataclasses.replace(s, seed=rng.getrandbits(31), **changes)


def public(s: Sampling) -> dict:
    """Sampling parameters as recorded on a record (the per-request seed is not)."""
    d = dataclasses.asdict(s)
    d.pop("seed")
    return d
