"""Pure parsers of teacher output: numbered instruction lists, Yes/No answers, instances.

Each returns what it could read plus, where it dropped something, (text, reason) pairs so the
caller can count every loss.
"""

from __future__ import annotations

import json
import re

from selfinstruct.seeds import Instance

_ITEM = re.compile(r"\n[ \t]*\d+[ \t]?[.)][ \t]*")
_EXAMPLE = re.compile(r"(?:^|\n)[ \t]*Example[ \t]*\d+[ \t]*:?[ \t]*", re.IGNORECASE)
_OUTPUT = re.compile(r"(?:^|\n)[ \t]*Output[ \t]*\d*[ \t]*:", re.IGNORECASE)
_INPUT = re.compile(r"(?:^|\n)[ \t]*Input[ \t]*\d*[ \t]*:", re.IGNORECASE)
_LABEL = re.compile(r"(?:^|\n)[ \t]*Class label[ \t]*\d*[ \t]*:", re.IGNORECASE)
NO_INPUT = {"<none>", "none", "<noinput>", "n/a", ""}


# A list number ("1. ", "2) ", "5: ") or a label a chat teacher puts before its instruction ("Instruction:",
# "Task 3:", "Task description:", "New instruction:"), repeated or combined: "9. Instruction: Sort ...".
_LEADING_LABEL = re.compile(
    r"^(?:(?:\d{1,2}[.):]|(?:new\s+)?(?:task|instruction|prompt)s?(?:\s+description)?\s*\d*\s*:)\s+)+", re.IGNORECASE)


def normalise_instruction(text: str) -> str:
    """Whitespace collapsed, ends trimmed, a leftover list number ("1. ", "2) ", "5: ") or label ("Instruction:",
    "Task description:") removed, first letter upper-cased (only the first: unlike the original code's
    str.capitalize(), 'Python' and 'JSON' keep their case). A chat teacher continuing item 9 often starts a list
    of its own: "9. 1. List...")."""
    text = re.sub(r"\s+", " ", text).strip()
    text = _LEADING_LABEL.sub("", text)
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


_ALPACA_FIELD = re.compile(r"(?:^|\n)[ \t]*(?:\d+[ \t]*[.)][ \t]*)?(Instruction|Input|Output)[ \t]*:", re.IGNORECASE)


def parse_alpaca(text: str, first: int, truncated: bool) -> tuple[list[tuple[str, Instance]], list[tuple[str, str]]]:
    """Tasks from a continued Alpaca list ("N. Instruction: / N. Input: / N. Output:", split by ###).

    The text continues item `first` (the prompt ended with "first. Instruction:") unless the teacher
    restarted the numbering. Returns ((instruction, instance) pairs, dropped (text, reason) pairs).
    More lenient than the original, which needs "###" between tasks, consecutive numbers and all three
    fields: a task starts at every Instruction field (chat teachers often drop the separators), numbers
    may skip or be missing, and a task with no Input field has no input ("<noinput>"). Kept strict: an
    Instruction then an Output, in that order, or the task is `malformed_task`; after a task's Output,
    further Input/Output pairs run together are not a task of their own (the first pair counts)."""
    restarted = re.match(r"\s*(?:\d+\s*[.)]\s*)?Instruction\s*:", text, re.IGNORECASE)
    body = text if restarted else f"{first}. Instruction:{text}"
    tasks_raw: list[tuple[str, list[tuple[str, str]]]] = []  # (raw text, [(field, value), ...]) per task
    dropped: list[tuple[str, str]] = []
    for chunk in body.split("###"):
        marks = list(_ALPACA_FIELD.finditer(chunk))
        ends = [m.start() for m in marks[1:]] + [len(chunk)]
        firsts = [i for i, m in enumerate(marks) if m.group(1).lower() == "instruction"]
        head = chunk[: marks[firsts[0]].start() if firsts else len(chunk)].strip()
        if head:  # text (or fields) before any Instruction: not a task
            dropped.append((head, "malformed_task"))
        for i in range(firsts[0] if firsts else len(marks), len(marks)):
            name, value = marks[i].group(1).lower(), chunk[marks[i].end(): ends[i]]
            if name == "instruction":
                nxt = next((j for j in firsts if j > i), None)
                tasks_raw.append((chunk[marks[i].start(): marks[nxt].start() if nxt else len(chunk)].strip(), []))
            tasks_raw[-1][1].append((name, value))
    if truncated and tasks_raw:  # hit max_tokens: the last task may be cut mid-sentence
        dropped.append((tasks_raw.pop()[0], "truncated"))
    tasks = []
    for raw, fields in tasks_raw:
        names = [n for n, _ in fields]
        instruction = normalise_instruction(fields[0][1])
        if names[1:3] == ["input", "output"]:
            inp, out = fields[1][1].strip(), fields[2][1].strip()
        elif names[1:2] == ["output"]:
            inp, out = "", fields[1][1].strip()
        else:
            dropped.append((raw, "malformed_task"))
            continue
        if not instruction:
            dropped.append((raw, "malformed_task"))
            continue
        tasks.append((instruction, Instance("" if inp.lower() in NO_INPUT else inp, out)))
    return tasks, dropped


# The JSON-mode replies of the list stages (generate.list_format json).
INSTRUCTIONS_SCHEMA_KEY, TASKS_SCHEMA_KEY = "instructions", "tasks"


# Longest strings the schemas allow (characters): an instruction longer than the filters' 150 words is
# dropped anyway, and a bound lets an enforcing backend end a runaway string instead of spending max_tokens.
MAX_INSTRUCTION_CHARS, MAX_FIELD_CHARS = 1000, 2000


def instructions_schema(max_items: int) -> dict:
    """JSON schema of a Self-Instruct instruction list: {"instructions": [str, ...]}."""
    item = {"type": "string", "minLength": 1, "maxLength": MAX_INSTRUCTION_CHARS}
    return {"type": "object", "required": [INSTRUCTIONS_SCHEMA_KEY], "additionalProperties": False,
            "properties": {INSTRUCTIONS_SCHEMA_KEY: {"type": "array", "minItems": 1, "maxItems": max_items,
                                                     "items": item}}}


def tasks_schema(max_items: int) -> dict:
    """JSON schema of an Alpaca task list: {"tasks": [{"instruction", "input", "output"}, ...]}."""
    limits = {"instruction": MAX_INSTRUCTION_CHARS, "input": MAX_FIELD_CHARS, "output": MAX_FIELD_CHARS}
    task = {"type": "object", "required": ["instruction", "input", "output"], "additionalProperties": False,
            "properties": {k: {"type": "string", "maxLength": n} for k, n in limits.items()}}
    return {"type": "object", "required": [TASKS_SCHEMA_KEY], "additionalProperties": False,
            "properties": {TASKS_SCHEMA_KEY: {"type": "array", "minItems": 1, "maxItems": max_items, "items": task}}}


def _json_items(text: str, key: str, truncated: bool) -> tuple[list, list[tuple[str, str]]]:
    """The list under `key` of a JSON reply (a bare list is accepted; a ```json fence around it, from a
    teacher that was asked but not forced, is removed). A reply cut by max_tokens keeps its complete items
    (the cut one is `truncated`); otherwise unreadable JSON is `invalid_json`."""
    body = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's parser goes
        if truncated:
            return _complete_items(body, key), [(text.strip(), "truncated")]
        return [], [(text.strip(), "invalid_json")]
    items = data.get(key) if isinstance(data, dict) else data
    return (items, []) if isinstance(items, list) else ([], [(text.strip(), "invalid_json")])


def _complete_items(body: str, key: str) -> list:
    """The items of `key`'s list that are complete before the text was cut off."""
    m = re.search(r'^\s*(?:\{\s*"' + re.escape(key) + r'"\s*:\s*)?\[', body)
    if not m:
        return []
    decoder, items, i = json.JSONDecoder(), [], m.end()
    while True:
        i = len(body) - len(body[i:].lstrip(" \t\r\n,"))
        try:
            item, i = decoder.raw_decode(body, i)
        except (ValueError, RecursionError):
            return items
        items.append(item)


def parse_instructions_json(text: str, truncated: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """parse_instructions for a JSON-mode reply: the strings of its "instructions" list, normalised."""
    items, dropped = _json_items(text, INSTRUCTIONS_SCHEMA_KEY, truncated)
    out = []
    for item in items:
        text_item = normalise_instruction(item) if isinstance(item, str) else ""
        if text_item:
            out.append(text_item)
        else:
            dropped.append((json.dumps(item, ensure_ascii=False), "empty_item"))
    return out, dropped


def parse_alpaca_json(text: str, truncated: bool) -> tuple[list[tuple[str, Instance]], list[tuple[str, str]]]:
    """parse_alpaca for a JSON-mode reply: its "tasks", each with a non-empty instruction (an empty output is
    left to the instance checks, as in text mode)."""
    items, dropped = _json_items(text, TASKS_SCHEMA_KEY, truncated)
    tasks = []
    for item in items:
        fields = item if isinstance(item, dict) else {}
        instruction, inp, out = (fields.get(k) if isinstance(fields.get(k), str) else ""
                                 for k in ("instruction", "input", "output"))
        instruction = normalise_instruction(instruction)
        if not instruction:
            dropped.append((json.dumps(item, ensure_ascii=False), "malformed_task"))
            continue
        inp = inp.strip()
        tasks.append((instruction, Instance("" if inp.lower() in NO_INPUT else inp, out.strip())))
    return tasks, dropped


_TASK = re.compile(r"(?:^|\n)[ \t]*Task[ \t]*:", re.IGNORECASE)


def demo_instances(prompt: str, classification: bool) -> list[Instance]:
    """The demonstrations an instance prompt shows: every 'Task:' block but the last (the task to do),
    read with the parser its replies go through, so a user's own template is read as well as ours."""
    blocks = _TASK.split(prompt)[1:-1]
    return [inst for block in blocks for inst in parse_instances(block.partition("\n")[2], classification)]
