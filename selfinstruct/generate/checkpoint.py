"""A generate run's directory: where it goes, whether it may be written, and whether a checkpoint it is resumed
from is what this tool wrote (state.json's facts about generated.jsonl and rejected.jsonl)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from selfinstruct.errors import UserError
from selfinstruct.records import prefix_facts, read_rows, records_source
from selfinstruct.rundir import check
from selfinstruct.seeds import SeedTask, load_tasks, record_text

OUTPUT_FILES = ("generated.jsonl", "rejected.jsonl")


def verify_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """state.json, once the files are shown to be what it checkpointed: each file at least as long as then, and
    its checkpointed prefix the same bytes (SHA-256), lines and last id. A mismatch (a file replaced, edited or
    cut by something else) refuses the resume and touches nothing; so do output files without a state.json."""
    path = run_dir / "state.json"
    if not path.exists():
        present = [n for n in OUTPUT_FILES if (run_dir / n).exists() and (run_dir / n).stat().st_size]
        if present:
            raise UserError(f"{present[0]} is here but state.json is not: not a run this tool can resume; nothing "
                            "was touched", run_dir)
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        files = state["files"]
    except (ValueError, KeyError, TypeError):
        raise UserError("state.json is unreadable, or from an earlier version of selfinstruct: this run cannot be "
                        "resumed; nothing was touched", path) from None
    for name in OUTPUT_FILES:
        want, f = files[name], run_dir / name
        have = prefix_facts(f, want["size"]) if f.exists() else None
        if have != want:
            what = "is missing" if have is None else ("is shorter than" if have["size"] < want["size"] else
                                                       "differs from what was written before")
            raise UserError(f"{name} {what} at the last checkpoint (state.json: {want['lines']} rows, last id "
                            f"{want['last_id']}): it was changed by something else, so the run cannot be resumed "
                            "safely; nothing was touched", f)
    return state


def pool_texts(paths: list[str]) -> list[str]:
    """Instructions of other data (files, or run directories' generated.jsonl) for the ROUGE-L pool."""
    return [record_text(row, f, line) for p in paths for f, line, row in read_rows(records_source(p))]


def pool_tasks(paths: list[str]) -> list[SeedTask]:
    """The same data's tasks with their instances (for shared_instance across rounds)."""
    return [t for p in paths for t in load_tasks(records_source(p))]


def default_run_dir(method: str) -> Path:
    return Path("outputs") / f"{datetime.now():%Y%m%d-%H%M%S}-{method}"


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse, writing nothing: a directory that is not ours (rundir.py), another kind of run, or a run that is
    there already unless asked to resume it."""
    check(out, "generate")
    if not resume and out.is_dir() and any((out / f).exists() for f in ("generated.jsonl", "state.json")):
        raise UserError("this directory already holds a run: pass --resume to continue it, or another --out", out)
