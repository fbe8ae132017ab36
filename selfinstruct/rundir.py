"""Run directories are owned: a marker says a directory is ours, and a lock says which process is using it.

    check(out, "generate")                   # read-only: refuses a user's directory, or another kind of run
    owner = Ownership(out, "generate")       # owner.take(): marker + lock, at the first write; owner.release()

- The marker (`.selfinstruct`, JSON: the kind of run and when it was made) is written when a run directory is
  made, in a new or empty directory only. A directory that holds anything but no marker is refused (exit 2) and
  left untouched: `--out` never deletes or overwrites a user's files. A marker of another kind is refused too
  (a `run` directory is not a `generate` one).
- The lock (`.selfinstruct.lock`, holding the owner's pid) is an exclusive `flock` for the whole run, so a
  second generate, run or train on the same directory is refused with the holder's pid. The kernel releases
  a flock when its process dies, kill -9 included, so a crashed run never blocks its own --resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from selfinstruct.errors import UserError

MARKER = ".selfinstruct"
LOCK = ".selfinstruct.lock"
# The run directories this process has taken, newest last: the one piece of process-wide state, read only by
# the CLI's last-resort error message (which run an unexpected failure happened in).
TAKEN: list[Path] = []


def kind_of(path: Path) -> str | None:
    """The kind of run a directory holds ("generate", "run", "train"), or None when it is not ours."""
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check(path: Path, kind: str) -> None:
    """Whether `path` may be used as a `kind` run directory: new, empty, or already ours and of that kind.
    Reads only."""
    if path.exists() and not path.is_dir():
        raise UserError("--out exists and is not a directory", path)
    if path.is_dir():
        mine = kind_of(path)
        if mine is not None and mine != kind:
            raise UserError(f"this is a selfinstruct {mine} directory, not a {kind} one: choose another --out", path)
        if mine is None and any(path.iterdir()):
            raise UserError("this directory is not empty and is not a selfinstruct run directory (no "
                            f"{MARKER} file): nothing was touched; choose a new or empty --out", path)


def claim(path: Path, kind: str) -> None:
    """Make `path` a `kind` run directory (with its marker) when new or empty; refuse a user's directory (nothing
    is written to a directory that is refused)."""
    check(path, kind)
    if kind_of(path) == kind:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f"{MARKER}.tmp"
        tmp.write_text(json.dumps({"kind": kind, "created": datetime.now().isoformat(timespec="seconds")}) + "\n")
        os.replace(tmp, path / MARKER)
    except OSError as e:
        raise UserError(f"cannot write the run directory: {e.strerror}", path) from None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the directory's exclusive lock until the block ends (or the process dies)."""
    fh = (path / LOCK).open("a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise UserError(f"another selfinstruct process (pid {holder}) is using this run directory; wait for it "
                            "to finish or stop it", path) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # closing the descriptor releases the lock


class Ownership:
    """A run directory claimed and locked once, when first needed (an existing run of ours at once; a new one just
    before its first file is written, so a bad input writes nothing), until `release`."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        self._lock: contextlib.AbstractContextManager | None = None

    def take(self) -> None:
        if self._lock is None:
            claim(self.path, self.kind)
            lock = locked(self.path)
            lock.__enter__()
            self._lock = lock
            TAKEN.append(self.path)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None
