"""Throughput of the openai backend against a local server with a fixed per-request delay.

    python bench/teacher.py [--n 2000] [--delay 0.05] [--concurrency 64]

The server (uvicorn in a child process, 127.0.0.1) answers every chat completion after `delay`
seconds with no limit on parallelism, so the ideal time is n * delay / concurrency. Prints achieved
requests/s, the ratio to that ideal (goal: within 1.2x at concurrency 64), and the client's CPU
time per request (this process, all threads).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

import httpx

SERVER = r'''
import asyncio, sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
DELAY = float(sys.argv[2])
BODY = {"id": "x", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "1. A task."}, "finish_reason": "stop"}]}
async def chat(request):
    await request.body()
    await asyncio.sleep(DELAY)
    return JSONResponse(BODY)
async def health(request):
    return JSONResponse({"status": "ok"})
app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", backlog=4096)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()

    from selfinstruct.config import Sampling, TeacherConfig
    from selfinstruct.teacher import Request
    from selfinstruct.teacher.openai import OpenAITeacher

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(args.delay)])
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        teacher = OpenAITeacher(TeacherConfig(model="m", base_urls=[f"http://127.0.0.1:{port}/v1"],
                                              max_concurrency=args.concurrency, cache=None))
        requests = [Request(f"Come up with task {i}:", Sampling(max_tokens=16, seed=i)) for i in range(args.n)]
        teacher.generate(requests[: args.concurrency])  # warm the connection pool
        cpu0, t0 = time.process_time(), time.perf_counter()
        outs = teacher.generate(requests)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        teacher.close()
    finally:
        server.terminate()
        server.wait()
    assert len(outs) == args.n and all(o[0].text for o in outs)
    ideal = args.n * args.delay / args.concurrency
    print(json.dumps({"n": args.n, "delay_s": args.delay, "concurrency": args.concurrency}))
    print(f"achieved {args.n / wall:,.0f} requests/s in {wall:.2f} s; ideal {ideal:.2f} s "
          f"({args.n / ideal:,.0f} requests/s): {wall / ideal:.2f}x the ideal (goal <= 1.2x)")
    print(f"client CPU: {cpu:.2f} s, {1e3 * cpu / args.n:.2f} ms per request; "
          f"stats: {teacher.stats}")


if __name__ == "__main__":
    main()
