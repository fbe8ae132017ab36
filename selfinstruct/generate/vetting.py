"""What every candidate record passes before it is accepted, whatever recipe made it: quality scores and
their thresholds, decontamination (here), and the copy checks (selfinstruct.copies, applied by the recipes,
which know what their prompts showed). Then, once generation is done, the keep_top selection.

    gate = make_gate(cfg, prompts, teacher)     # loads the IFD model, the decontamination index, the judge
    gate.vet(cands, step.ask)                   # scores every candidate, sets its reason ("" keeps it)
    select_top(run_dir, cfg.quality.keep_top)   # generated.jsonl keeps the best fraction (journalled)

Reasons: `contaminated` (an n-gram of an evaluation item, decontam.py), `low_quality` (a score past a
threshold: quality.max_ifd, min_judge, min_quality; or outside the keep_top fraction). A dropped record keeps
its scores in rejected.jsonl, with `why`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfinstruct.config import Config, QualityConfig
from selfinstruct.decontam import NgramIndex
from selfinstruct.errors import UserError
from selfinstruct.generators import Completion, Generator, Request, make_generator, resolve_backend
from selfinstruct.generators.base import choice_mode
from selfinstruct.prompts import Prompts
from selfinstruct.records import json_line, prefix_facts, read_jsonl, write_atomic, write_json
from selfinstruct.roles import judge_config
from selfinstruct.scoring import IFDScorer, judge_requests, quality, read_judgements
from selfinstruct.seeds import Instance

Ask = Callable[[list[Request]], list[list[Completion]]]


@dataclass
class Candidate:
    """A record before it is accepted: its text, its scores, and why it is dropped ("" when it is not)."""

    instruction: str
    input: str
    output: str
    scores: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    why: str = ""

    @property
    def instance(self) -> Instance:
        return Instance(self.input, self.output)

    def rejection(self, stage: str, **extra: Any) -> dict[str, Any]:
        """The candidate as a rejected.jsonl row."""
        return {"stage": stage, "reason": self.reason, "instruction": self.instruction, "input": self.input,
                "output": self.output[:2000], "scores": self.scores, **({"why": self.why} if self.why else {}),
                **extra}


class Gate:
    """Scores and thresholds. `judge` None with "judge" among the scorers: the teacher judges, through the
    step's own requests (its in-flight limit, its response cache)."""

    def __init__(self, qcfg: QualityConfig, prompts: Prompts, ifd: IFDScorer | None = None,
                 judge: Generator | None = None, judge_mode: str = "", index: NgramIndex | None = None):
        self.q, self.prompts, self.ifd, self.judge, self.judge_mode, self.index = (
            qcfg, prompts, ifd, judge, judge_mode, index)
        self.lock = threading.Lock()  # one IFD forward pass at a time (steps score from worker threads)

    @property
    def active(self) -> bool:
        return bool(self.q.scorers) or self.index is not None

    def vet(self, cands: list[Candidate], ask: Ask) -> None:
        """Every candidate's scores, then its reason (contaminated, low_quality or "")."""
        if not cands or not self.active:
            return
        items = [(c.instruction, c.input, c.output) for c in cands]
        if "ifd" in self.q.scorers and self.ifd is not None:
            with self.lock:
                results = self.ifd.score(items)
            for c, r in zip(cands, results, strict=True):
                c.scores.update(ifd=r["ifd"], ifd_losses=[r["loss"], r["loss_alone"]])
        if "judge" in self.q.scorers:
            requests = judge_requests(self.prompts, items, self.q.judge_sampling)
            outs = self.judge.generate(requests) if self.judge is not None else ask(requests)
            for c, j in zip(cands, read_judgements(outs, self.judge_mode), strict=True):
                c.scores["judge"] = j
        for c in cands:
            q = quality(c.scores)
            if q is not None:
                c.scores["quality"] = q
            c.reason, c.why = self.verdict(c)

    def verdict(self, c: Candidate) -> tuple[str, str]:
        if self.index is not None:
            hit = self.index.hit([c.instruction, c.input, c.output])
            if hit is not None:
                return "contaminated", f"shares a {self.index.n}-gram (or a whole text) with {hit}"
        q, ifd = self.q, c.scores.get("ifd")
        if q.max_ifd is not None and ifd is not None and ifd >= q.max_ifd:
            return "low_quality", f"ifd {ifd} >= quality.max_ifd {q.max_ifd}"
        score = c.scores.get("judge", {}).get("score")
        if q.min_judge is not None and score is not None and score < q.min_judge:
            return "low_quality", f"judge score {score} < quality.min_judge {q.min_judge}"
        value = c.scores.get("quality")
        if q.min_quality is not None and value is not None and value < q.min_quality:
            return "low_quality", f"quality {value} < quality.min_quality {q.min_quality}"
        return "", ""

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()
        self.ifd = None


def make_gate(cfg: Config, prompts: Prompts) -> Gate:
    """The gate `cfg.quality` asks for; every model and file it needs is loaded now (a bad one fails before the
    run writes anything). A judge other than the teacher runs on the teacher's backend and servers; without one
    the caller sets `judge_mode` from the teacher."""
    q = dataclasses.replace(cfg.quality, scorers=list(cfg.quality.scorers or []))  # null: none (`run` sets its own)
    index = NgramIndex.from_paths(q.decontaminate, q.ngram) if q.decontaminate else None
    ifd = None
    if "ifd" in q.scorers:
        name = q.ifd_model or cfg.train.student
        ifd = IFDScorer(name, q.device, "auto", q.max_length, q.batch_size, cfg.teacher.trust_remote_code,
                        role="student" if q.ifd_model is None else "IFD")
    judge, mode = None, ""
    jcfg = judge_config(cfg)
    if "judge" in q.scorers and jcfg.model != cfg.teacher.model:
        if resolve_backend(jcfg.backend, jcfg.server.base_urls) == "vllm":
            raise UserError(f"the judge '{jcfg.model}' is not the teacher, and one process runs one in-process vLLM "
                            "engine: judge with the teacher (no --judge), serve the judge (--backend openai "
                            "--base-url ...), or score afterwards: selfinstruct score RUN --scorers judge --judge M")
        judge = make_generator(jcfg)
        mode = choice_mode(judge)
    return Gate(q, prompts, ifd, judge, mode, index)


# ---------------------------------------------------------------- keep_top, once generation is done

JOURNAL = "selection.json"


def select_top(run_dir: Path, keep_top: float) -> int:
    """Keep the best `keep_top` fraction of generated.jsonl by scores.quality (ties: the earlier record); the rest
    move to rejected.jsonl as low_quality. Written as a journal first, then applied, so a crash at any point
    is finished by the next call (or by restore on --resume). Returns how many were dropped."""
    state = json.loads((run_dir / "state.json").read_text(encoding="utf-8"))
    if keep_top >= 1 or state.get("selected"):
        return 0
    records = read_jsonl(run_dir / "generated.jsonl")
    keep = max(1, round(len(records) * keep_top)) if records else 0
    order = sorted(range(len(records)), key=lambda i: (-(records[i].get("scores", {}).get("quality") or 0.0), i))
    dropped = sorted(order[keep:])
    rows = [{"stage": "selection", "reason": "low_quality", "why": f"outside quality.keep_top {keep_top}",
             **{k: records[i][k] for k in ("id", "instruction", "input", "output", "scores")}} for i in dropped]
    write_json(run_dir / JOURNAL, {"rows": rows, "files": state["files"]})
    apply_journal(run_dir)
    return len(rows)


def apply_journal(run_dir: Path) -> None:
    """Finish a selection from its journal (idempotent): generated.jsonl without the dropped records, rejected.jsonl
    cut back to its size before the selection plus their rows, state.json's sizes and counts, the journal gone."""
    path = run_dir / JOURNAL
    if not path.exists():
        return
    journal = json.loads(path.read_text(encoding="utf-8"))
    ids = {r["id"] for r in journal["rows"]}
    kept = [r for r in read_jsonl(run_dir / "generated.jsonl") if r["id"] not in ids]
    write_atomic(run_dir / "generated.jsonl", "".join(json_line(r) for r in kept))
    rejected = run_dir / "rejected.jsonl"
    with rejected.open("r+b") as fh:
        fh.truncate(journal["files"]["rejected.jsonl"]["size"])
    with rejected.open("ab") as fh:
        fh.write("".join(json_line(r) for r in journal["rows"]).encode("utf-8"))
    state = json.loads((run_dir / "state.json").read_text(encoding="utf-8"))
    if not state.get("selected"):
        state["reasons"]["low_quality"] = state["reasons"].get("low_quality", 0) + len(journal["rows"])
    files = {name: prefix_facts(run_dir / name, (run_dir / name).stat().st_size)
             for name in ("generated.jsonl", "rejected.jsonl")}
    state.update(selected=True, files=files)
    write_json(run_dir / "state.json", state)
    path.unlink()
