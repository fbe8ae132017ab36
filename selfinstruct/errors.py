"""The one exception type for mistakes a user can fix: the CLI prints it and exits with code 2."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad usage or bad input. `where` names the file (and line) at fault when known."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.problem = message
        where = "" if path is None else (f"{path}:{line}: " if line is not None else f"{path}: ")
        super().__init__(where + message)


class TeacherError(Exception):
    """The teacher could not be reached or kept failing after retries (CLI exit code 1)."""
