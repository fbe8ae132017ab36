"""The models a run talks to besides the teacher, as generator configurations: the student (base, or base +
a round's adapter) and the judge.

    make_generator(student_config(cfg, adapter))     # a round's student, on eval.backend
    make_generator(judge_config(cfg))                # eval.judge (default: the teacher), run like the teacher
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from selfinstruct.config import Config, TeacherConfig
from selfinstruct.generators import resolve_backend


def student_config(cfg: Config, adapter: str | Path | None) -> TeacherConfig:
    """The student (base, or base + a round's adapter) as a generator, on `eval.backend`."""
    backend = resolve_backend(cfg.eval.backend, [])
    return dataclasses.replace(cfg.teacher, model=cfg.train.student, backend=backend, launch=False,
                               lora_path=str(adapter) if adapter else None,
                               enable_lora=cfg.teacher.enable_lora or backend == "vllm",  # one engine, all adapters
                               base_urls=cfg.teacher.base_urls if backend == "openai" else [])


def judge_config(cfg: Config) -> TeacherConfig:
    """The judge (`eval.judge`, default the teacher): the teacher's backend and servers, no adapter."""
    return dataclasses.replace(cfg.teacher, model=cfg.eval.judge or cfg.teacher.model, lora_path=None, launch=False)
