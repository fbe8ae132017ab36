"""Nothing left behind: a small watcher process that ends a run's engine and server processes when the run dies.

    reaper.watch()        # once a run starts processes of its own (a vLLM engine, a launched server)

A run normally ends its children itself (the engine is shut down, a launched server is stopped, on success, on an
error, on Ctrl-C, SIGTERM or SIGHUP). A run killed with SIGKILL cannot: vLLM's EngineCore and its workers (on a GPU;
on CPU the engine runs in the run's process), or a launched server and its engine, would run on. So the first time a
run starts such processes it also starts this watcher (`python -m selfinstruct.reaper PID`), in its own session so
that neither the terminal nor the run's death takes it along. Twice a second it notes every descendant of the run
(pid and start time, from /proc); once the run is gone it sends each one still alive SIGTERM, then SIGKILL after
GRACE seconds, and exits. It exits too when the run ended and left nothing. Linux only (elsewhere watch() does
nothing).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE = 10.0
POLL = 0.5
_STARTED: list[subprocess.Popen] = []


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every process below `root`: pid -> start time."""
    parent_of: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parent_of.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[1]
    found, todo = {}, [root]
    while todo:
        for child in parent_of.get(todo.pop(), []):
            if child not in found and child in starts:
                found[child] = starts[child]
                todo.append(child)
    return found


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start


def end(procs: dict[int, int]) -> None:
    """SIGTERM to each process still alive (the same one: same start time), then SIGKILL after GRACE s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in procs.items():
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + GRACE
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in procs.items()):
            time.sleep(0.2)


def run(parent: int) -> None:
    """Watch `parent` until it is gone; then end what it left."""
    start = (_stat(parent) or (0, 0))[1]
    seen: dict[int, int] = {}
    while _alive(parent, start):
        seen.update(descendants(parent))
        seen = {p: s for p, s in seen.items() if _alive(p, s) and p != os.getpid()}
        time.sleep(POLL)
    end(seen)


def watch() -> None:
    """Start this process's watcher, once (Linux; a no-op elsewhere)."""
    if _STARTED or not Path("/proc/self/stat").exists():
        return
    _STARTED.append(subprocess.Popen([sys.executable, "-m", "selfinstruct.reaper", str(os.getpid())],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True))


if __name__ == "__main__":
    run(int(sys.argv[1]))
