"""Alpaca-style generation (Taori et al., 2023; tatsu-lab/stanford_alpaca), one step at a time.

    STAGES         # one step as plain functions (run.Stages); scheduler.py runs several steps at once

A step: `request_batch_size` prompts, each showing 3 seed tasks (instruction, input, output;
drawn with a seeded RNG from the seeds only, as the original does) and asking for 20 tasks; the
teacher continues the list at item 4, temperature 1.0, stopping before item 20. Each parsed task
goes through the instance checks (empty output, input equal to output), the copy checks (a demonstration's
instruction, input or output; the task echoed), the same instruction filters and ROUGE-L pool as
Self-Instruct, the quality gate (vetting.py) and the shared-instance check. No separate classification or
instance requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from selfinstruct.copies import copies, instance_copy
from selfinstruct.filters import check_instance, check_instruction
from selfinstruct.generate.alerts import dominant
from selfinstruct.generate.parse import parse_alpaca, parse_alpaca_json, tasks_schema
from selfinstruct.generate.run import Ask, Run, Stages, Step, public
from selfinstruct.generate.self_instruct import demo_text, list_request
from selfinstruct.generate.vetting import Candidate
from selfinstruct.generators import Completion, Request
from selfinstruct.records import Record
from selfinstruct.seeds import Instance, SeedTask

T_ALPACA = "alpaca/prompt.jinja"
T_REPLY = "alpaca/prompt_reply.jinja"  # how a chat teacher's reply begins (prefilled): the next task's number
TEMPLATES = {T_ALPACA: {"num_tasks": 20, "json": False, "demos": [{"instruction": "Say hello.", "input": "<noinput>",
                                                                   "output": "Hello."}] * 3}, T_REPLY: {"n": 4}}


def task_requests(run: Run, step_no: int) -> tuple[list[Request], list[list[SeedTask]]]:
    """Step `step_no`'s requests (3 seed demos each) and their demos; seeded per step."""
    cfg, acfg = run.cfg.generate, run.cfg.generate.alpaca
    rng = random.Random(f"{cfg.seed}-{step_no}")
    n_demos = min(acfg.num_prompt_instructions, len(run.seeds))
    stop = list(acfg.sampling.stop) + [f"\n{acfg.num_tasks}", f"{acfg.num_tasks}."]
    schema = tasks_schema(max(1, acfg.num_tasks - n_demos - 1)) if cfg.list_format == "json" else None
    requests, shown = [], []
    for _ in range(cfg.request_batch_size):
        tasks = rng.sample(run.seeds, n_demos)
        demos = [{"instruction": demo_text(t.instruction), "input": t.instances[0].input or "<noinput>",
                  "output": t.instances[0].output} for t in tasks]
        prompt = run.prompts.render(T_ALPACA, num_tasks=acfg.num_tasks, demos=demos, json=schema is not None)
        requests.append(list_request(prompt, acfg.sampling, rng, schema, stop,
                                     run.prompts.render(T_REPLY, n=n_demos + 1)))
        shown.append(tasks)
    return requests, shown


def screen_cheaply(run: Run, shown: list[SeedTask], instruction: str, inst: Instance) -> Candidate:
    """The checks that need neither the pool nor the order of steps: the instance filters, copies of the
    demonstrations (and of the task itself), the instruction filters. A failure is the candidate's reason."""
    c = Candidate(instruction, inst.input, inst.output)
    demos = [t.instances[0] for t in shown]
    ok, c.reason = check_instance(inst)
    if ok and copies(instruction, [demo_text(t.instruction) for t in shown]):
        c.reason = "copies_demo"
    c.reason = c.reason or instance_copy(inst, demos, instruction)
    if not c.reason:
        c.reason = check_instruction(instruction, run.cfg.filters)[1]
    return c


@dataclass
class Work:
    """One step's work: its requests (their requests depend on the seeds only, so any number of steps are in
    flight at once), then each reply's candidates."""

    requests: list[Request]
    shown: list[list[SeedTask]]  # each request's demos
    parsed: list = field(default_factory=list)  # per reply: (parent ids, reply, candidates, unparsed items)


def prepare(run: Run, s: Step) -> Work:
    return Work(*task_requests(run, s.k))


def take(run: Run, s: Step, w: Work, outs: list[list[Completion]]) -> None:
    """Each reply parsed into tasks, each task through the checks that need neither the pool nor the order."""
    n_demos = min(run.cfg.generate.alpaca.num_prompt_instructions, len(run.seeds))
    s.counts["requests/tasks"] += len(w.requests)
    s.stall = len(w.requests)
    json_mode = run.cfg.generate.list_format == "json"
    for completions, demos in zip(outs, w.shown, strict=True):
        for c in completions:
            tasks, dropped = (parse_alpaca_json(c.text, c.finish_reason == "length") if json_mode else
                              parse_alpaca(c.text, n_demos + 1, c.finish_reason == "length"))
            cands = [screen_cheaply(run, demos, i, inst) for i, inst in tasks]
            w.parsed.append(([t.id for t in demos], c, cands, dropped))


def expand(run: Run, s: Step, w: Work, ask: Ask) -> list[Candidate]:
    """No more requests: the candidates that passed the cheap checks go to the quality gate."""
    return [c for *_, cands, _ in w.parsed for c in cands if not c.reason]


def commit(run: Run, s: Step, w: Work) -> None:
    """In step order: the pool, the target cap and shared instances decide; the survivors become records."""
    template, sampling = run.prompts.template_id(T_ALPACA), {"task": public(run.cfg.generate.alpaca.sampling)}
    outcomes, replies = [], []  # per reply: "" when it gave a record, else why not
    for par, c, cands, dropped in w.parsed:
        s.reject([{"stage": "task", "reason": r, "raw": t[:2000]} for t, r in dropped])
        reasons, kept_before = [r for _, r in dropped], len(s.records)
        for cand in cands:
            s.counts["candidates"] += 1
            if not accept(run, s, cand):
                reasons.append(cand.reason)
                continue
            s.records.append(Record(
                id=run.next_id(), instruction=cand.instruction, input=cand.input, output=cand.output,
                method="alpaca", round=run.round, parents=par, teacher=run.teacher.name,
                template=template, sampling=sampling,
                scores={"list_format": run.cfg.generate.list_format, **cand.scores}))
        failed = dominant(reasons) if c.text.strip() else "empty_reply"
        outcomes.append("" if len(s.records) > kept_before else failed)
        replies.append(c.text)
    s.alert("tasks", outcomes, replies)
    for r in s.records:
        run.machine.append((r.instruction, r.id))


def accept(run: Run, s: Step, cand: Candidate) -> bool:
    """In step order: a candidate's own reason, then ROUGE-L against the pool and the target cap (a kept
    instruction enters the pool), then a shared instance. Rejections are written with their reason."""
    if cand.reason:
        s.reject([cand.rejection("task")])
        return False
    ok, cand.reason, extra = run.screen(cand.instruction, len(s.records))
    if not ok:
        s.reject([cand.rejection("task", **extra)])
        return False
    cand.scores["rouge_max"] = extra["rouge_max"]
    return s.admit(run, cand, "task", in_pool=True)  # a shared instance: its instruction stays in the pool


STAGES: Stages[Work] = Stages(prepare=prepare, requests=lambda w: w.requests, take=take, commit=commit,
                              expand=expand)
