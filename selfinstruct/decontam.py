"""N-gram decontamination against evaluation sets (GPT-3's method: a training text that shares a 13-gram with a
test item is dropped; datatrove uses 12-grams).

    index = NgramIndex.from_paths(["heldout/"], n=13)
    index.hit(["Instruction text", "input", "output"])   # the overlapping evaluation item's id, or None

Words are rouge_score's tokens (lower-cased runs of [a-z0-9]). Each field of an evaluation item (instruction,
every input and output) is indexed on its own, so an n-gram never spans two fields. A field shorter than n
words is indexed whole when it has at least MIN_WHOLE words (a short held-out question copied into a record
is contamination too); a shorter one (a label, "Paris") is not, since it would match everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from selfinstruct.dedup import rouge_tokens
from selfinstruct.records import records_source
from selfinstruct.seeds import load_tasks

MIN_WHOLE = 8


class NgramIndex:
    """The n-grams of evaluation texts, each mapped to the id of the item it came from."""

    def __init__(self, n: int = 13):
        self.n = n
        self.grams: dict[tuple[str, ...], str] = {}
        self.lengths: set[int] = set()  # lengths of the texts indexed whole (shorter than n)

    def add(self, text: str, item_id: str) -> None:
        toks = tuple(rouge_tokens(text))
        if len(toks) >= self.n:
            for i in range(len(toks) - self.n + 1):
                self.grams.setdefault(toks[i:i + self.n], item_id)
        elif len(toks) >= MIN_WHOLE:
            self.grams.setdefault(toks, item_id)
            self.lengths.add(len(toks))

    def hit(self, texts: Iterable[str]) -> str | None:
        """The id of an evaluation item one of `texts` overlaps, or None."""
        if not self.grams:
            return None
        sizes = sorted({self.n} | self.lengths)
        for text in texts:
            toks = tuple(rouge_tokens(text))
            for k in sizes:
                for i in range(len(toks) - k + 1):
                    found = self.grams.get(toks[i:i + k])
                    if found is not None:
                        return found
        return None

    @classmethod
    def from_paths(cls, paths: list[str], n: int) -> NgramIndex:
        """Every task of the files or run directories in `paths` (any seed format); ids as `file:task id`."""
        index = cls(n)
        for p in paths:
            for task in load_tasks(records_source(p)):
                item = f"{Path(p).name}:{task.id}"
                index.add(task.instruction, item)
                for inst in task.instances:
                    index.add(inst.input, item)
                    index.add(inst.output, item)
        return index
