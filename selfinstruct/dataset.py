"""Records <-> a HF `datasets` dataset in chat `messages` form, and training data from any input.

    save_dataset(records, run / "dataset", test_size=0.1, seed=42)
    train, test = load_training_data("outputs/run")   # a run dir, or an Alpaca / Self-Instruct / chat file
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import datasets

from selfinstruct.errors import UserError
from selfinstruct.records import Record, read_jsonl, records_source
from selfinstruct.seeds import load_conversations

Conversation = list[dict[str, str]]


def save_dataset(records: list[dict[str, Any]], path: Path, test_size: float, seed: int) -> dict[str, int]:
    """A DatasetDict with `train` and `test` splits of {"id", "messages", "method"}; replaced atomically."""
    rows = [{"id": r["id"], "method": r["method"], "messages": Record(**r).messages()} for r in records]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = 0 if len(rows) < 2 or test_size == 0 else max(1, round(len(rows) * test_size))
    test_idx = set(order[:n_test])
    split = {
        "train": [rows[i] for i in range(len(rows)) if i not in test_idx],
        "test": [rows[i] for i in range(len(rows)) if i in test_idx],
    }
    write_splits(split, path)
    return {k: len(v) for k, v in split.items()}


def write_splits(split: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Rows of {"id", "method", "messages"} per split, saved as a DatasetDict at `path` (replaced atomically)."""
    empty = {"id": [], "method": [], "messages": []}
    dd = datasets.DatasetDict({
        k: datasets.Dataset.from_list(v) if v else datasets.Dataset.from_dict(empty) for k, v in split.items()})
    datasets.disable_progress_bars()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # An empty split (a run of one record has no test split) still gets its one file: without it datasets
    # saves none and then cannot load the DatasetDict (IndexError in load_from_disk).
    dd.save_to_disk(str(tmp), num_shards={k: 1 for k, v in split.items() if not v})
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def union_of_splits(runs: list[Path], path: Path) -> dict[str, int]:
    """The train splits of several generate runs' datasets as one train split, their test splits as one test
    split (so a record keeps its side), saved at `path`. Returns the split sizes."""
    split: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for run in runs:
        dd = datasets.load_from_disk(str(run / "dataset"))
        for name in split:
            split[name] += [dict(r) for r in dd[name]]
    write_splits(split, path)
    return {k: len(v) for k, v in split.items()}


def load_training_data(path: str | Path) -> tuple[list[Conversation], list[Conversation]]:
    """(train, eval) conversations. A run directory gives its dataset's splits; a file is all train."""
    p = Path(path)
    if p.is_dir() and (p / "dataset" / "dataset_dict.json").exists():
        dd = datasets.load_from_disk(str(p / "dataset"))
        return [r["messages"] for r in dd["train"]], [r["messages"] for r in dd["test"]]
    if records_source(p) != p:
        return [Record(**r).messages() for r in read_jsonl(records_source(p))], []
    if p.is_dir() and (p / "state.json").exists():
        raise UserError("this run directory has no accepted records yet", p)
    convs = load_conversations(p)
    if not convs:
        raise UserError("no training examples found", p)
    return convs, []
