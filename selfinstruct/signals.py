"""Signals: SIGINT, SIGTERM and SIGHUP stop a run like Ctrl-C (every context manager runs, the run stays
resumable), and a watchdog ends the engine's processes if a native call swallows the interrupt."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, `timeout` and schedulers send) or SIGHUP (the terminal closed): handled like
    Ctrl-C, so every context manager runs (a launched server is stopped, the vLLM engine ends with the run)
    and the run stays resumable. args[0]: the exit code (143, 129)."""


GRACE_S = 60.0  # how long an interrupted run may take to stop before the watchdog ends it


def on_signal(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM raise in the main thread. A native call may swallow that (vLLM's engine start-up
    polls a zmq socket for minutes), so a watchdog also ends the engine's processes and exits if the run
    has not stopped within GRACE_S seconds."""
    code = {signal.SIGTERM: 143, signal.SIGHUP: 129}.get(signum, 130)
    watchdog = threading.Timer(GRACE_S, force_exit, args=(code,))
    watchdog.daemon = True
    watchdog.start()
    raise Terminated(code) if signum != signal.SIGINT else KeyboardInterrupt()


def force_exit(code: int) -> None:
    import multiprocessing

    children = multiprocessing.active_children()  # vLLM's EngineCore processes (they end their workers)
    for child in children:
        child.terminate()
    for child in children:
        child.join(10)
        if child.is_alive():
            child.kill()
    console.print("[red]the run did not stop in time after the signal; its engine processes were ended.[/]")
    os._exit(code)


@contextmanager
def handled() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP raise in the main thread while inside; the previous handlers after."""
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
