"""Evol-Instruct (Xu et al., 2023, arXiv 2304.12244): in-depth and in-breadth evolution over M
rounds, with all four of the paper's elimination rules.

    STAGES         # one step, one batch of one evolution round, as plain functions (run.Stages)

Its state (EvolState, state.json's "evol"): the phase ("breadth": self-instruct+evol still running
Self-Instruct; "evolve"), the round and the next slot. The lineages (slots) are built once, on
entering the evolve phase (or on resuming in it), from the inputs and the evolutions already accepted.

Inputs: every distinct instruction of --seeds (any seed format, or a generate run's records), or, for
self-instruct+evol, what its Self-Instruct phase accepted; an Alpaca `input` is evolved with its instruction.

Each input owns a slot whose head is the newest instruction of its lineage. In every round each
slot gets one operation, drawn from `evol.weights` with an RNG seeded by (run seed, round, slot),
so the draw depends on neither batching nor resumes. A batch of slots:
1. rewrite: the operation's template -> teacher -> the evolved instruction;
2. cheap checks, before any more teacher calls: truncated or empty, rule 4 (it copies words of the
   evolution prompt), unchanged text (rule 1 without asking), the instruction filters, and ROUGE-L
   against the pool -- leaving out the slot's own lineage, since in-depth evolution is meant to
   stay close to its parent (rule 1 judges that) -- so near-copies of anything else are dropped;
3. one teacher call for all survivors: rule 1's Equal / Not Equal judgement against the parent,
   and the response to the evolved instruction;
4. rules 1-3 on the answers ("Equal"; "sorry" in a response under 80 words; a response of only
   punctuation and stop words). A survivor becomes a record and its slot's new head; an eliminated
   candidate leaves the ROUGE-L pool again (it is not in the dataset, so it blocks nothing).
A failed evolution leaves its slot as it was, so the parent goes back to the pool and is evolved
again next round with a fresh draw. Every elimination is written to rejected.jsonl with its
reason, operation, slot and round (rounds count from 1 in records and rejections). An unclear
judgement counts as "Not Equal" (counted as equality_unclear).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from selfinstruct.config import EVOL_OPERATIONS, Config, EvolConfig, EvolWeights
from selfinstruct.copies import instance_copy
from selfinstruct.dedup import normalise
from selfinstruct.filters import check_evolved_response, copies_prompt_words
from selfinstruct.generate import self_instruct
from selfinstruct.generate.parse import parse_equal, strip_echo
from selfinstruct.generate.run import NEVER, Ask, Run, Stages, Step, public, records_of_run, seeded
from selfinstruct.generate.vetting import Candidate
from selfinstruct.generators import Completion, Request
from selfinstruct.generators.base import choice_mode
from selfinstruct.records import Record, records_source, user_turn
from selfinstruct.seeds import Instance, SeedTask, load_tasks

T_OPS = {op: f"evol/{op}.jinja" for op in EVOL_OPERATIONS}
T_EQUAL = "evol/equal.jinja"
T_RESPONSE = "evol/response.jinja"
T_SYSTEM = "evol/system.jinja"  # WizardLM's system message, on the rewrite and response requests
TEMPLATES = {**{t: {"instruction": "Say hello."} for t in T_OPS.values()},
             T_EQUAL: {"first": "Say hello.", "second": "Say hello in French."}, T_RESPONSE: {"instruction": "Hi."},
             T_SYSTEM: {}}
EQUAL_CHOICES = ("Equal", "Not Equal")


@dataclass
class Slot:
    """One input's lineage. `ids`: the input's id, then each accepted evolution's (the last is the head)."""

    ids: list[str]
    root: str  # the input as first evolved (instruction + input)
    text: str  # the head, as it is sent for evolution
    ops: list[str] = field(default_factory=list)  # operation of each step; len = depth of the head
    texts: list[str] = field(default_factory=list)  # pool texts of the lineage (left out of ROUGE-L)

    def advance(self, record_id: str, op: str, text: str) -> None:
        self.ids.append(record_id)
        self.ops.append(op)
        self.texts.append(text)
        self.text = text


@dataclass
class EvolState:
    """Evol-Instruct's part of state.json. `slots` is not saved: it is rebuilt from the files (enter)."""

    KEY: ClassVar[str] = "evol"
    phase: str = "breadth"  # "breadth" (self-instruct+evol's Self-Instruct phase) or "evolve"
    round: int = 0  # rounds finished
    pos: int = 0  # the next slot of the current round
    first_step: int = 0  # the run's step that evolved the first batch (step k evolves batch k - first_step)
    slots: list[Slot] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "round": self.round, "pos": self.pos, "first_step": self.first_step}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvolState:
        return cls(**data)


def choose_operation(weights: EvolWeights, rng: random.Random) -> str:
    return rng.choices(EVOL_OPERATIONS, weights=[getattr(weights, op) for op in EVOL_OPERATIONS])[0]


def operation_for(cfg: Config, evol_round: int, slot: int) -> str:
    """The operation slot `slot` gets in round `evol_round` (0-based): reproducible from the run seed."""
    rng = random.Random(f"{cfg.generate.seed}-evol-op-{evol_round}-{slot}")
    return choose_operation(cfg.generate.evol.weights, rng)


def input_tasks(path: str | Path) -> list[SeedTask]:
    """What `--method evol` evolves: a generate run's accepted records, or any seed file or directory."""
    return load_tasks(records_source(path))


def make_slots(cfg: Config, tasks: list[SeedTask]) -> list[Slot]:
    """One slot per distinct instruction (with its first instance's input); a seeded sample of
    `evol.max_inputs` of them when set."""
    first: dict[str, SeedTask] = {}
    for t in tasks:
        first.setdefault(t.instruction, t)
    unique = list(first.values())
    m = cfg.generate.evol.max_inputs
    if m is not None and m < len(unique):
        picked = sorted(random.Random(f"{cfg.generate.seed}-evol-inputs").sample(range(len(unique)), m))
        unique = [unique[i] for i in picked]
    slots = []
    for t in unique:
        text = user_turn(t.instruction, t.instances[0].input if t.instances else "")
        slots.append(Slot(ids=[t.id], root=text, text=text, texts=[t.instruction]))
    return slots


def breadth_tasks(run: Run) -> list[SeedTask]:
    """self-instruct+evol's inputs: what its Self-Instruct phase accepted."""
    return [SeedTask(id=r["id"], instruction=r["instruction"], instances=[Instance(r["input"], r["output"])])
            for r in records_of_run(run) if not r["method"].startswith("evol:")]


def enter(run: Run, inputs: list[SeedTask]) -> EvolState:
    """Enter the evolve phase: one slot per input, advanced by the evolutions already accepted (a resume)."""
    st = run.state(EvolState)
    if st.phase != "evolve":
        st.first_step = run.step
    st.phase, st.slots = "evolve", make_slots(run.cfg, inputs)
    for r in records_of_run(run):
        if r["method"].startswith("evol:"):
            st.slots[r["lineage"]["slot"]].advance(r["id"], r["lineage"]["operations"][-1], r["instruction"])
    return st


def start(run: Run) -> None:
    """--method evol: evolve the inputs from the first step."""
    enter(run, run.seeds)


def start_combined(run: Run) -> None:
    """self-instruct+evol: a run resumed in its evolve phase rebuilds its lineages now."""
    if run.state(EvolState).phase == "evolve":
        enter(run, breadth_tasks(run))


def rewrite_requests(run: Run, slots: list[Slot], evol_round: int, start: int, end: int,
                     system: str) -> tuple[list[Request], list[str]]:
    """The rewrite requests of slots [start, end) in one round, and their operations."""
    ecfg = run.cfg.generate.evol
    rng = random.Random(f"{run.cfg.generate.seed}-evol-{evol_round}-{start}")
    ops = [operation_for(run.cfg, evol_round, k) for k in range(start, end)]
    requests = [Request(run.prompts.render(T_OPS[op], instruction=slots[k].text), seeded(ecfg.evolve_sampling, rng),
                        system=system) for k, op in zip(range(start, end), ops, strict=True)]
    return requests, ops


def screen(run: Run, slot: Slot, text: str, truncated: bool) -> tuple[str, dict[str, Any]]:
    """The checks that need no teacher; '' when the evolution passes (and then joins the pool)."""
    if truncated:
        return "truncated_evolution", {}
    if not text:
        return "empty_evolution", {}
    if copies_prompt_words(text, run.cfg.generate.evol.copy_phrases):
        return "copies_prompt_words", {}
    if normalise(text) == normalise(slot.text):
        return "no_information_gain", {}
    lineage = {run.pool.first_index[t] for t in slot.texts if t in run.pool.first_index}
    # WizardLM's rules only, not Self-Instruct's filters; no target cap: every evolution is attempted.
    ok, reason, extra = run.screen(text, None, lineage, instruction_filters=False)
    return ("" if ok else reason), extra


def batches(run: Run, n_slots: int) -> int:
    """Batches per round (a step evolves one batch of slots)."""
    return -(-n_slots // run.cfg.generate.evol.batch_size)


@dataclass
class Work:
    """One step's work: batch [start, end) of round r (no slots at all: nothing to evolve), then what each stage
    made of it."""

    requests: list[Request] = field(default_factory=list)
    r: int = 0  # the round, and the batch's slots [start, end)
    start: int = 0
    end: int = 0
    ops: list[str] = field(default_factory=list)
    system: str = ""
    outs: list[list[Completion]] = field(default_factory=list)
    cands: list[tuple[int, str, str, dict[str, Any]]] = field(default_factory=list)  # screened rewrites
    results: list[tuple[bool | None, Candidate]] = field(default_factory=list)  # rule 1's verdict, the candidate
    judgements: list[list[Completion]] = field(default_factory=list)
    responses: list[list[Completion]] = field(default_factory=list)


def round_and_batch(run: Run, k: int) -> tuple[int, int]:
    st = run.state(EvolState)  # step k evolves batch b of round r
    return divmod(k - st.first_step, batches(run, len(st.slots)))


def reads(run: Run, k: int) -> float:
    """A batch's rewrites need only its own slots' previous round, so the rewrites of many batches (and of the
    next round) are in flight at once. A step past the last round waits to be cancelled (NEVER)."""
    slots = run.state(EvolState).slots
    if not slots:
        return -math.inf
    return NEVER if round_and_batch(run, k)[0] >= run.cfg.generate.evol.rounds else k - batches(run, len(slots))


def prepare(run: Run, s: Step) -> Work:
    """1. The rewrite requests of this step's batch, from its slots' heads after the previous round."""
    slots = run.state(EvolState).slots
    if not slots:
        return Work()
    bs = run.cfg.generate.evol.batch_size
    r, b = round_and_batch(run, s.k)
    start, end = b * bs, min(b * bs + bs, len(slots))
    system = run.prompts.render(T_SYSTEM).strip()
    requests, ops = rewrite_requests(run, slots, r, start, end, system)
    return Work(requests, r, start, end, ops, system)


def take(run: Run, s: Step, w: Work, outs: list[list[Completion]]) -> None:
    if not w.requests:  # no slots: nothing was asked
        return
    s.counts["requests/evolve"] += len(w.requests)
    s.counts["candidates"] += len(w.requests)
    w.outs = outs


def screen_after(run: Run, s: Step, w: Work) -> float:
    return s.k - 1  # the batch before has committed: its eliminations left the pool, as step by step


def screen_step(run: Run, s: Step, w: Work) -> None:
    """2. The cheap checks and ROUGE-L."""
    if w.requests:
        w.cands = screen_rewrites(run, s, w.r, w.start, w.end, w.ops, w.outs)


def expand(run: Run, s: Step, w: Work, ask: Ask) -> list[Candidate]:
    """3-4. One teacher call for all survivors (rule 1's Equal / Not Equal, the response); rules 1-3."""
    ecfg, slots = run.cfg.generate.evol, run.state(EvolState).slots
    if not w.requests:
        return []
    rng = random.Random(f"{run.cfg.generate.seed}-evol-{w.r}-{w.start}-answers")
    asks = [Request(run.prompts.render(T_EQUAL, first=slots[k].text, second=text), seeded(ecfg.equality_sampling, rng),
                    choices=EQUAL_CHOICES) for k, _, text, _ in w.cands]
    asks += [Request(run.prompts.render(T_RESPONSE, instruction=text), seeded(ecfg.response_sampling, rng),
                     system=w.system) for _, _, text, _ in w.cands]
    answers = ask(asks)
    n = len(w.cands)
    s.counts["requests/equality"] += n
    s.counts["requests/response"] += n
    w.judgements, w.responses = answers[:n], answers[n:]
    w.results = [answered_candidate(ecfg, text, judged[0], resp[0])
                 for (_, _, text, _), judged, resp in zip(w.cands, w.judgements, w.responses, strict=True)]
    s.counts["equality_unclear"] += sum(equal is None for equal, _ in w.results)
    return [c for _, c in w.results if not c.reason]


def commit(run: Run, s: Step, w: Work) -> None:
    """5. In step order: records, new slot heads, the round's progress."""
    st = run.state(EvolState)
    if not st.slots:
        st.round = run.cfg.generate.evol.rounds
        return
    answered = commit_evolutions(run, s, w.r, w.cands, w.results, w.judgements)
    s.alert("respond", answered, [a[0].text for a in w.responses])
    s.counts["evolved"] += len(s.records)
    st.round, st.pos = (w.r + 1, 0) if w.end >= len(st.slots) else (w.r, w.end)


def screen_rewrites(run: Run, s: Step, r: int, start: int, end: int, ops: list[str],
                    outs: list[list[Completion]]) -> list[tuple[int, str, str, dict[str, Any]]]:
    """Slots start..end's rewrites in round r, checked and screened against the pool (under the run's lock, after
    the batch before committed); the kept ones (slot, operation, text, extra)."""
    slots = run.state(EvolState).slots
    cands: list[tuple[int, str, str, dict[str, Any]]] = []
    outcomes: list[str] = []
    for k, op, out in zip(range(start, end), ops, outs, strict=True):
        c = out[0]
        text = strip_echo(c.text)  # a chat teacher's "#Rewritten Prompt#:" before its rewrite is no rewrite
        reason, extra = screen(run, slots[k], text, c.finish_reason == "length")
        if reason:
            s.reject([{"stage": "evol", "reason": reason, "operation": op, "evol_round": r + 1, "slot": k,
                       "parent": slots[k].ids[-1], "instruction": text, **extra}])
        else:
            cands.append((k, op, text, extra))
        outcomes.append(reason if c.text.strip() else "empty_reply")
    s.alert("evolve", outcomes, [o[0].text for o in outs])
    return cands


def answered_candidate(ecfg: EvolConfig, text: str, judged: Completion,
                       resp: Completion) -> tuple[bool | None, Candidate]:
    """Rule 1's verdict on an evolution, and the evolution as a candidate record whose reason is the first of rules
    1-3 (or a response that only repeats the instruction) it fails."""
    equal = parse_equal(judged.text)
    c = Candidate(text, "", resp.text.strip())
    if equal:
        c.reason = "no_information_gain"
    elif resp.finish_reason == "length":
        c.reason = "truncated_response"
    else:
        c.reason = check_evolved_response(resp.text, ecfg.sorry_max_words)[1] or instance_copy(c.instance, [], text)
    return equal, c


def commit_evolutions(run: Run, s: Step, r: int, cands: list[tuple[int, str, str, dict[str, Any]]],
                      results: list[tuple[bool | None, Candidate]], judgements: list[list[Completion]]) -> list[str]:
    """In step order: each surviving evolution becomes a record and its slot's new head; an eliminated one leaves
    the ROUGE-L pool again (it is not in the dataset, so it blocks nothing: a retry may pass). Returns, per
    candidate, "" or why it was eliminated."""
    ecfg, slots = run.cfg.generate.evol, run.state(EvolState).slots
    mode = choice_mode(run.teacher)
    sampling = {"evolve": public(ecfg.evolve_sampling), "response": public(ecfg.response_sampling)}
    answered = []
    for (k, op, text, extra), (equal, c), judged in zip(cands, results, judgements, strict=True):
        slot = slots[k]
        if not s.admit(run, c, "evol", operation=op, evol_round=r + 1, slot=k, parent=slot.ids[-1],
                       judgement=judged[0].text[:200]):
            run.pool.retire(extra["pool_index"])
            answered.append(c.reason)
            continue
        answered.append("")
        rec = Record(
            id=run.next_id(), instruction=text, output=c.output, method=f"evol:{op}", round=run.round,
            parents=[slot.ids[-1]], teacher=run.teacher.name,
            template=f"{run.prompts.template_id(T_OPS[op])}+{run.prompts.template_id(T_RESPONSE)}",
            sampling=sampling, scores={"rouge_max": extra["rouge_max"], "judged_equal": equal,
                                       "equality_mode": mode, **c.scores},
            lineage={"depth": len(slot.ops) + 1, "operations": [*slot.ops, op], "chain": list(slot.ids),
                     "slot": k, "evol_round": r + 1})
        s.records.append(rec)
        slot.advance(rec.id, op, text)
        run.machine.append((text, rec.id))
    return answered


def evolving(run: Run) -> bool:
    return run.state(EvolState).phase == "evolve"


def done(run: Run) -> bool:
    st = run.state(EvolState)
    return st.phase == "evolve" and st.round >= run.cfg.generate.evol.rounds


def progress(run: Run) -> tuple[str, int, int]:
    """(what, done, total) for the progress bar."""
    st = run.state(EvolState)
    if st.phase == "breadth":
        return "instructions", run.accepted_instructions, run.cfg.generate.num_instructions
    n = len(st.slots)
    return "evolutions", st.round * n + st.pos, run.cfg.generate.evol.rounds * n


STAGES: Stages[Work] = Stages(prepare=prepare, requests=lambda w: w.requests, take=take, commit=commit,
                              reads=reads, screen=screen_step, screen_after=screen_after, expand=expand)


def combined_stages(run: Run) -> Stages:
    """self-instruct+evol: Self-Instruct until num_instructions are accepted, then evolve them. The step
    that reaches the target enters the evolve phase as it commits, and the steps after it start afresh."""
    return STAGES if run.state(EvolState).phase == "evolve" else BREADTH


def _maybe_enter(run: Run, s: Step) -> bool:
    if run.target_reached:
        enter(run, breadth_tasks(run))
        return True
    return False


BREADTH = self_instruct.with_committed(_maybe_enter)


def stats(run: Run, records: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> dict[str, Any]:
    """stats.json's "evol" section (a run stopped in its breadth phase counts what it would have evolved)."""
    from selfinstruct.stats import evol_stats

    st = run.state(EvolState)
    slots = st.slots if st.slots is not None else make_slots(run.cfg, breadth_tasks(run))
    return {"evol": evol_stats(records, rejected, [s.root for s in slots], run.cfg.generate.evol.rounds)}
