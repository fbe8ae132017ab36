"""Start and stop a real `transformers serve` process on 127.0.0.1 for tests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVERS: dict[str, subprocess.Popen] = {}  # base URL -> the process serving it (to kill it in tests)


def answers(base_url: str) -> bool:
    try:
        return httpx.get(base_url.removesuffix("/v1") + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _serve(model: Path, log: Path, timeout: float) -> tuple[subprocess.Popen, int]:
    """A `transformers serve` process answering /health, and its port. A port another process took between
    free_port and the server's bind ("address already in use") is replaced by a fresh one."""
    cli = Path(sys.executable).with_name("transformers")
    for _ in range(5):
        port = free_port()
        with log.open("w") as fh:
            proc = subprocess.Popen([str(cli), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                                     "--device", "cpu"], stdout=fh, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its access log, line by line
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not answers(f"http://127.0.0.1:{port}/v1"):
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"transformers serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        if proc.poll() is None:
            return proc, port
        if "address already in use" not in log.read_text():
            raise RuntimeError(f"transformers serve exited early:\n{log.read_text()[-3000:]}")
    raise RuntimeError(f"transformers serve found no free port:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def transformers_serve(model: Path, log: Path, timeout: float = 120) -> Iterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT/v1); the server is killed on exit."""
    proc, port = _serve(model, log, timeout)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        SERVERS[url] = proc
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


class _InThread:
    """A uvicorn server (self.server, self.thread, self.port) run in a thread for the `with` block."""

    def __enter__(self) -> _InThread:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


class FaultyProxy(_InThread):
    """A local HTTP proxy in front of a real server that misbehaves for some requests, by count:
    every `every_429`-th answers 429 (Retry-After: 0.2), every `every_500`-th 500, every
    `every_hang`-th never answers (it waits until the client disconnects), every `every_garbage`-th
    answers 200 with non-UTF-8 bytes. An honest answer that arrives after its client disconnected (a
    timeout on a busy machine) is counted as `abandoned`. Runs uvicorn in a thread on 127.0.0.1.
    `refuse_lora`: /v1/load_lora_adapter answers 404, as a vLLM server without runtime LoRA loading does.
    `down = True` makes it answer 503 to everything until set back. It records each request's
    Authorization header, and when it sent each 429 (Retry-After: `retry_after`) and forwarded each request.
    """

    def __init__(self, upstream: str, every_429: int = 4, every_500: int = 5, every_hang: int = 7,
                 every_garbage: int = 10**9, reject_response_format: bool = False,
                 refuse_lora: bool = False, retry_after: float = 0.2):
        import asyncio
        import threading

        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        self.upstream = upstream.rstrip("/")
        self.seen = 0
        self.faults = {"429": 0, "500": 0, "hang": 0, "forwarded": 0, "abandoned": 0, "down": 0}
        self.down = False
        self.auth: list[str | None] = []  # the Authorization header of every request
        self.rejected_at: list[float] = []  # when each 429 was sent, and each forwarded request arrived
        self.forwarded_at: list[float] = []

        async def handle(request: Request) -> Response:
            self.seen += 1
            n = self.seen
            body = await request.body()
            self.auth.append(request.headers.get("authorization"))
            if self.down:  # the whole endpoint is failing (switch it back with `proxy.down = False`)
                self.faults["down"] += 1
                return Response("unavailable", status_code=503)
            if refuse_lora and request.url.path.endswith("/load_lora_adapter"):  # no runtime LoRA loading
                return Response('{"detail": "Not Found"}', status_code=404)
            if reject_response_format and b"response_format" in body:
                self.faults["response_format"] = self.faults.get("response_format", 0) + 1
                return Response('{"detail": "response_format is not supported"}', status_code=400)
            if n % every_429 == 0:
                self.faults["429"] += 1
                self.rejected_at.append(time.monotonic())
                return Response("slow down", status_code=429, headers={"Retry-After": str(retry_after)})
            if n % every_500 == 0:
                self.faults["500"] += 1
                return Response("boom", status_code=500)
            if n % every_garbage == 0:  # 200 with a body that is not even UTF-8
                self.faults["garbage"] = self.faults.get("garbage", 0) + 1
                return Response(b"\xff\xfe\x00{not json \xc3\x28", status_code=200, media_type="application/json")
            if n % every_hang == 0:  # never answers: only the client's own timeout ends it
                self.faults["hang"] += 1
                while not await request.is_disconnected():
                    await asyncio.sleep(0.05)
                return Response("late", status_code=504)
            self.faults["forwarded"] += 1
            self.forwarded_at.append(time.monotonic())
            async with httpx.AsyncClient(timeout=600) as client:
                r = await client.post(self.upstream + request.url.path.removeprefix("/v1"),
                                      content=body, headers={"content-type": "application/json"})
            if await request.is_disconnected():  # an honest answer came after the client gave up on it
                self.faults["abandoned"] += 1
            return Response(r.content, status_code=r.status_code, media_type="application/json")

        app = Starlette(routes=[Route("/v1/{path:path}", handle, methods=["POST"])])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)



class ScriptedServer(_InThread):
    """A minimal OpenAI-compatible chat server on 127.0.0.1 whose reply to each request is `script(prompt)` (the
    last user message), sent as JSON (a lone surrogate in the text stays a valid `\\udXXX` escape), with a `usage`
    of `usage` (anything, to test what a server may send). Counts the requests it answered."""

    def __init__(self, script, usage: object = None):
        import threading

        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        self.answered = 0

        async def chat(request: Request) -> Response:
            body = json.loads(await request.body())
            prompt = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
            self.answered += 1
            n = body.get("n", 1)
            data = {"choices": [{"index": i, "message": {"role": "assistant", "content": script(prompt)},
                                 "finish_reason": "stop"} for i in range(n)], "usage": usage}
            return Response(json.dumps(data, ensure_ascii=True), media_type="application/json")

        app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

