"""UserError: mistakes a user can fix (CLI exit code 2). RunError and its kinds: failures outside the
input (exit code 1)."""

from __future__ import annotations

import re
from pathlib import Path


class UserError(Exception):
    """Bad usage or bad input. `where` names the file (and line) at fault when known."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.problem = message
        where = "" if path is None else (f"{path}:{line}: " if line is not None else f"{path}: ")
        super().__init__(where + message)


class RunError(Exception):
    """The run cannot go on for a reason outside the user's input (CLI exit code 1); what was accepted
    before it is on disk, and --resume continues."""


class TeacherError(RunError):
    """The teacher could not be reached or kept failing after retries (CLI exit code 1)."""


class StorageError(RunError):
    """Writing the run failed: a full disk, a quota, a directory that became read-only."""


class RemoteError(RunError):
    """A remote service other than the teacher failed (the hub on --push-to-hub): CLI exit code 1."""


class JudgeError(RunError):
    """The judge's verdicts could not be read often enough for a win rate to mean anything."""


class StalledError(RunError):
    """The teacher made no progress within the request budget (generate.max_stalled_requests); the run's
    stats and records are written, and the message says why and what to change."""


_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@")


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it replaced ("http://user:secret@host" -> "http://***@host"):
    applied to everything written or printed that may hold a URL (config.yaml, the manifest, errors)."""
    return _CREDENTIALS.sub(r"\1***@", text)
