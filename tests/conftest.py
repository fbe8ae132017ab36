"""Shared fixtures: tiny models built once per test session (seconds), and CLI helpers."""

from __future__ import annotations

import os
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

# Fast generation settings for tiny models (the paper's defaults are tested in test_config).
FAST_CONFIG = """\
generate:
  request_batch_size: 4
  max_stalled_requests: 200
  instruction_sampling: {temperature: 1.0, top_p: 1.0, max_tokens: 96, stop: ["\\n\\n", "\\n16", "16.", "16 ."]}
  instance_sampling: {temperature: 0.0, max_tokens: 96, stop: ["Task:"]}
  alpaca: {sampling: {temperature: 1.0, max_tokens: 160}}
  evol: {rounds: 2, batch_size: 5, evolve_sampling: {temperature: 1.0, max_tokens: 48},
         response_sampling: {temperature: 1.0, max_tokens: 64}}
train:
  epochs: 2
  batch_size: 4
  logging_steps: 1
  max_length: 256
"""


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test gets an empty response cache (the default one lives under $XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer()


def trained(tmp_path_factory, tokenizer, name: str, examples, steps: int, hidden: int = 96, seed: int = 0) -> Path:
    model = tiny.build_model(tokenizer, hidden=hidden, layers=2, seed=seed)
    tiny.finetune(model, tokenizer, examples, steps=steps, batch=8, lr=5e-3)
    return tiny.save(model, tokenizer, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama fine-tuned for ~15 s on well-formed answers to our Self-Instruct prompts."""
    return trained(tmp_path_factory, tokenizer, "teacher", tiny.teacher_examples(), steps=200)


@pytest.fixture(scope="session")
def alpaca_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama fine-tuned on well-formed continuations of the Alpaca prompt only."""
    return trained(tmp_path_factory, tokenizer, "alpaca_teacher", tiny.alpaca_examples(), steps=150, seed=2)


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
    return tiny.save(tiny.build_model(tokenizer, hidden=64, layers=2, seed=1), tokenizer,
                     tmp_path_factory.mktemp("random"))


@pytest.fixture()
def fast_config(tmp_path) -> Path:
    path = tmp_path / "fast.yaml"
    path.write_text(FAST_CONFIG)
    return path


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run the installed console script like a user would; returns the CompletedProcess."""
    return subprocess.run(["selfinstruct", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)
