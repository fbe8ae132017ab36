"""Copy detection: generated text that reproduces what its prompt showed, and instances shared by tasks.

    reason = instance_copy(inst, demos, instruction)   # "", "copies_demo" or "echoes_instruction"
    index = InstanceIndex(); index.shared(inst, instruction); index.add(inst, instruction)

A weak teacher answers an instance prompt with the prompt's own demonstration ("25 degrees Celsius" ->
"77 degrees Fahrenheit", whatever the task), or with the task itself. Three reasons, always on:
- `copies_demo`: an instruction, input or output that equals a demonstration shown in the prompt that made it
  (after NFKC, case and whitespace normalisation) or scores ROUGE-L >= 0.9 against one. An input or output is
  compared with every input and output shown (a demo's input returned as an output is a copy too), and one of
  CONTAINED_MIN_TOKENS tokens or more that lies almost whole inside a shown text (90% of its tokens in order)
  is one as well: the paragraph of a demo's "Paragraph: ... Question: ..." input. A field shorter than
  MIN_COPY_TOKENS tokens (a class label, "yes", "13", "dolphin") counts only when the whole (input, output)
  pair is a demonstration's: "positive" under a new review is an answer, not a copy.
- `echoes_instruction`: an input or output that repeats the task's own instruction (same test).
- `format_leak`: an input or output holding a line of the prompt's scaffolding ("Output:", "Input:",
  "Example 2", "Class label:", "Task:", "3. Instruction:"): a reply the parser could not split, not an example.
- `shared_instance`: an (input, output) pair already accepted under a different instruction, in this run or
  an earlier round (`generate.dedup_against`); the first keeps it, the later ones are copies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from rapidfuzz.distance import LCSseq

from selfinstruct.dedup import normalise, rouge_l, rouge_tokens
from selfinstruct.seeds import Instance

COPY_ROUGE = 0.9
MIN_COPY_TOKENS = 3
CONTAINED_MIN_TOKENS = 6


def contained(text: str, shown: Iterable[str]) -> bool:
    """Whether COPY_ROUGE of `text`'s tokens appear, in order, inside one of `shown` (ROUGE-L precision)."""
    own = rouge_tokens(text)
    return bool(own) and any(LCSseq.similarity(own, rouge_tokens(s)) >= COPY_ROUGE * len(own) for s in shown)


def copies(text: str, shown: Iterable[str]) -> bool:
    """Whether `text` reproduces any of `shown` (equal once normalised, or ROUGE-L >= COPY_ROUGE)."""
    own = normalise(text)
    if not own:
        return False
    return any(own == normalise(s) or rouge_l(text, s) >= COPY_ROUGE for s in shown if s.strip())


def instance_copy(inst: Instance, demos: list[Instance], instruction: str) -> str:
    """Why `inst` (generated for `instruction` from a prompt showing `demos`) is a copy, or holds the prompt's
    scaffolding; "" when it is neither."""
    if _key(inst) in {_key(d) for d in demos}:
        return "copies_demo"
    shown = [d.input for d in demos] + [d.output for d in demos]
    for field in ("input", "output"):
        text = getattr(inst, field)
        n = len(rouge_tokens(text))
        if n >= MIN_COPY_TOKENS and copies(text, shown) or n >= CONTAINED_MIN_TOKENS and contained(text, shown):
            return "copies_demo"
    if copies(inst.output, [instruction]) or (inst.input.strip() and copies(inst.input, [instruction])):
        return "echoes_instruction"
    if format_leak(inst):
        return "format_leak"
    return ""


_SCAFFOLD = re.compile(r"^[ \t]*(?:\d+[.)][ \t]*)?(?:outputs?|inputs?|example[ \t]*\d+|class label|task|instructions?)"
                       r"[ \t]*\d*[ \t]*:?[ \t]*(?:$|(?<=:).*)", re.IGNORECASE | re.MULTILINE)


def format_leak(inst: Instance) -> bool:
    """Whether an input or output holds a line of the instance prompt's scaffolding."""
    return any(_SCAFFOLD.search(text) for text in (inst.input, inst.output))


def _key(inst: Instance) -> str:
    return normalise(inst.input) + "\x00" + normalise(inst.output)


class InstanceIndex:
    """The (input, output) pairs accepted so far, each with the instruction that first had it."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}

    def shared(self, inst: Instance, instruction: str) -> bool:
        """Whether the pair was accepted before under a different instruction."""
        first = self.owner.get(_key(inst))
        return first is not None and first != normalise(instruction)

    def add(self, inst: Instance, instruction: str) -> None:
        self.owner.setdefault(_key(inst), normalise(instruction))

    def add_records(self, rows: Iterable[dict]) -> None:
        """Pairs of accepted records (generated.jsonl rows): a resumed run's, or earlier rounds'."""
        for r in rows:
            self.add(Instance(r.get("input", ""), r.get("output", "")), r["instruction"])
