"""Load and validate seed tasks (and training data) in the three formats we accept.

    tasks = load_tasks("seeds/")              # Self-Instruct, Alpaca or chat records
    chats = load_conversations("data.jsonl")  # the same formats, as message lists for training

Formats, recognised per record:
- Self-Instruct seed task: {"instruction", "instances": [{"input", "output"}]}, optionally "id" (default
  <file stem>-<position>), "is_classification" (default false) and "name" (unused), as in
  Self-Instruct's seed_tasks.jsonl.
- Alpaca: {"instruction", "input" (optional), "output"}.
- Chat: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}.
A bad record stops loading with the file, the line and the problem (exit code 2 from the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfinstruct.errors import UserError
from selfinstruct.records import read_rows, user_turn

ROLES = ("system", "user", "assistant")


@dataclass
class Instance:
    input: str
    output: str


@dataclass
class SeedTask:
    id: str
    instruction: str
    instances: list[Instance] = field(default_factory=list)
    is_classification: bool = False
    name: str = ""


def load_tasks(path: str | Path) -> list[SeedTask]:
    """Every task in a file or directory; ids must be unique across all files."""
    tasks: list[SeedTask] = []
    seen: dict[str, tuple[Path, int]] = {}
    position: dict[Path, int] = {}
    for f, line, row in read_rows(path):
        position[f] = position.get(f, 0) + 1
        task = read_task(row, f, line, default_id=f"{f.stem}-{position[f]}")
        if task.id in seen:
            first = seen[task.id]
            raise UserError(f"duplicate task id '{task.id}' (first at {first[0]}:{first[1]})", f, line)
        seen[task.id] = (f, line)
        tasks.append(task)
    return tasks


def load_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Training conversations: one per instance of a Self-Instruct task, one per Alpaca or chat record."""
    convs = []
    for f, line, row in read_rows(path):
        if "messages" in row:
            convs.append(_messages(row["messages"], f, line))
        else:
            task = read_task(row, f, line, default_id="")
            for inst in task.instances:
                convs.append([{"role": "user", "content": user_turn(task.instruction, inst.input)},
                              {"role": "assistant", "content": inst.output}])
    return convs


def read_task(row: dict[str, Any], f: Path, line: int, default_id: str) -> SeedTask:
    """One task from a record of any format; records without an id get `default_id`."""
    if "messages" in row:
        msgs = _messages(row["messages"], f, line)
        user = next(m["content"] for m in msgs if m["role"] == "user")
        reply = next(m["content"] for m in msgs if m["role"] == "assistant")
        return SeedTask(id=str(row.get("id", default_id)), instruction=user,
                        instances=[Instance("", reply)])
    if "instances" in row:
        # Generation reads the instruction and the instances; id and is_classification default, and
        # Self-Instruct's `name` is kept when present (a string) but never needed.
        for key, typ in (("id", str), ("name", str), ("is_classification", bool)):
            if key in row:
                _expect(row, key, typ, f, line)
        instances = row["instances"]
        if not isinstance(instances, list) or not instances:
            raise UserError("'instances' must be a non-empty list of {input, output} objects", f, line)
        parsed = []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict) or not isinstance(inst.get("input"), str) \
                    or not isinstance(inst.get("output"), str):
                raise UserError(f"instances[{i}] must be an object with string 'input' and 'output'", f, line)
            if not inst["output"].strip():
                raise UserError(f"instances[{i}] has an empty 'output'", f, line)
            parsed.append(Instance(inst["input"], inst["output"]))
        return SeedTask(id=row.get("id", default_id), name=row.get("name", ""), instruction=_instruction(row, f, line),
                        instances=parsed, is_classification=row.get("is_classification", False))
    if "instruction" in row:
        _expect(row, "output", str, f, line)
        inp = row.get("input", "")
        if not isinstance(inp, str):
            raise UserError(f"'input' must be a string, got {type(inp).__name__}", f, line)
        if not row["output"].strip():
            raise UserError("'output' is empty", f, line)
        return SeedTask(id=str(row.get("id", default_id)), instruction=_instruction(row, f, line),
                        instances=[Instance(inp, row["output"])])
    raise UserError("unrecognised record: expected 'instances' (Self-Instruct seed task), "
                    "'instruction' (Alpaca) or 'messages' (chat)", f, line)


def _instruction(row: dict[str, Any], f: Path, line: int) -> str:
    _expect(row, "instruction", str, f, line)
    if not row["instruction"].strip():
        raise UserError("'instruction' is empty", f, line)
    return row["instruction"].strip()


def _expect(row: dict[str, Any], key: str, typ: type, f: Path, line: int) -> None:
    if key not in row:
        raise UserError(f"missing field '{key}'", f, line)
    if not isinstance(row[key], typ):
        want = {str: "a string", bool: "true or false"}[typ]
        raise UserError(f"'{key}' must be {want}, got {type(row[key]).__name__}", f, line)


def _messages(msgs: Any, f: Path, line: int) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError("'messages' must be a non-empty list", f, line)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': string}}",
                            f, line)
        out.append({"role": m["role"], "content": m["content"]})
    roles = [m["role"] for m in out]
    if "user" not in roles or "assistant" not in roles:
        raise UserError("'messages' needs at least one user and one assistant turn", f, line)
    if not any(m["content"].strip() for m in out if m["role"] == "assistant"):
        raise UserError("every assistant turn is empty: nothing to learn from", f, line)
    return out


def record_text(row: dict[str, Any], where: Path, line: int) -> str:
    """The text a record is compared by: its instruction, or a chat record's first user message."""
    if isinstance(row.get("instruction"), str):
        return row["instruction"]
    msgs = row.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"]
    raise UserError("record has neither a string 'instruction' nor a user message", where, line)
