"""`selfinstruct score DATA`: quality scores, selection and decontamination of any data, and the audit.

    score_data(cfg, "outputs/run", ["ifd", "judge"], out=None, sample=200)

DATA is anything `train` reads: a generate run directory (its generated.jsonl), an Alpaca JSON / JSONL file,
a Self-Instruct seed file (one scored row per instance), a chat JSONL file (the first user turn is the
instruction, the first assistant turn the output). Writes, in OUT (default RUN/score for a run, else
outputs/<date>-<time>-score):
    scored.jsonl     every record in input order: its own fields, plus `scores` (every scorer's raw value and
                     `quality`), `selected` and, when dropped, `reason` (low_quality, contaminated) and `why`
    selected.jsonl   the selected records only (train on them: selfinstruct train --data OUT/selected.jsonl)
    summary.json     each scorer's distribution, the share past each threshold, the audit when the judge ran
`--sample N` scores a seeded random sample of N records (still in input order): the audit of a big run.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from selfinstruct.audit import summarise, tables
from selfinstruct.config import Config
from selfinstruct.errors import UserError
from selfinstruct.generate.vetting import Candidate, make_gate
from selfinstruct.generators import make_generator
from selfinstruct.generators.base import choice_mode
from selfinstruct.prompts import Prompts
from selfinstruct.records import json_line, read_rows, records_source, write_atomic, write_json
from selfinstruct.scoring import TEMPLATES
from selfinstruct.seeds import read_task

console = Console(stderr=True, soft_wrap=True)
BATCH = 64  # records per scoring batch (a progress step)


def read_records(path: str | Path) -> list[tuple[dict[str, Any], Candidate]]:
    """(row, candidate) per record of any supported data, in input order; a seed task gives one per instance."""
    out = []
    for f, line, row in read_rows(records_source(path)):
        task = read_task(row, f, line, default_id=f"{f.stem}-{line}")
        base = {k: v for k, v in row.items() if k != "instances"}
        for j, inst in enumerate(task.instances):
            shown = {**base, "instruction": task.instruction, "input": inst.input, "output": inst.output}
            if len(task.instances) > 1:
                shown["instance"] = j
            out.append((shown, Candidate(task.instruction, inst.input, inst.output, dict(row.get("scores") or {}))))
    if not out:
        raise UserError("no records to score", path)
    return out


def default_out(data: str | Path) -> Path:
    p = Path(data)
    if p.is_dir() and (p / "generated.jsonl").exists():
        return p / "score"
    return Path("outputs") / f"{time.strftime('%Y%m%d-%H%M%S')}-score"


def select(cands: list[Candidate], keep_top: float) -> list[bool]:
    """Kept: no reason, and within the best `keep_top` fraction (by quality; ties: the earlier) of those."""
    ok = [i for i, c in enumerate(cands) if not c.reason]
    keep = max(1, round(len(ok) * keep_top)) if ok else 0
    ranked = sorted(ok, key=lambda i: (-(cands[i].scores.get("quality") or 0.0), i))
    for i in ranked[keep:]:
        cands[i].reason, cands[i].why = "low_quality", f"outside quality.keep_top {keep_top}"
    return [not c.reason for c in cands]


def score_data(cfg: Config, data: str, scorers: list[str], out: str | None = None,
               sample: int | None = None) -> Path:
    """Score, select and summarise `data` (module docstring); returns the output directory."""
    cfg.quality.scorers = scorers
    if cfg.eval.judge:  # the judge is the only generator here: it runs as the teacher would
        cfg.teacher.model, cfg.eval.judge = cfg.eval.judge, None
    prompts = Prompts(cfg.generate.prompts_dir)
    prompts.check(TEMPLATES)
    records = read_records(data)
    if sample is not None and sample < len(records):
        picked = sorted(random.Random(cfg.generate.seed).sample(range(len(records)), sample))
        records = [records[i] for i in picked]
    gate = make_gate(cfg, prompts)
    teacher = None
    if "judge" in scorers and gate.judge is None:  # no --judge: the teacher (or the run's teacher) judges
        teacher = make_generator(cfg.teacher)
        gate.judge, gate.judge_mode = teacher, choice_mode(teacher)
    cands = [c for _, c in records]
    try:
        with Progress(TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task("score", total=len(cands))
            for b in range(0, len(cands), BATCH):
                gate.vet(cands[b:b + BATCH], lambda reqs: [])
                bar.update(task, advance=len(cands[b:b + BATCH]))
    finally:
        gate.close()
    kept = select(cands, cfg.quality.keep_top)
    rows = []
    for (row, c), k in zip(records, kept, strict=True):
        rows.append({**row, "scores": c.scores, "selected": k,
                     **({"reason": c.reason, "why": c.why} if c.reason else {})})
    path = Path(out) if out else default_out(data)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / "scored.jsonl", "".join(json_line(r) for r in rows))
    write_atomic(path / "selected.jsonl", "".join(json_line(r) for r in rows
                                                  if r["selected"]))
    summary = {"data": str(data), "scorers": scorers, "records": len(rows), "selected": sum(kept),
               "dropped": {r: sum(c.reason == r for c in cands) for r in ("low_quality", "contaminated")},
               "ifd_model": cfg.quality.ifd_model or cfg.train.student if "ifd" in scorers else None,
               "judge": cfg.teacher.model if "judge" in scorers else None,
               **summarise([c.scores for c in cands], cfg.quality)}
    write_json(path / "summary.json", summary)
    for t in tables(summary):
        Console().print(t)
    console.print(f"selected {summary['selected']} of {summary['records']} records; dropped "
                  f"{summary['dropped']['low_quality']} low_quality, {summary['dropped']['contaminated']} "
                  f"contaminated")
    return path
