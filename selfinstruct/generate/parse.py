"""Pure parsers of teacher output: numbered instruction lists, Yes/No answers, instances.

Each returns what it could read plus, where it dropped something, (text, reason) pairs so the
caller can count every loss.
"""

from __future__ import annotations

import re

from selfinstruct.seeds import Instance

_ITEM = re.compile(r"\n[ \t]*\d+[ \t]?[.)][ \t]*")
_EXAMPLE = re.compile(r"(?:^|\n)[ \t]*Example[ \t]*\d+[ \t]*:?[ \t]*", re.IGNORECASE)
_OUTPUT = re.compile(r"(?:^|\n)[ \t]*Output[ \t]*\d*[ \t]*:", re.IGNORECASE)
_INPUT = re.compile(r"(?:^|\n)[ \t]*Input[ \t]*\d*[ \t]*:", re.IGNORECASE)
_LABEL = re.compile(r"(?:^|\n)[ \t]*Class label[ \t]*\d*[ \t]*:", re.IGNORECASE)
NO_INPUT = {"<none>", "none", "<noinput>", "n/a", ""}


def normalise_instruction(text: str) -> str:
    """Whitespace collapsed, ends trimmed, a leftover list number ("1. ", "2) ") removed, first letter
    upper-cased (only the first: unlike the original code's str.capitalize(), 'Python' and 'JSON' keep
    their case). A chat teacher continuing item 9 often starts a list of its own: "9. 1. List...")."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"^(?:\d+[.)]\s+)+", "", text)
    return text[:1].upper() + text[1:]


def parse_instructions(text: str, truncated: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """Split a continued numbered list. The text may start mid-item (the prompt ended with 'N.'),
    or with a number (chat teachers often restart it), or with a line of prose ending in ':'."""
    parts = _ITEM.split("\n" + text.strip("\n"))
    first, rest = parts[0], parts[1:]
    dropped: list[tuple[str, str]] = []
    items = []
    if first.strip():
        if rest and first.strip().endswith(":"):
            dropped.append((first.strip(), "preamble"))
        else:
            items.append(first)
    items += rest
    items = [normalise_instruction(i) for i in items]
    if truncated and items:  # hit max_tokens: the last item may be cut mid-sentence
        dropped.append((items.pop(), "truncated"))
    dropped += [(item, "empty_item") for item in items if not item]
    return [item for item in items if item], dropped


_ECHO = re.compile(r"^\s*#*\s*(?:rewritten|created)\s+prompt\s*(?:#\s*:?|:)\s*", re.IGNORECASE)


def strip_echo(text: str) -> str:
    """A rewrite without the header a chat teacher often restates first ("#Rewritten Prompt#:", "Created
    Prompt:"): that header opens the answer, it is not part of it. Elsewhere in the text it stays (and
    elimination rule 4 then sees it)."""
    return _ECHO.sub("", text, count=1).strip()


def parse_yes_no(text: str) -> bool | None:
    """True for yes, False for no, None when the answer is neither."""
    word = re.match(r"\W*(\w+)", text)
    if not word:
        return None
    return {"yes": True, "no": False}.get(word.group(1).lower())


_NOT_EQUAL = re.compile(r"\b(not\s+equal|unequal|not\s+the\s+same|different)\b")
_EQUAL = re.compile(r"\b(equal|the\s+same|identical)\b")


def parse_equal(text: str) -> bool | None:
    """Evol-Instruct rule 1's judgement: True for "Equal", False for "Not Equal", None when unclear.
    The first verdict in the text counts ("Not equal. They are not the same" is False; markdown,
    case and punctuation are ignored)."""
    low = re.sub(r"[*_#`]", "", text.lower())
    neg, pos = _NOT_EQUAL.search(low), _EQUAL.search(low)
    if neg and (not pos or neg.start() <= pos.start()):
        return False
    return True if pos else None


def parse_instances(text: str, classification: bool) -> list[Instance]:
    """Instances from an input-first ('Example k / Input: / Output:') or output-first
    ('Class label: / Input:') completion. Prose before the first example is ignored; a reply with no
    example marker and no 'Output:' (a refusal, a paragraph) has none (Self-Instruct's parser agrees)."""
    return _output_first(text) if classification else _input_first(text)


def _input_first(text: str) -> list[Instance]:
    chunks = _EXAMPLE.split(text)
    if len(chunks) > 1:
        chunks = chunks[1:]  # whatever came before "Example 1" is not an example
    elif not _OUTPUT.search(text):
        return []  # neither examples nor an Output field (a refusal, prose): no instance, as in the original
    out = []
    for chunk in chunks:
        if not chunk.strip():
            continue
        parts = _OUTPUT.split(chunk, maxsplit=1)
        if len(parts) == 2:
            inp, outp = parts
        else:
            inp, outp = "", chunk
        inp = _INPUT.sub("", inp, count=1).strip()
        outp = _INPUT.split(outp, maxsplit=1)[0].strip()  # a second pair run together: keep the first
        out.append(Instance("" if inp.lower() in NO_INPUT else inp, outp))
    return out


def _output_first(text: str) -> list[Instance]:
    chunks = _LABEL.split(text)[1:]
    out = []
    for chunk in chunks:
        label, _, rest = chunk.strip().partition("\n")
        parts = _INPUT.split(rest, maxsplit=1)
        inp = (parts[1] if len(parts) == 2 else rest).strip()
        out.append(Instance("" if inp.lower() in NO_INPUT else inp, label.strip()))
    return out


_ALPACA_FIELD = re.compile(r"(?:^|\n)[ \t]*\d+[ \t]*\.[ \t]*(Instruction|Input|Output)[ \t]*:", re.IGNORECASE)


def parse_alpaca(text: str, first: int, truncated: bool) -> tuple[list[tuple[str, Instance]], list[tuple[str, str]]]:
    """Tasks from a continued Alpaca list ("N. Instruction: / N. Input: / N. Output:", split by ###).

    The text continues item `first` (the prompt ended with "first. Instruction:") unless the teacher
    restarted the numbering. Returns ((instruction, instance) pairs, dropped (text, reason) pairs).
    Unlike the original, item numbers need not be consecutive: a skipped number loses no task."""
    restarted = re.match(r"\s*\d+\s*\.\s*Instruction\s*:", text, re.IGNORECASE)
    chunks = (text if restarted else f"{first}. Instruction:{text}").split("###")
    dropped: list[tuple[str, str]] = []
    if truncated and chunks:  # hit max_tokens: the last task may be cut mid-sentence
        last = chunks.pop()
        if last.strip():
            dropped.append((last.strip(), "truncated"))
    tasks = []
    for chunk in chunks:
        if not chunk.strip():
            continue
        parts = _ALPACA_FIELD.split(chunk)
        fields = [p.lower() for p in parts[1::2]]
        if fields != ["instruction", "input", "output"]:
            dropped.append((chunk.strip(), "malformed_task"))
            continue
        instruction, inp, out = (p.strip() for p in parts[2::2])
        instruction = normalise_instruction(instruction)
        inp = "" if inp.lower() in NO_INPUT else inp
        tasks.append((instruction, Instance(inp, out)))
    return tasks, dropped
