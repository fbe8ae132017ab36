"""Is the teacher engine kept full? Our generation loop against the engine's own throughput on the same prompts.

    VLLM_CPU_KVCACHE_SPACE=1 python bench/engine.py MODEL [--recipe self-instruct] [--target 24]
                                                   [--steps 1,16] [--batch 8] [--max-tokens 256]

For each value of generate.steps_in_flight in --steps (1 is the step-by-step order every earlier version
ran), one process starts vLLM in process on MODEL (a model directory or .gguf file; made for
SmolLM2-135M-Instruct on vLLM's CPU build), warms it up, then:
  (a) runs the recipe through our loop (run_generate: seed 0, no response cache, CPU-sized max_tokens),
      logging every request it has answered; generated tokens / wall time from the first request sent to
      the last answered (start-up, stats and the dataset are not generation);
  (b) sends exactly those requests to the same engine all at once (LLM.enqueue / enqueue_chat, then
      wait_for_completion: the engine's own batch, no loop of ours); generated tokens / wall time.
Prints both throughputs and the ratio a / b. The same requests with the same seeds generate nearly the
same tokens both ways, so the ratio is how much of the engine's throughput the loop keeps. Requests of
steps begun past the run's end are aborted when the run ends: their time counts against (a), their
tokens in neither; the output counts them ("unused").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Logged:
    """The run's generator, logging every request it answered (a request of a step dropped past the run's end
    is aborted: it cost the run time, but it is not part of the work compared)."""

    def __init__(self, inner: object, log: list):
        self.inner, self.log = inner, log
        self.first = self.last = None  # the generation's span: first request sent, last one answered

    def generate(self, requests: list) -> list:
        return self.submit(requests).result()

    def submit(self, requests: list) -> object:
        self.first = self.first or time.monotonic()
        fut = self.inner.submit(requests)
        fut.add_done_callback(lambda f: self._done(f, requests))
        return fut

    def _done(self, fut: object, requests: list) -> None:
        self.last = time.monotonic()
        if not fut.cancelled() and fut.exception() is None:
            self.log.extend(requests)

    def __getattr__(self, name: str) -> object:  # name, chat, concurrent, enforces_choices, stats, close
        return getattr(self.inner, name)


def all_at_once(gen: object, requests: list) -> tuple[int, float]:
    """(generated tokens, seconds) of the engine running `requests` in one batch of its own."""
    llm = gen.llm
    params = [gen._params(r) for r in requests]
    started = time.monotonic()
    if not gen.chat:
        llm.enqueue([r.prompt for r in requests], params, use_tqdm=False)
    else:
        for cont in (False, True):
            idx = [i for i, r in enumerate(requests) if bool(r.prefill) == cont]
            if idx:
                llm.enqueue_chat([requests[i].messages() for i in idx], [params[i] for i in idx], use_tqdm=False,
                                 add_generation_prompt=not cont, continue_final_message=cont)
    outs = llm.wait_for_completion(use_tqdm=False)
    seconds = time.monotonic() - started
    assert len(outs) == len(requests)  # every request answered
    return sum(len(c.token_ids) for o in outs for c in o.outputs), seconds


def one(model: str, recipe: str, target: int, steps: int, batch: int, max_tokens: int) -> dict:
    import dataclasses

    from selfinstruct.configfile import load_config
    from selfinstruct.generate import loop
    from selfinstruct.generators import Request, make_generator
    from selfinstruct.records import read_jsonl

    out = Path(tempfile.mkdtemp(prefix=f"engine-{recipe}-{steps}-")) / "run"
    cfg = load_config(None, {
        "teacher.model": model, "teacher.backend": "vllm", "teacher.cache": None, "teacher.max_model_len": 2048,
        "generate.method": recipe, "generate.seed": 0, "generate.seeds": str(ROOT / "seeds"),
        "generate.out": str(out), "generate.num_instructions": target, "generate.request_batch_size": batch,
        "generate.steps_in_flight": steps, "generate.evol.rounds": 1, "generate.evol.max_inputs": target})
    g = cfg.generate
    short = {"max_tokens": max_tokens}
    g.instruction_sampling = dataclasses.replace(g.instruction_sampling, **short)
    g.instance_sampling = dataclasses.replace(g.instance_sampling, **short)
    g.alpaca.sampling = dataclasses.replace(g.alpaca.sampling, max_tokens=int(1.5 * max_tokens))
    g.evol.evolve_sampling = dataclasses.replace(g.evol.evolve_sampling, **short)
    g.evol.response_sampling = dataclasses.replace(g.evol.response_sampling, **short)

    gen = make_generator(cfg.teacher)  # starts the engine; the run below gets the same one
    gen.generate([Request("Say hello.", dataclasses.replace(g.instance_sampling, max_tokens=8))])  # warm-up
    log: list = []
    made: list = []

    def logged(tcfg: object) -> Logged:
        made.append(Logged(make_generator(tcfg), log))
        return made[-1]

    loop.make_generator = logged
    loop.run_generate(cfg)
    seconds_a = made[0].last - made[0].first  # generation only (not start-up, stats and dataset)
    tokens_a = made[0].inner.stats["tokens_out"]  # answered requests only (the run's generator shares the engine)
    stats = json.loads((out / "stats.json").read_text())
    tokens_b, seconds_b = all_at_once(gen, log)
    return {"recipe": recipe, "steps_in_flight": steps, "requests": len(log), "records": len(read_jsonl(
        out / "generated.jsonl")), "unused_requests": stats["counts"].get("requests_unused", 0),
        "tokens_a": tokens_a, "seconds_a": round(seconds_a, 2), "tokens_b": tokens_b, "seconds_b": round(seconds_b, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a model directory or .gguf file (SmolLM2-135M-Instruct)")
    ap.add_argument("--recipe", default="self-instruct", choices=["self-instruct", "alpaca", "evol"])
    ap.add_argument("--target", type=int, default=24, help="accepted instructions (evol: inputs evolved)")
    ap.add_argument("--steps", default="1,16", help="values of generate.steps_in_flight, one process each")
    ap.add_argument("--batch", type=int, default=8, help="generate.request_batch_size (the paper's 8)")
    ap.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every stage (CPU-sized)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.model, args.recipe, args.target, args.one, args.batch, args.max_tokens)))
        return
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    for steps in map(int, args.steps.split(",")):
        cmd = [sys.executable, __file__, args.model, "--one", str(steps), "--recipe", args.recipe,
               "--target", str(args.target), "--batch", str(args.batch), "--max-tokens", str(args.max_tokens)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode != 0 or not lines:
            print(f"steps_in_flight {steps}: failed\n{r.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(lines[-1])
        a, b = row["tokens_a"] / row["seconds_a"], row["tokens_b"] / row["seconds_b"]
        print(f"{row['recipe']} steps_in_flight {steps:3}: {row['requests']} requests ({row['unused_requests']} "
              f"unused), {row['records']} records | (a) our loop {row['tokens_a']} tokens in {row['seconds_a']} s "
              f"= {a:.1f} tok/s | (b) all at once {row['tokens_b']} tokens in {row['seconds_b']} s = {b:.1f} tok/s "
              f"| ratio a/b {a / b:.2f}", flush=True)


if __name__ == "__main__":
    main()
