"""Start and stop a real `transformers serve` process on 127.0.0.1 for tests."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def transformers_serve(model: Path, log: Path, timeout: float = 120) -> Iterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT/v1); the server is killed on exit."""
    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    with log.open("w") as fh:
        proc = subprocess.Popen([str(cli), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu"], stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited early:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        url = f"http://127.0.0.1:{port}/v1"
        SERVERS[url] = proc
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


class FaultyProxy:
    """A local HTTP proxy in front of a real server that misbehaves for some requests, by count:
    every `every_429`-th answers 429 (Retry-After: 0.2), every `every_500`-th 500, every
    `every_hang`-th hangs for `hang_s` seconds, every `every_garbage`-th answers 200 with non-UTF-8
    bytes. Runs uvicorn in a thread on 127.0.0.1.
    With `lora_base`, it also plays vLLM's runtime LoRA API in front of a server that has none:
    POST /v1/load_lora_adapter registers {lora_name, lora_path} (`refuse_lora`: answers 404 as a
    server without --enable-lora does); a request naming a registered adapter is forwarded with
    the base model's name, one naming an unknown model gets 404."""

    def __init__(self, upstream: str, every_429: int = 4, every_500: int = 5, every_hang: int = 7,
                 hang_s: float = 5.0, every_garbage: int = 10**9, reject_response_format: bool = False,
                 lora_base: str | None = None,
                 refuse_lora: bool = False):
        import asyncio
        import threading

        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        self.upstream = upstream.rstrip("/")
        self.seen = 0
        self.faults = {"429": 0, "500": 0, "hang": 0, "forwarded": 0, "lora": 0}
        self.loaded: list[dict] = []

        async def handle(request: Request) -> Response:
            self.seen += 1
            n = self.seen
            body = await request.body()
            if lora_base is not None:
                import json

                if request.url.path.endswith("/load_lora_adapter"):
                    if refuse_lora:
                        return Response('{"detail": "Not Found"}', status_code=404)
                    self.loaded.append(json.loads(body))
                    return Response("Success: LoRA adapter loaded", status_code=200)
                req = json.loads(body)
                if req["model"] not in {a["lora_name"] for a in self.loaded}:
                    return Response('{"error": "model does not exist"}', status_code=404)
                self.faults["lora"] += 1
                body = json.dumps({**req, "model": lora_base}).encode()
            if reject_response_format and b"response_format" in body:
                self.faults["response_format"] = self.faults.get("response_format", 0) + 1
                return Response('{"detail": "response_format is not supported"}', status_code=400)
            if n % every_429 == 0:
                self.faults["429"] += 1
                return Response("slow down", status_code=429, headers={"Retry-After": "0.2"})
            if n % every_500 == 0:
                self.faults["500"] += 1
                return Response("boom", status_code=500)
            if n % every_garbage == 0:  # 200 with a body that is not even UTF-8
                self.faults["garbage"] = self.faults.get("garbage", 0) + 1
                return Response(b"\xff\xfe\x00{not json \xc3\x28", status_code=200, media_type="application/json")
            if n % every_hang == 0:
                self.faults["hang"] += 1
                await asyncio.sleep(hang_s)
                return Response("late", status_code=504)
            self.faults["forwarded"] += 1
            async with httpx.AsyncClient(timeout=120) as client:
                r = await client.post(self.upstream + request.url.path.removeprefix("/v1"),
                                      content=body, headers={"content-type": "application/json"})
            return Response(r.content, status_code=r.status_code, media_type="application/json")

        app = Starlette(routes=[Route("/v1/{path:path}", handle, methods=["POST"])])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FaultyProxy:
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
