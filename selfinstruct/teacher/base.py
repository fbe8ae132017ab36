"""The teacher interface: a batch of requests in, a list of completions per request out.

    teacher = make_teacher(cfg.teacher)
    outs = teacher.generate([Request("Come up with...", sampling)])   # outs[i]: n Completions
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from selfinstruct.config import Sampling, TeacherConfig
from selfinstruct.errors import UserError


@dataclass(frozen=True)
class Request:
    """One prompt (rendered from a template) and how to sample from it."""

    prompt: str
    sampling: Sampling


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (ended by itself or a stop string) or "length" (hit max_tokens)


class Teacher(Protocol):
    name: str

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        """Completions for every request, in order; `sampling.n` of them each."""
        ...

    def close(self) -> None: ...


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string (servers differ in whether they do it themselves)."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def make_teacher(cfg: TeacherConfig) -> Teacher:
    # `auto` will pick the in-process vllm engine once that backend exists; until then vllm users
    # point the openai backend at `vllm serve`.
    backend = cfg.backend
    if backend == "auto":
        backend = "openai" if cfg.base_urls else "transformers"
    if backend == "openai":
        from selfinstruct.teacher.openai import OpenAITeacher

        return OpenAITeacher(cfg)
    if backend == "transformers":
        from selfinstruct.teacher.hf import HFTeacher

        return HFTeacher(cfg)
    raise UserError("the in-process vllm backend is not in this version yet: serve the teacher with "
                    "`vllm serve MODEL` and pass --backend openai --base-url http://127.0.0.1:8000/v1")
