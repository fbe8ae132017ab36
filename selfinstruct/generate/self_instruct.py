"""Self-Instruct (Wang et al., 2023, arXiv 2212.10560), one step at a time.

    STAGES         # one step as plain functions (run.Stages); scheduler.py runs several steps at once

A step: `request_batch_size` prompts of 8 demo instructions (6 human + 2 machine, seeded draw)
-> the teacher continues each numbered list -> parse -> a copy of a demo? -> filters -> ROUGE-L against the
pool -> "is it classification?" -> instances, output-first for classification (asked again input-first when
the reply shows one class label), input-first otherwise -> instance clean-up and copy checks -> quality
scores and decontamination (vetting.py) -> shared instances -> records. Every dropped item is written to
rejected.jsonl with its reason.

Steps in flight: step k's machine demos come from the instructions accepted by steps up to k - 1 - lag
(lag = max(1, steps in flight - 1): `reads`), so its lists can be generated while earlier steps are still
answering; with one or two steps in flight that is "accepted before the previous step finished",
exactly the step-by-step order. Screening runs in step order against the pool every earlier step
screened; the target cap needs the earlier steps' records only when they could reach it (`screen_after`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from selfinstruct.config import Sampling
from selfinstruct.copies import copies, instance_copy
from selfinstruct.dedup import normalise
from selfinstruct.filters import clean_instances
from selfinstruct.generate.alerts import dominant
from selfinstruct.generate.parse import (
    demo_instances,
    instructions_schema,
    parse_instances,
    parse_instructions,
    parse_instructions_json,
    parse_yes_no,
)
from selfinstruct.generate.run import Ask, Run, Stages, Step, public, seeded
from selfinstruct.generate.vetting import Candidate
from selfinstruct.generators import Completion, Request
from selfinstruct.generators.base import choice_mode
from selfinstruct.records import Record

T_INSTRUCTIONS = "self_instruct/instructions.jinja"
T_CLASSIFY = "self_instruct/is_classification.jinja"
T_INPUT_FIRST = "self_instruct/instances_input_first.jinja"
T_OUTPUT_FIRST = "self_instruct/instances_output_first.jinja"
# How a chat teacher's reply begins, per stage (prefilled): the format starts at once, nothing to restate.
REPLY = {T_INSTRUCTIONS: "self_instruct/instructions_reply.jinja",
         T_INPUT_FIRST: "self_instruct/instances_input_first_reply.jinja",
         T_OUTPUT_FIRST: "self_instruct/instances_output_first_reply.jinja"}
YES_NO = ("Yes", "No")
LIST_END = 16  # the original's lists stop before item 16 (instruction_sampling's stop strings)
_TASK = {"instruction": "Sort the words alphabetically."}
TEMPLATES = {T_INSTRUCTIONS: {"instructions": ["Say hello.", "Add two numbers."], "json": False, "max_items": 7},
             T_CLASSIFY: _TASK,
             T_INPUT_FIRST: _TASK, T_OUTPUT_FIRST: _TASK, REPLY[T_INSTRUCTIONS]: {"n": 3},
             REPLY[T_INPUT_FIRST]: {}, REPLY[T_OUTPUT_FIRST]: {}}


@dataclass
class SelfInstructState:
    """`sizes`: machine instructions accepted once step j committed (recent steps, for the demos of the steps
    after them). `pending`: instructions that passed screening in steps not yet committed (not saved: a
    resumed run has none)."""

    KEY: ClassVar[str] = "self_instruct"
    sizes: dict[str, int] = field(default_factory=dict)
    pending: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"sizes": self.sizes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SelfInstructState:
        return cls(sizes=dict(data.get("sizes", {})))

    def demos(self, k: int, lag: int) -> int:
        """How many machine instructions step k's prompts may show."""
        return self.sizes.get(str(k - 1 - lag), 0)

    def committed(self, k: int, size: int, lag: int) -> None:
        self.sizes[str(k)] = size
        for j in [j for j in self.sizes if int(j) < k - lag - 1]:
            del self.sizes[j]


def demo_lag(run: Run) -> int:
    """How many steps before step k-1 the demos of step k stop (1: the step-by-step order)."""
    return max(1, run.depth - 1)


def sample_demos(rng: random.Random, human: list[tuple[str, str]], machine: list[tuple[str, str]],
                 k: int, k_machine: int) -> list[tuple[str, str]]:
    """k demos: up to k_machine machine-generated ones, the rest human, in random order."""
    picked = rng.sample(machine, min(k_machine, len(machine)))
    picked += rng.sample(human, min(k - len(picked), len(human)))
    rng.shuffle(picked)
    return picked


def demo_text(instruction: str) -> str:
    """A demonstration as the original code shows it: whitespace collapsed, no trailing colon."""
    return re.sub(r"\s+", " ", instruction).strip().rstrip(":")


def list_request(prompt: str, sampling: Sampling, rng: random.Random, schema: dict | None, stop: list[str],
                 prefill: str) -> Request:
    """A list stage's request (instruction lists, Alpaca's task lists): with a `schema` (list_format json) it
    asks for JSON of it, with no prefill and no stop strings (the schema shapes the whole reply); without,
    the numbered list continues from `prefill` until a `stop` string."""
    if schema is not None:
        return Request(prompt, seeded(sampling, rng, stop=[]), json_schema=schema)
    return Request(prompt, seeded(sampling, rng, stop=stop), prefill=prefill)


def instruction_requests(run: Run, step_no: int, n_machine: int) -> tuple[random.Random, list[Request],
                                                                          list[list[tuple[str, str]]]]:
    """Step `step_no`'s instruction-generation requests (showing up to the first `n_machine` machine
    instructions) and their demos (text, id), and the step's RNG (one stream per step: a resumed run, or one
    with several steps in flight, draws exactly the same)."""
    cfg = run.cfg.generate
    rng = random.Random(f"{cfg.seed}-{step_no}")
    human = [(s.instruction, s.id) for s in run.seeds]
    machine = run.machine[:n_machine]
    json_mode = cfg.list_format == "json"
    requests, parents = [], []
    for _ in range(cfg.request_batch_size):
        demos = sample_demos(rng, human, machine, cfg.num_prompt_instructions, cfg.num_machine_demos)
        max_items = max(1, LIST_END - 1 - len(demos))
        prompt = run.prompts.render(T_INSTRUCTIONS, instructions=[demo_text(t) for t, _ in demos], json=json_mode,
                        max_items=max_items)
        requests.append(list_request(prompt, cfg.instruction_sampling, rng,
                                     instructions_schema(max_items) if json_mode else None,
                                     cfg.instruction_sampling.stop,
                                     run.prompts.render(REPLY[T_INSTRUCTIONS], n=len(demos) + 1)))
        parents.append(demos)
    return rng, requests, parents


@dataclass
class Work:
    """One step's work: its requests and RNG, then what each stage made of them."""

    requests: list[Request]
    rng: random.Random
    parents: list[list[tuple[str, str]]]  # each request's demos (text, id)
    parsed: list = field(default_factory=list)  # per reply: (parent ids, demo texts, reply, items, dropped)
    fresh: list[tuple[str, list[str], float]] = field(default_factory=list)  # screened: (text, parents, ROUGE-L)
    tasks: list = field(default_factory=list)  # (instruction, parents, ROUGE-L, classification?, candidates)


def reads(run: Run, k: int) -> float:
    """Step k's lists show the machine instructions accepted as of step k-1-lag's commit."""
    return k - 1 - demo_lag(run)


def prepare(run: Run, s: Step) -> Work:
    """1. New instructions from numbered lists of demos."""
    rng, requests, parents = instruction_requests(run, s.k, run.state(SelfInstructState).demos(s.k, demo_lag(run)))
    return Work(requests, rng, parents)


def take(run: Run, s: Step, w: Work, outs: list[list[Completion]]) -> None:
    """2a. Each reply parsed into a list of instructions."""
    s.counts["requests/instructions"] += len(w.requests)
    s.stall = len(w.requests)
    parse = parse_instructions_json if run.cfg.generate.list_format == "json" else parse_instructions
    w.parsed = [([i for _, i in demos], [t for t, _ in demos], c, *parse(c.text, c.finish_reason == "length"))
                for completions, demos in zip(outs, w.parents, strict=True) for c in completions]


def screen_after(run: Run, s: Step, w: Work) -> float:
    """The target cap needs the earlier steps' records only when they could reach the target."""
    pending = run.state(SelfInstructState).pending
    could = run.accepted_instructions + pending + sum(len(p[3]) for p in w.parsed)
    return s.k - 1 if could >= run.cfg.generate.num_instructions else -math.inf


def screen_step(run: Run, s: Step, w: Work) -> None:
    """2b. Copies of a demo, the filters, near-duplicates of the pool (which grows as we accept)."""
    w.fresh = screen(run, s, w.parsed)
    run.state(SelfInstructState).pending += len(w.fresh)


def expand(run: Run, s: Step, w: Work, ask: Ask) -> list[Candidate]:
    """3-4. Classification or not, then instances: the candidates the quality gate scores."""
    w.tasks = instances(run, s, w.fresh, w.rng, ask)
    return [c for *_, cands in w.tasks for c in cands]


def commit_step(run: Run, s: Step, w: Work) -> None:
    """5. Records (their ids, the machine demos of later steps, the target)."""
    st = run.state(SelfInstructState)
    commit(run, s, w.tasks)
    st.pending -= len(w.fresh)
    st.committed(s.k, len(run.machine), demo_lag(run))


def screen(run: Run, s: Step, parsed: list) -> list[tuple[str, list[str], float]]:
    """In the "screen" section: each parsed reply's instructions, a demo's copy, filtered, against the pool;
    the kept ones (instruction, parent ids, ROUGE-L to the nearest)."""
    fresh: list[tuple[str, list[str], float]] = []
    outcomes, replies = [], []  # per reply: "" when it gave a new instruction, else why not
    for par, shown, c, items, dropped in parsed:
        s.reject([{"stage": "instruction", "reason": r, "instruction": t} for t, r in dropped])
        reasons = [r for _, r in dropped]
        kept_before = len(fresh)
        for item in items:
            s.counts["candidates"] += 1
            ok, reason, extra = (False, "copies_demo", {}) if copies(item, shown) else run.screen(item, len(fresh))
            if ok:
                fresh.append((item, par, extra["rouge_max"]))
            else:
                reasons.append(reason)
                s.reject([{"stage": "instruction", "reason": reason, "instruction": item, **extra}])
        outcomes.append("" if len(fresh) > kept_before else
                        dominant(reasons) if c.text.strip() else "empty_reply")
        replies.append(c.text)
    s.alert("instructions", outcomes, replies)
    return fresh


def instances(run: Run, s: Step, fresh: list[tuple[str, list[str], float]], rng: random.Random, ask: Ask) -> list:
    """Classification or not (output-first vs input-first instances), then the instances of each task. A
    "classification" whose reply shows one class label was no classification (a weak teacher answers Yes to
    most tasks): it is asked again, input-first."""
    cfg = run.cfg.generate
    answers = ask(  # a choice of Yes / No where the backend can enforce one
        [Request(run.prompts.render(T_CLASSIFY, instruction=i), seeded(cfg.classify_sampling, rng), choices=YES_NO)
         for i, _, _ in fresh])
    s.counts["requests/classify"] += len(fresh)
    verdicts = [parse_yes_no(a[0].text) for a in answers]
    for v in verdicts:
        s.counts["classify_unclear" if v is None else ("classification" if v else "generation")] += 1
    is_clf = [bool(v) for v in verdicts]
    s.alert("classify", ["classify_unclear" if v is None else "" for v in verdicts], [a[0].text for a in answers])

    inst_outs = ask(instance_requests(run, [i for i, _, _ in fresh], is_clf, rng))
    s.counts["requests/instances"] += len(fresh)
    redo = [k for k, clf in enumerate(is_clf) if clf and one_label(inst_outs[k][0].text)]
    if redo:
        again = ask(instance_requests(run, [fresh[k][0] for k in redo], [False] * len(redo), rng))
        s.counts["requests/instances"] += len(redo)
        s.counts["reclassified"] += len(redo)
        for k, out in zip(redo, again, strict=True):
            inst_outs[k], is_clf[k] = out, False
    return instance_candidates(run, s, fresh, is_clf, inst_outs)


def commit(run: Run, s: Step, tasks: list) -> None:
    """In the "commit" section: the records of each task whose instances survive (shared instances and vetted
    reasons out), and the task into the machine demos."""
    cfg = run.cfg.generate
    mode = choice_mode(run.teacher)
    t_instr = run.prompts.template_id(T_INSTRUCTIONS)
    templates = {clf: f"{t_instr}+{run.prompts.template_id(T_OUTPUT_FIRST if clf else T_INPUT_FIRST)}"
                 for clf in (False, True)}
    sampling = {"instruction": public(cfg.instruction_sampling), "instance": public(cfg.instance_sampling)}
    for instr, par, score, clf, cands in tasks:
        kept = [c for c in cands if s.admit(run, c, "instance")]
        if not kept:
            s.reject([{"stage": "task", "reason": "no_valid_instances", "instruction": instr, "in_pool": True}])
            continue
        for c in kept:
            s.records.append(Record(
                id=run.next_id(), instruction=instr, input=c.input, output=c.output,
                method="self-instruct", round=run.round, parents=par, teacher=run.teacher.name,
                template=templates[clf], sampling=sampling,
                scores={"rouge_max": round(score, 4), "is_classification": clf, "classification_mode": mode,
                        "list_format": cfg.list_format, **c.scores}))
        run.machine.append((instr, s.records[-len(kept)].id))


def instance_requests(run: Run, instructions: list[str], is_clf: list[bool], rng: random.Random) -> list[Request]:
    """Instance generation, output-first for classification tasks, input-first otherwise (greedy)."""
    cfg = run.cfg.generate
    stop = list(cfg.instance_sampling.stop) + [f"Example {cfg.max_instances + 1}"]
    return [Request(run.prompts.render(t, instruction=i), seeded(cfg.instance_sampling, rng, stop=stop),
                    prefill=run.prompts.render(REPLY[t]))
            for i, clf in zip(instructions, is_clf, strict=True) for t in [T_OUTPUT_FIRST if clf else T_INPUT_FIRST]]


def one_label(reply: str) -> bool:
    """An output-first reply whose instances all carry one class label."""
    return len({normalise(i.output) for i in parse_instances(reply, True)}) == 1


def instance_candidates(run: Run, s: Step, fresh: list[tuple[str, list[str], float]], is_clf: list[bool],
                        inst_outs: list[list[Completion]]) -> list[tuple[str, list[str], float, bool, list[Candidate]]]:
    """Each task's instances from its reply: parsed, cleaned (Self-Instruct's instance filters) and checked for
    copies of the prompt's demonstrations and of the task itself; a classification task must show two class
    labels at least (output-first asks for an input per label: one label means the task was no classification,
    and its "instances" are a label under whatever text). A task left with no instance is rejected."""
    demos = {clf: demo_instances(run.prompts.render(T_OUTPUT_FIRST if clf else T_INPUT_FIRST, instruction=""), clf)
             for clf in (False, True)}
    tasks, outcomes = [], []
    for (instr, par, score), clf, out in zip(fresh, is_clf, inst_outs, strict=True):
        c = out[0]
        instances = parse_instances(c.text, clf)
        parsed_n = len(instances)
        if c.finish_reason == "length" and instances:
            lost = instances.pop()
            s.reject([{"stage": "instance", "reason": "truncated", "instruction": instr,
                       "input": lost.input, "output": lost.output}])
        kept, dropped = clean_instances(instances, run.cfg.generate.max_instances)
        copied = [(i, instance_copy(i, demos[clf], instr)) for i in kept]
        dropped += [(i, why) for i, why in copied if why]
        kept = [i for i, why in copied if not why]
        if clf and len({normalise(i.output) for i in kept}) == 1:  # one label: not a classification after all
            dropped += [(i, "one_class_label") for i in kept]
            kept = []
        s.reject([{"stage": "instance", "reason": r, "instruction": instr, "input": d.input, "output": d.output}
                  for d, r in dropped])
        if not kept:  # unformatted: the reply held no example at all (a refusal, prose, nothing)
            reason = "no_valid_instances" if parsed_n else "unformatted_instances"
            s.reject([{"stage": "task", "reason": reason, "instruction": instr, "raw": c.text[:2000], "in_pool": True}])
            outcomes.append(dominant([r for _, r in dropped]) if dropped else
                            reason if c.text.strip() else "empty_reply")
            continue
        outcomes.append("")
        tasks.append((instr, par, score, clf, [Candidate(instr, i.input, i.output) for i in kept]))
    s.alert("instances", outcomes, [o[0].text for o in inst_outs])
    return tasks


STAGES: Stages[Work] = Stages(prepare=prepare, requests=lambda w: w.requests, take=take, commit=commit_step,
                              reads=reads, screen=screen_step, screen_after=screen_after, expand=expand)


def with_committed(hook: Callable[[Run, Step], bool]) -> Stages[Work]:
    """Self-Instruct's stages with a hook after each commit (self-instruct+evol's change of phase)."""
    return dataclasses.replace(STAGES, committed=hook)
