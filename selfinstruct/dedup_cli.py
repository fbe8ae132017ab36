"""`selfinstruct dedup IN --out OUT`: near-duplicate removal for any supported data file.

    selfinstruct dedup data.json --out kept.jsonl --method rouge --threshold 0.7

Greedy in input order: a record is kept when its text scores below the threshold against every
record kept before it. The text is the instruction (Alpaca, Self-Instruct) or the first user
message (chat). Kept records are written unchanged, in input order, as JSONL.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from selfinstruct.dedup import exact_dedup, greedy_dedup, minhash_dedup
from selfinstruct.errors import UserError
from selfinstruct.records import json_line, read_rows, records_source, write_atomic
from selfinstruct.seeds import record_text

console = Console(stderr=True, soft_wrap=True)
METHODS = ("rouge", "exact", "minhash")


def run_dedup(src: str, out: str, method: str, threshold: float) -> dict[str, int]:
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}")
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1], got {threshold}")
    rows = list(read_rows(records_source(src)))
    texts = [record_text(row, f, line) for f, line, row in rows]
    if method == "rouge":
        kept = greedy_dedup(texts, threshold)
    elif method == "exact":
        kept = exact_dedup(texts)
    else:
        kept = minhash_dedup(texts, threshold)
    dest = Path(out)
    if dest.parent and not dest.parent.exists():
        raise UserError("the output's directory does not exist", dest.parent)
    write_atomic(dest, "".join(json_line(rows[i][2]) for i in kept))
    summary = {"read": len(rows), "kept": len(kept), "removed": len(rows) - len(kept)}
    console.print(f"{method} dedup (threshold {threshold}): read {summary['read']}, kept {summary['kept']}, "
                  f"removed {summary['removed']} -> {dest}")
    return summary
