"""The models a run talks to, as generator configurations, and every decision about LoRA support, in one
place: the teacher (cfg.teacher), the student (base, or base + a round's adapter) and the judge. The student
and the judge share the teacher's servers (teacher.server) and engine settings (teacher.engine).

    make_generator(student_config(cfg, adapter))     # a round's student, on eval.backend
    make_generator(judge_config(cfg))                # eval.judge (default: the teacher), run like the teacher
    cfg = share_engine(cfg)                          # `run`: one vLLM engine for teacher, judge and students
    check_servable(cfg)                              # `run`: the students' adapters are ones vLLM can load
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from selfinstruct.config import Config, TeacherConfig
from selfinstruct.errors import UserError
from selfinstruct.generators import resolve_backend


def launched(teacher: TeacherConfig, url: str) -> TeacherConfig:
    """The teacher once its launched server (teacher.server.launch) is up: an openai client of that server."""
    return dataclasses.replace(teacher, backend="openai",
                               server=dataclasses.replace(teacher.server, base_urls=[url]))


def student_config(cfg: Config, adapter: str | Path | None) -> TeacherConfig:
    """The student (base, or base + a round's adapter) as a generator, on `eval.backend`."""
    backend = resolve_backend(cfg.eval.backend, [])
    server = dataclasses.replace(cfg.teacher.server, launch=False,
                                 base_urls=cfg.teacher.server.base_urls if backend == "openai" else [])
    engine = dataclasses.replace(cfg.teacher.engine,  # on vLLM: one engine for the base and every adapter
                                 enable_lora=cfg.teacher.engine.enable_lora or backend == "vllm")
    return dataclasses.replace(cfg.teacher, model=cfg.train.student, backend=backend, server=server, engine=engine,
                               lora_path=str(adapter) if adapter else None)


def judge_config(cfg: Config) -> TeacherConfig:
    """The judge (`eval.judge`, default the teacher): the teacher's backend and servers, no adapter."""
    return dataclasses.replace(cfg.teacher, model=cfg.eval.judge or cfg.teacher.model, lora_path=None,
                               server=dataclasses.replace(cfg.teacher.server, launch=False))


def share_engine(cfg: Config) -> Config:
    """When students run on in-process vLLM, the teacher's and judge's engines get LoRA support too, so
    one engine serves them all when they share a base model (an engine start costs a minute or more)."""
    if student_config(cfg, None).backend != "vllm":
        return cfg
    engine = dataclasses.replace(cfg.teacher.engine, enable_lora=True)
    return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, engine=engine))


def check_servable(cfg: Config) -> None:
    """When vLLM serves the students (eval.backend vllm or openai), their adapters must be ones it can
    load: plain LoRA with rank <= teacher.engine.max_lora_rank (our defaults). DoRA or a larger rank is the
    user opting out, which only the transformers backend can then run."""
    if student_config(cfg, None).backend not in ("vllm", "openai"):  # auto resolves as it will run
        return
    if cfg.train.use_dora:
        raise UserError("train.use_dora makes adapters vLLM cannot serve; use eval.backend: transformers, or "
                        "plain LoRA")
    rank = cfg.teacher.engine.max_lora_rank
    if cfg.train.lora_r > rank:
        raise UserError(f"train.lora_r {cfg.train.lora_r} > teacher.engine.max_lora_rank {rank}: vLLM would refuse "
                        "the adapters; raise max_lora_rank (and the server's --max-lora-rank) or lower lora_r")
