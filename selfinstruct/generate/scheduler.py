"""The scheduler: the only place that knows about steps in flight, their order and the run's lock. A
recipe's step is a set of plain functions (run.Stages); this module calls them, several steps at once, and
gives each stage the guarantee it names:

    sch = Scheduler(run, stages, done, worth, max_in_flight)   # the method's table entry (loop.RECIPES)
    drive(sch, show)        # steps until the method is done ("done") or the teacher stalls ("stalled")

Step k, in a worker thread (or in the caller's, with one step in flight):
    wait until step reads(run, k) has committed; prepare, under the run's lock
    ask the teacher (within generate.max_in_flight requests outstanding, no lock held); take the answers
    wait until step k-1 has screened and step screen_after(...) has committed; screen, under the lock
    expand (more requests), then the quality gate (vetting.py), no lock held
    wait until step k-1 has committed; commit, then the step's rows, counters and state.json, under the lock

Every read or write of shared state happens under the lock in a stage the scheduler orders, so what a run
accepts depends on its seed and config, never on timing; a step past the run's end raises Cancelled and
leaves no trace (its requests are counted as requests_unused).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from selfinstruct.generate.run import NEVER, Run, Stages, Step
from selfinstruct.generate.vetting import Candidate
from selfinstruct.generators import Completion, Request
from selfinstruct.scoring import QUESTIONS


class Cancelled(Exception):
    """A step past the run's end, or started before a change of phase: its work is dropped, nothing written."""


class InFlight:
    """At most `limit` requests outstanding at once; `peak` is the most there ever were."""

    def __init__(self, limit: int):
        self.limit, self.n, self.peak = limit, 0, 0
        self.cv = threading.Condition()

    def acquire(self, n: int, cancelled: Callable[[], bool]) -> None:
        with self.cv:
            while self.n + n > self.limit:
                if cancelled():
                    raise Cancelled
                self.cv.wait(0.5)
            self.n += n
            self.peak = max(self.peak, self.n)

    def release(self, n: int) -> None:
        with self.cv:
            self.n -= n
            self.cv.notify_all()


@dataclass
class Scheduler:
    """How the run's steps are ordered. `stages(run)` gives the next step's stages (a method may change phase);
    `done(run)` is checked after every commit; `worth(run)`: steps worth having in flight now.

    The lock guards the run's state; `passed[gate]` is the last step through gate "screen" or "commit";
    steps after `stop_at` are cancelled; `ending` says why it was set ("done", "stalled", "restart": the
    method changed phase and later steps start afresh, or "error")."""

    run: Run
    stages: Callable[[Run], Stages]
    done: Callable[[Run], bool]
    worth: Callable[[Run], int]
    max_in_flight: int
    lock: threading.Condition = field(default_factory=threading.Condition)
    passed: dict[str, int] = field(default_factory=dict)
    stop_at: float = NEVER
    ending: str = ""
    in_flight: InFlight = field(init=False)
    unused: int = 0  # requests sent by steps that were then cancelled

    def __post_init__(self) -> None:
        self.in_flight = InFlight(self.max_in_flight)

    def stop(self, k: float, why: str) -> None:
        """Steps after k will not commit (under the lock)."""
        self.stop_at, self.ending = k, why
        self.lock.notify_all()

    def cancelled(self, k: int) -> bool:
        return k > self.stop_at

    def after(self, k: int, gate: str, j: float) -> None:
        """Step k waits until step j has passed `gate` (at once for a step before this process's first)."""
        with self.lock:
            while self.passed.get(gate, self.run.resumed_at - 1) < j and not self.cancelled(k):
                self.lock.wait(0.5)
            if self.cancelled(k):
                raise Cancelled

    @contextlib.contextmanager
    def ordered(self, k: int, gate: str) -> Iterator[None]:
        """A section that steps pass one at a time, in step order, holding the run's lock."""
        with self.lock:
            while self.passed.get(gate, self.run.resumed_at - 1) < k - 1 and not self.cancelled(k):
                self.lock.wait(0.5)
            if self.cancelled(k):
                raise Cancelled
            yield
            self.passed[gate] = k
            self.lock.notify_all()

    def ask(self, f: Flight, requests: list[Request]) -> list[list[Completion]]:
        """The teacher's answers, never more than generate.max_in_flight requests outstanding across the run."""
        teacher, limit = self.run.teacher, self.in_flight
        if not requests:
            return []
        futures = []
        for i in range(0, len(requests), limit.limit):
            chunk = requests[i:i + limit.limit]
            limit.acquire(len(chunk), lambda: self.cancelled(f.k))
            f.asked += len(chunk)
            fut = teacher.submit(chunk)
            fut.add_done_callback(_releaser(limit, len(chunk)))
            futures.append(fut)
        return [c for fut in futures for c in self._wait(f.k, fut)]

    def _wait(self, k: int, fut: Future) -> list[list[Completion]]:
        while True:
            with contextlib.suppress(TimeoutError):
                return fut.result(timeout=0.5)
            if self.cancelled(k):  # this step's answers are no longer needed: the backend may drop them
                fut.cancel()
                raise Cancelled

    def vet(self, f: Flight, cands: list[Candidate]) -> None:
        """Quality scores and decontamination of candidates (no lock held): each gets scores and a reason."""
        gate = self.run.gate
        if gate is not None and cands:
            gate.vet(cands, lambda requests: self.ask(f, requests))
            if "judge" in gate.q.scorers:
                f.step.counts["requests/judge"] += len(cands) * len(QUESTIONS)

    def run_step(self, f: Flight) -> None:
        """Step f.k, stage by stage (module docstring)."""
        run, st, s, k = self.run, f.stages, f.step, f.k
        with self.lock:
            reads = st.reads(run, k)
        self.after(k, "commit", reads)
        with self.lock:
            w = st.prepare(run, s)
        st.take(run, s, w, self.ask(f, st.requests(w)))
        if st.screen is not None:
            self.after(k, "screen", k - 1)
            with self.lock:
                needs = st.screen_after(run, s, w)
            self.after(k, "commit", needs)
            with self.ordered(k, "screen"):
                st.screen(run, s, w)
        self.vet(f, st.expand(run, s, w, lambda requests: self.ask(f, requests)))
        with self.ordered(k, "commit"):
            st.commit(run, s, w)
            s.apply(run)
            if st.committed is not None and st.committed(run, s):
                self.stop(k, "restart")
            run.checkpoint()
            if self.done(run):
                self.stop(k, "done")
            elif run.stalled_requests >= run.cfg.generate.max_stalled_requests:
                self.stop(k, "stalled")


@dataclass
class Flight:
    """A step in flight: its stages, its buffered effects and the requests it has sent."""

    k: int
    stages: Stages
    step: Step
    asked: int = 0

    @classmethod
    def of(cls, sch: Scheduler, k: int) -> Flight:
        with sch.lock:
            return cls(k, sch.stages(sch.run), Step(k))


def drive(sch: Scheduler, show: Callable[[], None]) -> str:
    """Run steps until the method is done ("done") or the teacher stalls ("stalled"). Up to `run.depth`
    steps are in flight, each in a worker thread; they commit in step order, and a step past the end (or
    begun before a change of phase) is cancelled; the requests such steps had sent are counted as
    `requests_unused` (their answers are in the response cache). One step in flight runs in this thread: the
    step-by-step order of a backend that answers one batch at a time."""
    run = sch.run
    if sch.done(run):
        return "done"
    if run.stalled_requests >= run.cfg.generate.max_stalled_requests:
        return "stalled"
    try:
        return _one_at_a_time(sch, show) if run.depth == 1 else _in_flight(sch, show)
    finally:
        if sch.unused:
            run.counts["requests_unused"] += sch.unused


def _in_flight(sch: Scheduler, show: Callable[[], None]) -> str:
    run = sch.run
    active: dict[int, tuple[Flight, Future]] = {}

    def drain() -> None:  # every step still in flight ends (cancelled) before the run moves on
        for f, fut in active.values():
            with contextlib.suppress(Exception):  # a step after the end may fail: it no longer matters
                fut.result()
            sch.unused += f.asked
        active.clear()

    with ThreadPoolExecutor(run.depth, thread_name_prefix="step") as pool:
        k = run.step
        try:
            while True:
                while len(active) < min(run.depth, _worth(sch)) and k <= sch.stop_at:
                    f = Flight.of(sch, k)
                    active[k] = (f, pool.submit(sch.run_step, f))
                    k += 1
                if not active:  # nothing left to run (every step after the end was dropped)
                    return sch.ending or "done"
                oldest = min(active)
                f, fut = active.pop(oldest)
                error = _outcome(fut)
                if isinstance(error, Cancelled):
                    sch.unused += f.asked
                    continue
                if error is not None:
                    raise error
                show()
                if sch.ending == "restart":  # the phase changed at `oldest`: later steps start afresh
                    drain()
                    with sch.lock:
                        sch.passed = {g: min(j, oldest) for g, j in sch.passed.items()}
                        sch.stop_at, sch.ending = NEVER, ""
                    k = run.step
                elif sch.ending:
                    return sch.ending
        except BaseException:
            with sch.lock:
                sch.stop(run.step - 1, "error")  # nothing after the last commit goes on
            raise
        finally:
            drain()


def _one_at_a_time(sch: Scheduler, show: Callable[[], None]) -> str:
    while True:
        sch.run_step(Flight.of(sch, sch.run.step))
        show()
        if sch.ending == "restart":
            sch.stop_at, sch.ending = NEVER, ""
        elif sch.ending:
            return sch.ending


def _worth(sch: Scheduler) -> int:
    with sch.lock:
        return sch.worth(sch.run)


def _releaser(limit: InFlight, n: int) -> Callable[[Future], None]:
    return lambda _: limit.release(n)


def _outcome(fut: Future) -> BaseException | None:
    """Wait for a step (waking twice a second, so Ctrl-C is felt at once); its exception, if any."""
    while True:
        with contextlib.suppress(TimeoutError):
            return fut.exception(timeout=0.5)


