"""Teacher backends under load and failure: real `transformers serve` processes on 127.0.0.1,
a fault-injecting proxy around one, the response cache, the vLLM request mapping, --launch."""

import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, cli
from serve import SERVERS, FaultyProxy, answers, free_port, transformers_serve

from selfinstruct.config import Sampling, TeacherConfig
from selfinstruct.errors import TeacherError
from selfinstruct.records import read_jsonl
from selfinstruct.teacher import Request, make_teacher
from selfinstruct.teacher.cache import CachedTeacher, ResponseCache, cache_key
from selfinstruct.teacher.hf import HFTeacher
from selfinstruct.teacher.openai import OpenAITeacher, retry_after
from selfinstruct.teacher.vllm import engine_kwargs, sampling_kwargs, to_completions

POSTS = '"POST /v1/chat/completions HTTP/1.1" 200'


def posts(log: Path) -> int:
    return log.read_text().count(POSTS)


def generate_args(teacher, run, config, *urls):
    args = ["generate", "--seeds", ROOT / "seeds", "--teacher", teacher, "--backend", "openai",
            "--num-instructions", 3, "--out", run, "--config", config]
    for u in urls:
        args += ["--base-url", u]
    return args


# ---------------------------------------------------------------- cache


class Counting:
    """Counts what reaches the real teacher behind the cache."""

    def __init__(self, inner):
        self.inner, self.name, self.chat, self.calls = inner, inner.name, inner.chat, 0

    def generate(self, requests):
        self.calls += len(requests)
        return self.inner.generate(requests)

    def close(self):
        pass


def test_cache_answers_repeats_and_grows_n(teacher_dir, tmp_path):
    real = Counting(HFTeacher(TeacherConfig(model=str(teacher_dir))))
    teacher = CachedTeacher(real, ResponseCache(tmp_path / "c.sqlite"))
    reqs = [Request("Come up with a task.", Sampling(temperature=1.0, max_tokens=12, n=2, seed=s)) for s in (1, 2)]
    first = teacher.generate(reqs)
    assert real.calls == 2
    assert teacher.generate(reqs) == first and real.calls == 2  # all from the cache
    more = [Request(r.prompt, Sampling(temperature=1.0, max_tokens=12, n=3, seed=r.sampling.seed)) for r in reqs]
    assert [o[:2] for o in teacher.generate(more)] == first and real.calls == 4
    again = CachedTeacher(real, ResponseCache(tmp_path / "c.sqlite"))  # persisted: a new process sees it
    assert again.generate(reqs) == first and real.calls == 4


def test_cache_key_ignores_n_but_not_the_rest():
    a = Request("p", Sampling(n=1, seed=3))
    assert cache_key("m", True, a, 0) == cache_key("m", True, Request("p", Sampling(n=5, seed=3)), 0)
    assert cache_key("m", True, a, 0) != cache_key("m", True, a, 1)
    assert cache_key("m", True, a, 0) != cache_key("m", False, a, 0)
    assert cache_key("m", True, a, 0) != cache_key("m", True, Request("p", Sampling(n=1, seed=4)), 0)


def _writer(path, start):
    from selfinstruct.teacher.base import Completion

    cache = ResponseCache(path)
    for i in range(start, start + 300, 10):
        cache.put_many({f"k{j}": Completion(f"t{j}", "stop") for j in range(i, i + 10)})


def test_cache_two_processes_write_at_once(tmp_path):
    path = tmp_path / "shared.sqlite"
    ResponseCache(path).close()
    procs = [multiprocessing.get_context("spawn").Process(target=_writer, args=(path, s)) for s in (0, 300)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    found = ResponseCache(path).get_many([f"k{j}" for j in range(600)])
    assert len(found) == 600 and found["k599"].text == "t599"


# ---------------------------------------------------------------- openai backend


def test_retry_after_forms():
    assert retry_after("2.5") == 2.5 and retry_after(None) is None and retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0) == 0.0


@pytest.mark.slow
def test_two_servers_spread_failover_and_cache(teacher_dir, fast_config, tmp_path):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with transformers_serve(teacher_dir, logs[0]) as url_a, transformers_serve(teacher_dir, logs[1]) as url_b:
        # 1. spread: a teacher with two URLs uses both
        t = OpenAITeacher(TeacherConfig(model=str(teacher_dir), base_urls=[url_a, url_b], cache=None))
        t.generate([Request(f"Task {i}:", Sampling(temperature=0, max_tokens=4)) for i in range(8)])
        t.close()
        assert posts(logs[0]) == 4 and posts(logs[1]) == 4

        # 2. the same generate run twice: the second sends nothing and writes the same records
        first, second = tmp_path / "r1", tmp_path / "r2"
        assert cli(*generate_args(teacher_dir, first, fast_config, url_a, url_b)).returncode == 0
        sent = posts(logs[0]) + posts(logs[1])
        assert cli(*generate_args(teacher_dir, second, fast_config, url_a, url_b)).returncode == 0
        assert posts(logs[0]) + posts(logs[1]) == sent
        assert read_jsonl(first / "generated.jsonl") == read_jsonl(second / "generated.jsonl")
        stats = json.loads((second / "stats.json").read_text())
        assert stats["teacher_calls"]["cache_misses"] == 0 and stats["teacher_calls"]["cache_hits"] > 0

        # 3. kill server b mid-run: the run completes through a
        run = tmp_path / "r3"
        proc = subprocess.Popen(["selfinstruct", *map(str, generate_args(teacher_dir, run, fast_config, url_a, url_b)),
                                 "--seed", "7", "--no-cache"], stderr=subprocess.PIPE, text=True)
        before = posts(logs[1])
        deadline = time.monotonic() + 120
        while posts(logs[1]) < before + 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before server b could be killed"
        SERVERS[url_b].kill()
        SERVERS[url_b].wait()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        stats = json.loads((run / "stats.json").read_text())
        assert stats["accepted_instructions"] == 3
        calls = stats["teacher_calls"]
        assert calls["retried_connection"] >= 1 and calls.get("failed", 0) == 0


@pytest.mark.slow
def test_faults_are_retried_and_counted(teacher_dir, fast_config, tmp_path):
    cfg = tmp_path / "faulty.yaml"
    cfg.write_text(fast_config.read_text() + "teacher:\n  request_timeout: 1.5\n  max_retries: 6\n"
                   "  dead_after: 100\n")
    with transformers_serve(teacher_dir, tmp_path / "s.log") as url, FaultyProxy(url, every_garbage=6) as proxy:
        run = tmp_path / "run"
        r = cli(*generate_args(teacher_dir, run, cfg, proxy.url))
        assert r.returncode == 0, r.stderr
    calls = json.loads((run / "stats.json").read_text())["teacher_calls"]
    assert proxy.faults["429"] and proxy.faults["500"] and proxy.faults["hang"] and proxy.faults["garbage"]
    assert calls["retried_429"] == proxy.faults["429"] and calls["retried_500"] == proxy.faults["500"]
    assert calls["retried_timeout"] == proxy.faults["hang"]
    assert calls["retried_bad_json"] == proxy.faults["garbage"]  # non-UTF-8 bodies too
    # every request sent is accounted for: answered, or retried for a named reason; none dropped
    assert calls["sent"] == calls["ok"] + calls["retried_429"] + calls["retried_500"] + calls["retried_timeout"] \
        + calls["retried_bad_json"]
    assert calls.get("failed", 0) == 0
    check = read_jsonl(run / "generated.jsonl")
    assert len({r["instruction"] for r in check}) == 3


def test_dead_endpoint_clear_message_then_resume(teacher_dir, fast_config, tmp_path):
    cfg = tmp_path / "dead.yaml"
    cfg.write_text(fast_config.read_text() + "teacher:\n  max_retries: 2\n  dead_cooldown: 0.2\n")
    run = tmp_path / "run"
    r = cli(*generate_args(teacher_dir, run, cfg, f"http://127.0.0.1:{free_port()}/v1"))
    assert r.returncode == 1
    assert "failed 3 times" in r.stderr and "ConnectError" in r.stderr and "--resume" in r.stderr
    with transformers_serve(teacher_dir, tmp_path / "s.log") as url:
        r = cli(*generate_args(teacher_dir, run, cfg, url), "--resume")
        assert r.returncode == 0, r.stderr
    assert json.loads((run / "stats.json").read_text())["accepted_instructions"] == 3


def test_launch_starts_and_stops_the_server(teacher_dir, fast_config, tmp_path):
    serve = str(Path(sys.executable).with_name("transformers"))
    cfg = tmp_path / "launch.yaml"
    cfg.write_text(fast_config.read_text() + "teacher:\n  launch_command: [" + ", ".join(
        json.dumps(a) for a in [serve, "serve", "{model}", "--host", "127.0.0.1", "--port", "{port}",
                                "--device", "cpu"]) + "]\n")
    run = tmp_path / "run"
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--launch", "--num-instructions", 2,
            "--out", run, "--config", cfg)
    assert r.returncode == 0, r.stderr
    log = (run / "teacher-server.log").read_text()
    assert POSTS in log
    port = log.split("Uvicorn running on http://127.0.0.1:")[1].split()[0]
    assert not answers(f"http://127.0.0.1:{port}/v1")  # stopped with the run


def test_launch_missing_program_is_a_clear_error(fast_config, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(fast_config.read_text() + "teacher:\n  launch_command: [no-such-server, '{model}']\n")
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", "m", "--launch", "--out", tmp_path / "r",
            "--config", cfg)
    assert r.returncode == 2 and "'no-such-server' is not installed" in r.stderr


# ---------------------------------------------------------------- vLLM


def test_vllm_sampling_mapping():
    kw = sampling_kwargs(Sampling(temperature=0.7, top_p=0.5, max_tokens=1024, presence_penalty=2.0,
                                  stop=["\n\n", "16."], n=3, seed=11))
    assert kw == {"n": 3, "temperature": 0.7, "top_p": 0.5, "max_tokens": 1024, "presence_penalty": 2.0,
                  "frequency_penalty": 0.0, "seed": 11, "stop": ["\n\n", "16."]}
    assert sampling_kwargs(Sampling())["max_tokens"] == 512 and sampling_kwargs(Sampling())["stop"] is None


def test_vllm_engine_mapping():
    cfg = TeacherConfig(model="Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=4, gpu_memory_utilization=0.8,
                        max_model_len=8192, lora_path="/adapters/r1", max_lora_rank=32, dtype="bfloat16")
    assert engine_kwargs(cfg) == {"model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel_size": 4,
                                  "gpu_memory_utilization": 0.8, "trust_remote_code": False, "max_model_len": 8192,
                                  "dtype": "bfloat16", "enable_lora": True, "max_lora_rank": 32}


def test_vllm_outputs_to_completions():
    out = SimpleNamespace(outputs=[SimpleNamespace(text="a\n\nb", finish_reason="length"),
                                   SimpleNamespace(text="done", finish_reason="stop")])
    comps = to_completions(out, ["\n\n"])
    assert [(c.text, c.finish_reason) for c in comps] == [("a", "stop"), ("done", "stop")]
    assert to_completions(SimpleNamespace(outputs=[SimpleNamespace(text="cut", finish_reason="length")]), [])[0] \
        .finish_reason == "length"


def _vllm_with_gpu() -> str | None:
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (it is CUDA-only: pip install -e '.[vllm]' on a GPU machine)"
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    return None


@pytest.mark.skipif(_vllm_with_gpu() is not None, reason=str(_vllm_with_gpu()))
def test_vllm_engine_generates(teacher_dir):
    from selfinstruct.teacher.vllm import VLLMTeacher

    t = VLLMTeacher(TeacherConfig(backend="vllm", model=str(teacher_dir), gpu_memory_utilization=0.3))
    outs = t.generate([Request("Come up with a series of tasks:\n1.", Sampling(temperature=1.0, max_tokens=20,
                                                                                n=2, seed=s)) for s in range(4)])
    assert [len(o) for o in outs] == [2, 2, 2, 2]


def test_response_format_fallback(teacher_dir, tmp_path):
    with transformers_serve(teacher_dir, tmp_path / "s.log") as url, \
            FaultyProxy(url, every_429=10**9, every_500=10**9, every_hang=10**9, reject_response_format=True) as proxy:
        t = OpenAITeacher(TeacherConfig(model=str(teacher_dir), base_urls=[proxy.url], cache=None))
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
        req = Request("Answer in JSON.", Sampling(temperature=0, max_tokens=8), json_schema=schema)
        outs = t.generate([req, req])
        rejected = proxy.faults["response_format"]  # 1 or 2: both may be in flight before the first answer
        assert len(outs) == 2 and 1 <= rejected <= 2
        assert t.generate([req]) and proxy.faults["response_format"] == rejected  # never sent to it again
        t.close()
    assert t.stats["fallback_response_format"] == 1 and t.endpoints[0].rejects_response_format
    assert t.stats["sent"] == t.stats["ok"] + t.stats["retried_4xx_response_format"]


def test_openai_student_adapter_is_loaded_at_runtime(teacher_dir, tmp_path):
    """vllm serve --enable-lora's runtime API, as our client uses it: the adapter is loaded once per
    server, then requested by its name; a server that refuses it ends with a clear message."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from selfinstruct.teacher.base import adapter_name

    adapter = tmp_path / "round-1" / "train" / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(teacher_dir), LoraConfig(r=4, target_modules=["q_proj"])) \
        .save_pretrained(adapter)
    quiet = {"every_429": 10**9, "every_500": 10**9, "every_hang": 10**9}
    req = Request("Write a haiku about tea.", Sampling(max_tokens=8))
    with transformers_serve(teacher_dir, tmp_path / "s.log") as url:
        with FaultyProxy(url, lora_base=str(teacher_dir), **quiet) as proxy:
            t = make_teacher(TeacherConfig(backend="openai", model=str(teacher_dir), base_urls=[proxy.url],
                                           lora_path=str(adapter), cache=None))
            try:
                assert len(t.generate([req, req])) == 2 and len(t.generate([req])) == 1
            finally:
                t.close()
            name = adapter_name(str(adapter))
            assert name.startswith("round-1-train-") and t.name == f"{teacher_dir}+{name}"
            assert proxy.loaded == [{"lora_name": name, "lora_path": str(adapter.resolve())}]  # once
            assert proxy.faults["lora"] == 3
        with FaultyProxy(url, lora_base=str(teacher_dir), refuse_lora=True, **quiet) as proxy:
            t = make_teacher(TeacherConfig(backend="openai", model=str(teacher_dir), base_urls=[proxy.url],
                                           lora_path=str(adapter), cache=None))
            try:
                with pytest.raises(TeacherError, match="--enable-lora"):
                    t.generate([req])
            finally:
                t.close()
