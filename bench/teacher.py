"""Teacher throughput: the openai client against a local server, and the in-process backends compared.

    python bench/teacher.py [--n 2000] [--delay 0.05] [--concurrency 64]
    python bench/teacher.py --compare-backends MODEL [--inputs 32] [--max-tokens 256]

`--compare-backends` runs the same generation (Evol-Instruct over `--inputs` of seeds/, one round,
rewrites up to 128 tokens, responses up to `--max-tokens`, same seed and sampling, no cache) once on
the transformers backend and once on vLLM in-process
(CPU build or CUDA, whichever is installed), each in its own process, and prints generated tokens per
second and accepted records per minute of each, the ratio, and each backend's start-up time. This is
what `--backend auto` is decided by: vLLM wherever it is installed and can run.

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


COMPARE = """\
teacher: {{backend: {backend}, engine: {{max_model_len: 2048}}, cache: null}}
generate:
  method: evol
  seed: 7
  evol:
    rounds: 1
    batch_size: {inputs}
    max_inputs: {inputs}
    evolve_sampling: {{temperature: 0.7, top_p: 0.95, max_tokens: 128}}
    response_sampling: {{temperature: 0.7, top_p: 0.95, max_tokens: {max_tokens}}}
    equality_sampling: {{temperature: 0.0, max_tokens: 4}}
"""


def compare_backends(model: str, inputs: int, max_tokens: int) -> None:
    """The same Evol-Instruct generation on transformers and on vLLM, each in a fresh process."""
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    rows = {}
    for backend in ("transformers", "vllm"):
        d = Path(tempfile.mkdtemp(prefix=f"bench-{backend}-"))
        (d / "c.yaml").write_text(COMPARE.format(backend=backend, inputs=inputs, max_tokens=max_tokens))
        t0 = time.perf_counter()
        r = subprocess.run(["selfinstruct", "generate", "--seeds", str(root / "seeds"),
                            "--teacher", model, "--out", str(d / "run"), "--config", str(d / "c.yaml")],
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        (d / "output.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            sys.exit(f"{backend} failed (whole output: {d / 'output.log'}):\n{r.stderr[-3000:]}")
        stats = json.loads((d / "run" / "stats.json").read_text())
        gen = stats["elapsed_s"]
        tokens = stats["teacher_calls"].get("tokens_out", 0)
        rows[backend] = {"tokens_out": tokens, "generate_s": gen, "startup_s": round(wall - gen, 1),
                         "tokens_per_s": round(tokens / gen, 1), "accepted": stats["accepted_records"],
                         "accepted_per_min": round(60 * stats["accepted_records"] / gen, 2),
                         "requests": sum(stats["requests"].values())}
        print(backend, json.dumps(rows[backend]), flush=True)
    ratio = rows["vllm"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]
    print(f"vLLM / transformers: {ratio:.2f}x generated tokens per second "
          f"({rows['vllm']['tokens_per_s']} vs {rows['transformers']['tokens_per_s']} tok/s); start-up "
          f"{rows['vllm']['startup_s']} s vs {rows['transformers']['startup_s']} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--compare-backends", metavar="MODEL", help="a model directory or .gguf file")
    ap.add_argument("--inputs", type=int, default=32, help="with --compare-backends: instructions evolved")
    ap.add_argument("--max-tokens", type=int, default=256, help="with --compare-backends: response length")
    args = ap.parse_args()
    if args.compare_backends:
        compare_backends(args.compare_backends, args.inputs, args.max_tokens)
        return

    from selfinstruct.config import Sampling, ServerConfig, TeacherConfig
    from selfinstruct.generators import Request
    from selfinstruct.generators.openai import OpenAIGenerator

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(args.delay)])
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        teacher = OpenAIGenerator(TeacherConfig(model="m", cache=None,
                                                server=ServerConfig(base_urls=[f"http://127.0.0.1:{port}/v1"],
                                                                    max_concurrency=args.concurrency)))
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
