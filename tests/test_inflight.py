"""Steps in flight (generate.steps_in_flight, generate.max_in_flight): the real loop around test doubles that
answer deterministically but in a random order and at random times, as a busy engine or server does.

- Alpaca and Evol-Instruct accept exactly the step-by-step order's records at any number of steps in flight;
  Self-Instruct (and self-instruct+evol) at two; beyond that Self-Instruct's demos lag, and the records
  still depend on nothing but the seed and the config (two runs agree).
- A counting server on 127.0.0.1 never sees more than max_in_flight requests at once, and does see more
  than one step's (the steps overlap).
Kill -9 and resume with steps in flight: test_durability (a real `transformers serve`, openai backend,
steps_in_flight at its default) and test_vllm_processes (vLLM in process)."""

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT
from test_evol import ScriptedTeacher
from tiny import synthetic_task

from selfinstruct.config import Config, EvolConfig, GenerateConfig, ServerConfig, TeacherConfig
from selfinstruct.errors import TeacherError
from selfinstruct.generate.loop import generate, run_generate
from selfinstruct.generate.run import Run
from selfinstruct.generators import Completion
from selfinstruct.generators.base import Blocking
from selfinstruct.records import read_jsonl
from selfinstruct.seeds import load_tasks


def reply(prompt: str, prefill: str | None, seed: int | None) -> str:
    """A well-formed answer to any of our prompts, a function of the prompt and the request's seed only."""
    rng = random.Random(f"{prompt}|{seed}")
    prefill = prefill or ""
    if prompt.startswith(("You are rewriting", "You are creating", "Below are two instructions")) \
            or "#Given Prompt#" in prompt:
        return ScriptedTeacher().answer(prompt)
    if prompt.rstrip().endswith("Is it classification?"):
        return rng.choice(["Yes", "No", "No"])
    if prefill.startswith("Example 1"):
        (_, i1, o1), (_, i2, o2) = synthetic_task(rng), synthetic_task(rng)
        return f"{prefill} {i1}\nOutput: {o1}\nExample 2\nInput: {i2}\nOutput: {o2}"
    if prefill.startswith("Class label"):
        return f"{prefill} yes\nInput: {synthetic_task(rng)[1]}\nClass label: no\nInput: {synthetic_task(rng)[1]}"
    if "Instruction:" in prefill:  # Alpaca's list, from item n
        n = int(prefill.split(".")[0])
        items = []
        for j in range(3):
            instruction, inp, output = synthetic_task(rng)
            head = prefill if j == 0 else f"{n + j}. Instruction:"
            items.append(f"{head} {instruction}\n{n + j}. Input:\n{inp if j % 2 else '<noinput>'}\n"
                         f"{n + j}. Output:\n{output}")
        return "\n###\n".join(items)
    if prompt.startswith("Come up with a series of tasks"):
        n = int(prefill.rstrip("."))
        return "\n".join(f"{n + j}. {synthetic_task(rng)[0]}" for j in range(3))
    return f"A full answer: {prompt[:40]}"


class Shuffled(Blocking):
    """Deterministic answers (`reply`), delivered from a thread pool after a random delay, so the steps in
    flight finish in any order. Test double around the real loop, as test_hostile's garbage teacher is."""

    name, chat, concurrent = "shuffled", True, True

    def __init__(self, seed: int, fail_after: int | None = None):
        self.rng, self.pool, self.lock = random.Random(seed), ThreadPoolExecutor(8), threading.Lock()
        self.calls, self.fail_after = 0, fail_after

    def generate(self, requests):
        return [[Completion(reply(r.prompt, r.prefill, r.sampling.seed), "stop")] for r in requests]

    def submit(self, requests):
        with self.lock:
            delay = self.rng.uniform(0, 0.03)
            self.calls += 1
            failing = self.fail_after is not None and self.calls > self.fail_after
        return self.pool.submit(self._answer, requests, delay, failing)

    def _answer(self, requests, delay, failing):
        time.sleep(delay)
        if failing:
            raise TeacherError("the teacher went away")
        return self.generate(requests)

    def close(self):
        self.pool.shutdown()


def run_with(tmp_path, name: str, method: str, steps: int, jitter: int = 0, fail_after: int | None = None,
             target: int = 14) -> dict:
    gcfg = GenerateConfig(method=method, num_instructions=target, request_batch_size=2, out=str(tmp_path / name),
                          seed=5, steps_in_flight=steps, evol=EvolConfig(rounds=2, batch_size=2, max_inputs=7))
    cfg = Config(generate=gcfg)
    seeds = load_tasks(ROOT / "seeds")
    (tmp_path / name).mkdir(exist_ok=True)
    run = Run(dir=tmp_path / name, cfg=cfg, teacher=Shuffled(jitter, fail_after), seeds=seeds)
    generate(run)
    stats = json.loads((tmp_path / name / "stats.json").read_text())
    counts = {k: v for k, v in stats["counts"].items() if k != "requests_unused"}
    return {"generated": read_jsonl(tmp_path / name / "generated.jsonl"),
            "rejected": read_jsonl(tmp_path / name / "rejected.jsonl"),
            "numbers": (stats["requests"], counts, stats["rejected"], stats["steps"], stats.get("evol")),
            "unused": stats["counts"].get("requests_unused", 0)}


@pytest.mark.parametrize(("method", "steps"), [("alpaca", 6), ("evol", 6), ("self-instruct", 2),
                                               ("self-instruct+evol", 2)])
def test_steps_in_flight_accept_what_the_step_by_step_order_accepts(tmp_path, method, steps):
    one = run_with(tmp_path, "one", method, 1)
    many = run_with(tmp_path, "many", method, steps, jitter=1)
    assert one["generated"], "the recipe accepted nothing: the comparison would be empty"
    assert many["generated"] == one["generated"]
    assert many["rejected"] == one["rejected"]
    assert many["numbers"] == one["numbers"]  # requests, counts, rejections, steps, evol statistics
    assert one["unused"] == 0


def test_deep_self_instruct_is_timing_independent(tmp_path):
    """Six steps in flight: the machine demos lag (documented), the records depend on seed and config only."""
    a = run_with(tmp_path, "a", "self-instruct", 6, jitter=2)
    b = run_with(tmp_path, "b", "self-instruct", 6, jitter=3)
    assert a["generated"] and a["generated"] == b["generated"] and a["rejected"] == b["rejected"]
    assert len({r["instruction"] for r in a["generated"]}) == 14


@pytest.mark.parametrize(("method", "calls"), [("self-instruct", 24), ("alpaca", 8), ("evol", 10)])
def test_a_crash_with_steps_in_flight_then_resume_matches_an_uninterrupted_run(tmp_path, method, calls):
    """The teacher fails while six steps are in flight: what was committed stays, the steps after it are
    redone on resume, and the run ends with exactly the records of a run that never failed."""
    whole = run_with(tmp_path, "whole", method, 6, target=80)
    with pytest.raises(TeacherError):
        run_with(tmp_path, "crashed", method, 6, jitter=4, fail_after=calls, target=80)
    state = json.loads((tmp_path / "crashed" / "state.json").read_text())
    assert 0 < state["step"] < whole["numbers"][3]  # it failed mid-run, after some steps committed
    resumed = run_with(tmp_path, "crashed", method, 6, jitter=5, target=80)
    assert resumed["generated"] == whole["generated"] and resumed["rejected"] == whole["rejected"]


class Counting(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that answers `reply` after a pause and counts requests in flight."""

    now = peak = total = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - the handler's name is http.server's
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.now += 1
            cls.total += 1
            cls.peak = max(cls.peak, cls.now)
        try:
            time.sleep(0.05)
            msgs = body["messages"]
            prefill = msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else None
            prompt = next(m["content"] for m in msgs if m["role"] == "user")
            text = reply(prompt, prefill, body.get("seed"))
            text = text[len(prefill):] if prefill and text.startswith(prefill) else text  # the server continues
            data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                            "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            with cls.lock:
                cls.now -= 1

    def log_message(self, *args):
        pass


def test_a_counting_server_never_sees_more_than_max_in_flight(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        cfg = Config(teacher=TeacherConfig(model="counted", backend="openai", cache=None,
                                           server=ServerConfig(base_urls=[url])),
                     generate=GenerateConfig(method="alpaca", num_instructions=30, request_batch_size=2,
                                             steps_in_flight=8, max_in_flight=5, seeds=str(ROOT / "seeds"),
                                             out=str(tmp_path / "run")))
        run_generate(cfg)
    finally:
        server.shutdown()
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["accepted_instructions"] == 30
    used = sum(stats["requests"].values())
    assert used <= Counting.total <= used + stats["counts"].get("requests_unused", 0)
    # A step sends its 2 requests together: two steps overlap (4), a third would make 6, over the limit of 5.
    assert 2 < Counting.peak <= 5
