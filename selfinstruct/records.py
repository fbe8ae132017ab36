"""The record type that flows through every stage, and the file I/O every stage shares.

    for path, line, row in read_rows("seeds/"): ...
    with JsonlAppender(run / "generated.jsonl") as out: out.write_many(records)

Appends are flushed and fsynced per batch; files that are rewritten go through a temporary
file and an atomic rename, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfinstruct.errors import UserError


@dataclass
class Record:
    """One accepted instruction-following example, with where it came from."""

    id: str
    instruction: str
    input: str = ""
    output: str = ""
    method: str = "self-instruct"
    round: int = 1
    parents: list[str] = field(default_factory=list)
    teacher: str = ""
    template: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    # Evol-Instruct records: {"depth", "operations" (one per step, root first), "chain" (ancestor ids,
    # root first; the last is the direct parent), "slot", "evol_round"}. Empty for other methods.
    lineage: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def messages(self) -> list[dict[str, str]]:
        """The record as a chat: the instruction (and input) from the user, the output from the assistant."""
        return [{"role": "user", "content": user_turn(self.instruction, self.input)},
                {"role": "assistant", "content": self.output}]


def user_turn(instruction: str, input: str) -> str:
    """How an instruction and its optional input become one user message (documented in the README)."""
    return f"{instruction.strip()}\n\n{input.strip()}" if input.strip() else instruction.strip()


# ---------------------------------------------------------------- reading


def records_source(path: str | Path) -> Path:
    """Where a path's records are: a generate run directory's generated.jsonl, else the path itself (a data
    file, or a directory of them). The one rule every reader of "a run or a file" follows."""
    p = Path(path)
    return p / "generated.jsonl" if p.is_dir() and (p / "generated.jsonl").exists() else p


def data_files(path: str | Path) -> list[Path]:
    """A file, or the *.jsonl / *.json files directly inside a directory (sorted; not recursive)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".jsonl", ".json"))
        if not files:
            raise UserError("directory holds no .jsonl or .json file", p)
        return files
    if not p.exists():
        raise UserError("no such file or directory", p)
    return [p]


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """A teacher's text made safe to store and show: a lone surrogate (which JSON allows and UTF-8 cannot hold)
    becomes U+FFFD, and control characters other than tab and newlines go."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return _CONTROL.sub("", text)


def _cleaned(obj: Any) -> Any:
    if isinstance(obj, str):
        return clean_text(obj)
    if isinstance(obj, list):
        return [_cleaned(v) for v in obj]
    if isinstance(obj, dict):
        return {clean_text(k): _cleaned(v) for k, v in obj.items()}
    return obj


def read_rows(path: str | Path) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """Yield (file, line number, object) for every record in a JSONL file or a JSON list (or a directory)."""
    for f in data_files(path):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"not UTF-8 text ({e.reason} at byte {e.start})", f) from None
        except OSError as e:
            raise UserError(f"cannot read: {e.strerror}", f) from None
        if not text.strip():
            raise UserError("file is empty", f)
        rows = _json_list(text, f) if text.lstrip().startswith("[") else _jsonl(text, f)
        for line, obj in rows:
            if not isinstance(obj, dict):
                raise UserError(f"expected a JSON object, got {type(obj).__name__}", f, line)
            try:
                cleaned = _cleaned(obj)  # a lone surrogate or a control character in a file is cleaned as a reply
            except RecursionError:
                raise UserError("a record nested too deeply to read", f, line) from None
            yield f, line, cleaned


def _jsonl(text: str, f: Path) -> Iterator[tuple[int, Any]]:
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield no, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"invalid JSON: {e.msg} (column {e.colno})", f, no) from None
        except RecursionError:
            raise UserError("invalid JSON: nested too deeply", f, no) from None


def _json_list(text: str, f: Path) -> Iterator[tuple[int, Any]]:
    """Decode a JSON list element by element so each element's line number is known."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = " \t\r\n"
    while True:
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"invalid JSON: {e.msg}", f, e.lineno) from None
        except RecursionError:
            raise UserError("invalid JSON: nested too deeply", f, line) from None
        yield line, obj
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise UserError("invalid JSON: expected ',' or ']' after a list element", f,
                            text.count("\n", 0, pos) + 1)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Our own JSONL outputs; a torn last line (a crash mid-write) is ignored, never half-read."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    with p.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # torn tail of an interrupted append
            if line.strip():
                out.append(json.loads(line))
    return out


# ---------------------------------------------------------------- writing


class JsonlAppender:
    """Append-only JSONL: each `write_many` is one flush + fsync, after cutting any torn tail. It keeps what a
    checkpoint needs to recognise the file later: a running SHA-256 of its bytes, its line count and the last
    row's id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _cut_torn_tail(self.path)
        self.digest, self.lines, self.last_id = hashlib.sha256(), 0, None
        if self.path.exists():
            self.digest, self.lines, self.last_id = _facts(self.path.read_bytes())
        self._fh = self.path.open("ab")

    def write_many(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        data = "".join(json_line(r) for r in rows).encode("utf-8")
        self._fh.write(data)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.digest.update(data)
        self.lines += len(rows)
        self.last_id = rows[-1].get("id")

    def facts(self) -> dict[str, Any]:
        """What state.json records of the file at a checkpoint."""
        return {"size": self.path.stat().st_size, "sha256": self.digest.hexdigest(), "lines": self.lines,
                "last_id": self.last_id}

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def json_line(row: dict[str, Any]) -> str:
    """One JSONL line. Text that cannot be UTF-8 (a lone surrogate a teacher's JSON reply may hold) is written
    escaped instead, so a hostile reply never stops a run."""
    text = json.dumps(row, ensure_ascii=False) + "\n"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(row, ensure_ascii=True) + "\n"
    return text


def _facts(data: bytes) -> tuple[Any, int, str | None]:
    """SHA-256, line count and last row's id of JSONL bytes."""
    lines = data.splitlines()
    last = None
    if lines:
        try:
            last = json.loads(lines[-1]).get("id")
        except (ValueError, AttributeError):
            last = None
    return hashlib.sha256(data), len(lines), last


def prefix_facts(path: Path, size: int) -> dict[str, Any]:
    """The facts of a file's first `size` bytes, as JsonlAppender.facts records them."""
    with path.open("rb") as fh:
        data = fh.read(size)
    digest, lines, last = _facts(data)
    return {"size": len(data), "sha256": digest.hexdigest(), "lines": lines, "last_id": last}


def _cut_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def write_atomic(path: str | Path, text: str) -> None:
    """Write a whole file so that readers see the old or the new content, never a mix."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a teacher's reply: written escaped
        text = json.dumps(obj, indent=2, ensure_ascii=True) + "\n"
    write_atomic(path, text)
