"""Teacher backends under load and failure: real `transformers serve` processes on 127.0.0.1,
a fault-injecting proxy around one, the response cache, the vLLM request mapping, --launch."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, cli
from serve import SERVERS, FaultyProxy, answers, free_port, transformers_serve

from selfinstruct.config import EngineConfig, Sampling, ServerConfig, TeacherConfig
from selfinstruct.errors import TeacherError
from selfinstruct.generators import Request, make_generator
from selfinstruct.generators.base import Blocking
from selfinstruct.generators.cache import CachedGenerator, ResponseCache, cache_key
from selfinstruct.generators.hf import HFGenerator
from selfinstruct.generators.openai import OpenAIGenerator, retry_after
from selfinstruct.generators.vllm import engine_kwargs, sampling_kwargs, to_completions
from selfinstruct.records import read_jsonl

POSTS = '"POST /v1/chat/completions HTTP/1.1" 200'


def posts(log: Path) -> int:
    return log.read_text().count(POSTS)


def settled(count_lines) -> int:
    """`count_lines()` once it stops growing for 2 s: a server writes a request's access line after its
    response, so a client can finish before the last lines are written (seen on a loaded machine)."""
    count, last_change = count_lines(), time.monotonic()
    while time.monotonic() - last_change < 2:
        time.sleep(0.2)
        now = count_lines()
        if now != count:
            count, last_change = now, time.monotonic()
    return count


def settled_posts(logs: list[Path]) -> int:
    """Requests the servers logged, once their logs stop growing."""
    return settled(lambda: sum(map(posts, logs)))


def generate_args(teacher, run, config, *urls):
    args = ["generate", "--seeds", ROOT / "seeds", "--teacher", teacher, "--backend", "openai",
            "--num-instructions", 3, "--out", run, "--config", config]
    for u in urls:
        args += ["--base-url", u]
    return args


@pytest.fixture(scope="module")
def served(teacher_dir, tmp_path_factory):
    """One `transformers serve` of the tiny teacher for the module's tests that need a server and nothing of
    their own from it (a start costs 15 s or more on a busy machine): (url, its log). Tests that stop, kill or
    count the servers they use start their own."""
    log = tmp_path_factory.mktemp("served") / "s.log"
    with transformers_serve(teacher_dir, log) as url:
        yield url, log


# ---------------------------------------------------------------- cache


class Counting(Blocking):
    """Counts what reaches the real teacher behind the cache."""

    def __init__(self, inner):
        self.inner, self.name, self.chat, self.calls = inner, inner.name, inner.chat, 0

    def generate(self, requests):
        self.calls += len(requests)
        return self.inner.generate(requests)

    def close(self):
        pass


def test_cache_answers_repeats_and_grows_n(teacher_dir, tmp_path):
    real = Counting(HFGenerator(TeacherConfig(model=str(teacher_dir))))
    teacher = CachedGenerator(real, ResponseCache(tmp_path / "c.sqlite"))
    reqs = [Request("Come up with a task.", Sampling(temperature=1.0, max_tokens=12, n=2, seed=s)) for s in (1, 2)]
    first = teacher.generate(reqs)
    assert real.calls == 2
    assert teacher.generate(reqs) == first and real.calls == 2  # all from the cache
    more = [Request(r.prompt, Sampling(temperature=1.0, max_tokens=12, n=3, seed=r.sampling.seed)) for r in reqs]
    assert [o[:2] for o in teacher.generate(more)] == first and real.calls == 4
    again = CachedGenerator(real, ResponseCache(tmp_path / "c.sqlite"))  # persisted: a new process sees it
    assert again.generate(reqs) == first and real.calls == 4


def test_cache_key_ignores_n_but_not_the_rest():
    a = Request("p", Sampling(n=1, seed=3))
    assert cache_key("m", True, a, 0) == cache_key("m", True, Request("p", Sampling(n=5, seed=3)), 0)
    assert cache_key("m", True, a, 0) != cache_key("m", True, a, 1)
    assert cache_key("m", True, a, 0) != cache_key("m", False, a, 0)
    assert cache_key("m", True, a, 0) != cache_key("m", True, Request("p", Sampling(n=1, seed=4)), 0)


def _writer(path, start):
    from selfinstruct.generators.base import Completion

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
        t = OpenAIGenerator(TeacherConfig(model=str(teacher_dir), cache=None,
                                          server=ServerConfig(base_urls=[url_a, url_b])))
        t.generate([Request(f"Task {i}:", Sampling(temperature=0, max_tokens=4)) for i in range(8)])
        t.close()
        assert posts(logs[0]) == 4 and posts(logs[1]) == 4

        # 2. the same generate run twice: the second sends nothing and writes the same records. One step at a
        # time: with steps in flight, the first run cancels the requests of steps begun past its end, which the
        # second may send again, and a server may log a cancelled request's line seconds later (seen once: 164
        # requests against 163).
        first, second = tmp_path / "r1", tmp_path / "r2"
        serial = tmp_path / "serial.yaml"
        serial.write_text(fast_config.read_text().replace("generate:\n", "generate:\n  steps_in_flight: 1\n", 1))
        assert cli(*generate_args(teacher_dir, first, serial, url_a, url_b)).returncode == 0
        sent = settled_posts(logs)
        assert cli(*generate_args(teacher_dir, second, serial, url_a, url_b)).returncode == 0
        assert settled_posts(logs) == sent
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
def test_faults_are_retried_and_counted(teacher_dir, served, fast_config, tmp_path):
    cfg = tmp_path / "faulty.yaml"
    # The timeout only has to end the injected hangs (which never answer); an honest answer slower than it
    # on a busy machine is counted by the proxy as abandoned, so the counts below hold at any speed.
    cfg.write_text(fast_config.read_text() + "teacher:\n  request_timeout: 8\n  max_retries: 8\n"
                   "  dead_after: 100\n")
    with FaultyProxy(served[0], every_hang=11, every_garbage=6) as proxy:
        run = tmp_path / "run"
        # a process: the proxy answers from this process's threads, and a run beside it would share its GIL (in
        # process, the proxy once counted 8 timeouts where the client retried 6 and cancelled none)
        r = cli(*generate_args(teacher_dir, run, cfg, proxy.url), process=True)
        assert r.returncode == 0, r.stderr
    calls = json.loads((run / "stats.json").read_text())["teacher_calls"]
    assert proxy.faults["429"] and proxy.faults["500"] and proxy.faults["hang"] and proxy.faults["garbage"]
    assert calls["retried_429"] == proxy.faults["429"] and calls["retried_500"] == proxy.faults["500"]
    # a hang (or a late honest answer) still in flight when the run reached its target was cancelled, not retried
    timed_out = proxy.faults["hang"] + proxy.faults["abandoned"]
    assert timed_out - calls.get("cancelled", 0) <= calls["retried_timeout"] <= timed_out
    assert calls["retried_bad_json"] == proxy.faults["garbage"]  # non-UTF-8 bodies too
    # every request sent is accounted for: answered, or retried for a named reason (including the 422s of
    # transformers serve for the prefill and choice fields, sent once and then dropped); none lost
    retried = {k: v for k, v in calls.items() if k.startswith("retried_")}
    assert set(retried) <= {"retried_429", "retried_500", "retried_timeout", "retried_bad_json",
                            "retried_4xx_continue_final_message", "retried_4xx_structured_outputs"}
    # (and those in flight when the run reached its target, cancelled: how many depends on timing)
    assert calls["sent"] == calls["ok"] + sum(retried.values()) + calls.get("cancelled", 0)
    assert calls.get("failed", 0) == 0
    check = read_jsonl(run / "generated.jsonl")
    assert len({r["instruction"] for r in check}) == 3


def test_dead_endpoint_clear_message_then_resume(teacher_dir, served, fast_config, tmp_path):
    cfg = tmp_path / "dead.yaml"
    cfg.write_text(fast_config.read_text() + "teacher:\n  max_retries: 2\n  dead_cooldown: 0.2\n")
    run = tmp_path / "run"
    r = cli(*generate_args(teacher_dir, run, cfg, f"http://127.0.0.1:{free_port()}/v1"))
    assert r.returncode == 1
    assert "failed 3 times" in r.stderr and "ConnectError" in r.stderr and "--resume" in r.stderr
    r = cli(*generate_args(teacher_dir, run, cfg, served[0]), "--resume")  # a server is up now
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


def launch_config(fast_config, tmp_path):
    serve = str(Path(sys.executable).with_name("transformers"))
    cfg = tmp_path / "launch.yaml"
    cfg.write_text(fast_config.read_text() + "teacher:\n  launch_command: [" + ", ".join(
        json.dumps(a) for a in [serve, "serve", "{model}", "--port", "{port}", "--device", "cpu"]) + "]\n")
    return cfg  # no --host: launch adds --host 127.0.0.1


def launched(teacher_dir, cfg, run, n):
    log = run / "teacher-server.log"
    proc = subprocess.Popen(["selfinstruct", "generate", "--seeds", str(ROOT / "seeds"), "--teacher", str(teacher_dir),
                             "--launch", "--num-instructions", str(n), "--out", str(run), "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (log.exists() and POSTS in log.read_text()):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    server = int(log.read_text().split("Started server process [")[1].split("]")[0])
    return proc, server


@pytest.mark.slow
def test_a_launched_server_that_dies_ends_the_run_with_its_log(teacher_dir, fast_config, tmp_path):
    import psutil

    proc, server = launched(teacher_dir, launch_config(fast_config, tmp_path), tmp_path / "run", 40)
    psutil.Process(server).kill()
    _, err = proc.communicate(timeout=120)  # at once: no retry storm against a dead server
    assert proc.returncode == 1 and "the launched teacher server died (exit code -9)" in err, err
    log = (tmp_path / "run" / "teacher-server.log").read_text()
    assert log.strip().splitlines()[-1].strip() in err  # the log's tail is in the message


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_a_launched_server(teacher_dir, fast_config, tmp_path, sig, code):
    import psutil

    proc, server = launched(teacher_dir, launch_config(fast_config, tmp_path), tmp_path / "run", 40)
    family = [psutil.Process(server), *psutil.Process(server).children(recursive=True)]
    proc.send_signal(sig)
    assert proc.wait(300) == code
    _, alive = psutil.wait_procs(family, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "the launched server outlived the run"


def test_an_error_after_launch_stops_the_server(random_model_dir, fast_config, tmp_path):
    """The server is up, then the run fails: a teacher that never gives a usable instruction stalls it (exit 1),
    and the server is stopped."""
    import psutil

    cfg = launch_config(fast_config, tmp_path)
    cfg.write_text(cfg.read_text().replace("max_stalled_requests: 200", "max_stalled_requests: 4"))
    run = tmp_path / "run"
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", random_model_dir, "--launch", "--num-instructions", 2,
            "--out", run, "--config", cfg)
    assert r.returncode == 1 and "no acceptable instruction in 4 requests" in r.stderr, r.stderr
    log = (run / "teacher-server.log").read_text()
    assert POSTS in log  # it was up and answering
    assert not psutil.pid_exists(int(log.split("Started server process [")[1].split("]")[0]))


@pytest.mark.slow
def test_sigkill_of_a_launch_run_leaves_no_server_and_resume_finishes(teacher_dir, fast_config, tmp_path):
    import psutil

    cfg, run = launch_config(fast_config, tmp_path), tmp_path / "run"
    proc, server = launched(teacher_dir, cfg, run, 6)
    family = [psutil.Process(server), *psutil.Process(server).children(recursive=True)]
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=45)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "the launched server outlived the run"
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--launch", "--num-instructions", 6,
            "--out", run, "--config", cfg, "--resume")
    assert r.returncode == 0, r.stderr
    assert len({x["instruction"] for x in read_jsonl(run / "generated.jsonl")}) == 6


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
    cfg = TeacherConfig(model="Qwen/Qwen2.5-7B-Instruct", lora_path="/adapters/r1",
                        engine=EngineConfig(tensor_parallel_size=4, gpu_memory_utilization=0.8, max_model_len=8192,
                                            max_lora_rank=32, dtype="bfloat16"))
    assert engine_kwargs(cfg) == {"model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel_size": 4,
                                  "gpu_memory_utilization": 0.8, "trust_remote_code": False, "max_model_len": 8192,
                                  "dtype": "bfloat16", "enable_lora": True, "max_lora_rank": 32}


def test_vllm_engine_mapping_on_cpu(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kw = engine_kwargs(TeacherConfig(model="m"), cuda=False)
    # float32 and eager on CPU; an explicit KV cache, or the CPU build demands 90% of the memory free
    assert kw["dtype"] == "float32" and kw["enforce_eager"] and kw["kv_cache_memory_bytes"] == 4 << 30
    assert kw["enable_chunked_prefill"] is False  # seeded requests crash the CPU build's sampler otherwise
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # the user's setting wins (vLLM reads it itself)
    bf16 = TeacherConfig(model="m", engine=EngineConfig(dtype="bfloat16"))
    assert "kv_cache_memory_bytes" not in engine_kwargs(bf16, cuda=False)
    assert engine_kwargs(bf16, cuda=False)["dtype"] == "bfloat16"
    assert engine_kwargs(TeacherConfig(model="m", engine=EngineConfig(enable_lora=True)), cuda=False)["enable_lora"]


def test_launch_command_of_the_cpu_build():
    import importlib.metadata

    from selfinstruct.generators.launch import server_command

    default = TeacherConfig().server.launch_command
    cmd = server_command(default)
    if importlib.metadata.version("vllm-cpu"):  # as in CI: its `vllm` script cannot start, and its engine dies
        assert cmd[:4] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]  # on a cut
        assert cmd[4:] == [*default[2:], "--no-enable-chunked-prefill"]  # seeded prefill, as in process
        mine = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--enable-chunked-prefill"]
        assert server_command(mine) == mine  # the user's own choice stands
    assert server_command(["my-server", "{model}"]) == ["my-server", "{model}"]


def test_cpu_build_runs_the_model_in_one_process(monkeypatch):
    """On the CPU build the launched server and the in-process engine run without vLLM's worker process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) unless the user's environment says otherwise; other servers and the
    processes started after an in-process engine keep the environment as it was."""
    from selfinstruct.generators.launch import cpu_build, server_command, server_env
    from selfinstruct.generators.vllm import in_process

    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    monkeypatch.delenv(key, raising=False)
    vllm_server = server_command(TeacherConfig().server.launch_command)
    assert cpu_build()  # vllm-cpu is installed, as in CI
    assert server_env(vllm_server)[key] == "0" and key not in server_env(["my-server", "{model}"])
    with in_process(cpu=True):
        assert os.environ[key] == "0"
    assert key not in os.environ  # a server launched later runs vLLM's default
    with in_process(cpu=False):
        assert key not in os.environ  # with CUDA vLLM's default stands
    monkeypatch.setenv(key, "1")  # the user's choice wins, in both places
    assert server_env(vllm_server)[key] == "1"
    with in_process(cpu=True):
        assert os.environ[key] == "1"
    assert os.environ[key] == "1"


def test_vllm_outputs_to_completions():
    out = SimpleNamespace(outputs=[SimpleNamespace(text="a\n\nb", finish_reason="length"),
                                   SimpleNamespace(text="done", finish_reason="stop")])
    comps = to_completions(out, ["\n\n"])
    assert [(c.text, c.finish_reason) for c in comps] == [("a", "stop"), ("done", "stop")]
    assert to_completions(SimpleNamespace(outputs=[SimpleNamespace(text="cut", finish_reason="length")]), [])[0] \
        .finish_reason == "length"


def test_response_format_fallback(teacher_dir, served):
    with FaultyProxy(served[0], every_429=10**9, every_500=10**9, every_hang=10**9,
                     reject_response_format=True) as proxy:
        t = OpenAIGenerator(TeacherConfig(model=str(teacher_dir), cache=None,
                                          server=ServerConfig(base_urls=[proxy.url])))
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
        req = Request("Answer in JSON.", Sampling(temperature=0, max_tokens=8), json_schema=schema)
        outs = t.generate([req, req])
        rejected = proxy.faults["response_format"]  # 1 or 2: both may be in flight before the first answer
        assert len(outs) == 2 and 1 <= rejected <= 2
        assert t.generate([req]) and proxy.faults["response_format"] == rejected  # never sent to it again
        t.close()
    assert t.stats["fallback_response_format"] == 1 and t.endpoints[0].rejects_response_format
    assert t.stats["sent"] == t.stats["ok"] + t.stats["retried_4xx_response_format"]


def test_server_refusing_runtime_lora_is_a_clear_error(teacher_dir, served, tmp_path):
    """A server without runtime LoRA loading (no --enable-lora, or VLLM_ALLOW_RUNTIME_LORA_UPDATING unset)
    answers 404 to /v1/load_lora_adapter: the run ends with a message saying what the server needs. (The
    working path is tested against a real vLLM server in test_vllm_processes.py.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "round-1" / "train" / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(teacher_dir), LoraConfig(r=4, target_modules=["q_proj"])) \
        .save_pretrained(adapter)
    quiet = {"every_429": 10**9, "every_500": 10**9, "every_hang": 10**9}
    req = Request("Write a haiku about tea.", Sampling(max_tokens=8))
    with FaultyProxy(served[0], refuse_lora=True, **quiet) as proxy:
        t = make_generator(TeacherConfig(backend="openai", model=str(teacher_dir), lora_path=str(adapter), cache=None,
                                         server=ServerConfig(base_urls=[proxy.url])))
        try:
            with pytest.raises(TeacherError, match="--enable-lora"):
                t.generate([req])
        finally:
            t.close()


# ---------------------------------------------------------------- paths a user will hit (real server behind a proxy)

QUIET = {"every_429": 10**9, "every_500": 10**9, "every_hang": 10**9}


def test_failing_endpoint_leaves_rotation_and_comes_back(teacher_dir, served):
    req = [Request(f"Task {i}:", Sampling(temperature=0, max_tokens=4)) for i in range(6)]
    url = served[0]
    with FaultyProxy(url, **QUIET) as flaky:
        flaky.down = True
        t = OpenAIGenerator(TeacherConfig(model=str(teacher_dir), cache=None,
                                          server=ServerConfig(base_urls=[flaky.url, url], dead_after=2,
                                                              dead_cooldown=1.0, max_retries=6, max_concurrency=1)))
        try:
            assert len(t.generate(req)) == 6  # the healthy server carried them
            # Each removal takes 2 failures in a row; on a slow machine the 1 s cool-down can end during the
            # batch and the endpoint fail again, so count removals per failure rather than expect one.
            down = flaky.faults["down"]
            assert down >= 2 and t.stats["endpoint_taken_out"] == down // 2 and t.stats["retried_503"] == down
            assert flaky.faults["forwarded"] == 0 and t.stats.get("failed", 0) == 0
            flaky.down = False
            time.sleep(1.5)  # past the cool-down: the endpoint is tried again
            assert len(t.generate(req)) == 6
            assert flaky.faults["forwarded"] >= 1 and flaky.faults["down"] == down  # back in rotation, healthy
        finally:
            t.close()


def test_api_key_is_sent_as_bearer_header(teacher_dir, served, monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-abc123")
    with FaultyProxy(served[0], **QUIET) as proxy:
        t = OpenAIGenerator(TeacherConfig(model=str(teacher_dir), cache=None,
                                          server=ServerConfig(base_urls=[proxy.url], api_key_env="MY_TEACHER_KEY")))
        t.generate([Request("Say hi.", Sampling(temperature=0, max_tokens=3))])
        t.close()
        monkeypatch.delenv("MY_TEACHER_KEY")
        t = OpenAIGenerator(TeacherConfig(model=str(teacher_dir), cache=None,
                                          server=ServerConfig(base_urls=[proxy.url], api_key_env="MY_TEACHER_KEY")))
        t.generate([Request("Say hi.", Sampling(temperature=0, max_tokens=3))])
        t.close()
    assert proxy.auth == ["Bearer sk-abc123", None]  # no key, no header


def test_retry_after_is_honoured_in_the_retry_loop(teacher_dir, served):
    """Every 2nd request gets 429 with Retry-After: 2 s; the client's own backoff for a first retry is at most
    0.75 s, so each retry arriving at least ~2 s after its 429 shows the header was obeyed. (A lower bound:
    a busy machine can only make the retry later, never earlier.)"""
    with FaultyProxy(served[0], every_429=2, every_500=10**9, every_hang=10**9, retry_after=2.0) as proxy:
        t = OpenAIGenerator(TeacherConfig(model=str(teacher_dir), cache=None,
                                          server=ServerConfig(base_urls=[proxy.url], max_concurrency=1)))
        for i in range(2):
            t.generate([Request(f"Say hi {i}.", Sampling(temperature=0, max_tokens=3))])
        t.close()
    assert proxy.faults["429"] == 1 and t.stats["retried_429"] == 1
    rejected, retried = proxy.rejected_at[0], proxy.forwarded_at[-1]
    assert retried - rejected >= 1.9


def answers_at(port: int) -> bool:
    """Whether anything still listens on 127.0.0.1:port."""
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_launch_server_that_exits_early_or_never_gets_healthy(fast_config, tmp_path):
    early = tmp_path / "early.yaml"
    early.write_text(fast_config.read_text() + "teacher:\n  launch_command: " + json.dumps(
        [sys.executable, "-c", "import sys; print('unknown flag --port'); sys.exit(3)"]) + "\n")
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", "m", "--launch", "--out", tmp_path / "r1",
            "--config", early)
    assert r.returncode == 1 and "exited with code 3" in r.stderr and "unknown flag --port" in r.stderr
    never = tmp_path / "never.yaml"  # a web server with no /health: it answers 404 for ever
    never.write_text(fast_config.read_text() + "teacher:\n  launch_timeout: 8\n  launch_command: " + json.dumps(
        [sys.executable, "-u", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]) + "\n")
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", "m", "--launch", "--out", tmp_path / "r2",
            "--config", never)
    assert r.returncode == 1 and "did not answer /health within 8 s" in r.stderr
    log = (tmp_path / "r2" / "teacher-server.log").read_text()
    assert "Serving HTTP on 127.0.0.1 port " in log  # it was up, answering 404 to /health
    port = log.split("port ")[1].split()[0]
    assert not answers(f"http://127.0.0.1:{port}/v1") and not answers_at(int(port))  # and it was stopped


def test_prefill_and_choice_fall_back_on_a_server_without_them(teacher_dir, served):
    """transformers serve answers 422 to vLLM's continue_final_message and structured_outputs fields: the
    request goes again without them (once per server), and the reply is parsed as free text."""
    url, log = served
    refused_before = settled(lambda: log.read_text().count("422"))  # the module's server logs other tests' too
    t = OpenAIGenerator(TeacherConfig(model=str(teacher_dir), cache=None, server=ServerConfig(base_urls=[url])))
    prompt = "Task: Write a short poem about the ocean."
    reqs = [Request(prompt, Sampling(temperature=0, max_tokens=12), prefill="Example 1\nInput:"),
            Request("Is it classification?", Sampling(temperature=0, max_tokens=3), choices=("Yes", "No"))]
    first = t.generate(reqs[:1]) + t.generate(reqs[1:])
    again = t.generate(reqs)
    t.close()
    assert all(o[0].text for o in first + again)
    assert not first[0][0].text.startswith("Example 1\nInput:")  # not continued: nothing was prefilled
    assert t.stats["fallback_continue_final_message"] == 1 and t.stats["fallback_structured_outputs"] == 1
    # each field was refused once, then never sent again (a server logs a request after answering it)
    assert settled(lambda: log.read_text().count("422")) - refused_before == 2
    assert t.endpoints[0].rejects_prefill and t.endpoints[0].rejects_structured_outputs
