"""In-process vLLM backend: a whole generation step in one `LLM.generate` / `LLM.chat` call.

    teacher = VLLMTeacher(TeacherConfig(backend="vllm", model="Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=2))

vLLM batches continuously, so it is only fast when it sees every request of a step at once: we
pass them all, each with its own SamplingParams (seeds differ per request). `max_tokens` is always
set (vLLM's default is 16). With `lora_path`, every request runs on that LoRA adapter (a student).
A request that carries a JSON schema gets structured output. The mapping lives in plain
functions (`sampling_kwargs`, `engine_kwargs`) so it is tested without vLLM or a GPU.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from selfinstruct.config import Sampling, TeacherConfig
from selfinstruct.errors import UserError
from selfinstruct.teacher.base import Completion, Request, cut_at_stop, teacher_name, use_chat


def sampling_kwargs(s: Sampling) -> dict[str, Any]:
    """Our sampling parameters as vllm.SamplingParams keyword arguments."""
    return {"n": s.n, "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
            "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
            "seed": s.seed, "stop": list(s.stop) or None}


def engine_kwargs(cfg: TeacherConfig) -> dict[str, Any]:
    """vllm.LLM keyword arguments from the teacher config."""
    kw: dict[str, Any] = {"model": cfg.model, "tensor_parallel_size": cfg.tensor_parallel_size,
                          "gpu_memory_utilization": cfg.gpu_memory_utilization,
                          "trust_remote_code": cfg.trust_remote_code}
    if cfg.max_model_len is not None:
        kw["max_model_len"] = cfg.max_model_len
    if cfg.dtype != "auto":
        kw["dtype"] = cfg.dtype
    if cfg.lora_path is not None:
        kw.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank)
    return kw


def to_completions(output: Any, stop: list[str]) -> list[Completion]:
    """A vllm RequestOutput's choices as Completions."""
    out = []
    for choice in output.outputs:
        text, stopped = cut_at_stop(choice.text, stop)
        out.append(Completion(text, "length" if choice.finish_reason == "length" and not stopped else "stop"))
    return out


class VLLMTeacher:
    def __init__(self, cfg: TeacherConfig, llm: Any = None):
        try:
            import vllm
        except ImportError:
            raise UserError("the vllm backend needs vllm: pip install -e '.[vllm]' (CUDA only); or serve the "
                            "teacher with `vllm serve` and use --backend openai") from None
        self._vllm = vllm
        self.cfg = cfg
        self.name, adapter = teacher_name(cfg)
        self.counts: Counter = Counter()
        self.llm = llm if llm is not None else vllm.LLM(**engine_kwargs(cfg))
        self.chat = use_chat(cfg, bool(getattr(self.llm.get_tokenizer(), "chat_template", None)))
        self.lora = None
        if cfg.lora_path is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest(adapter, 1, cfg.lora_path)

    def _params(self, req: Request) -> Any:
        kw = sampling_kwargs(req.sampling)
        if req.json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(json=req.json_schema)
        return self._vllm.SamplingParams(**kw)

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        if not requests:
            return []
        params = [self._params(r) for r in requests]
        if self.chat:
            outs = self.llm.chat([[{"role": "user", "content": r.prompt}] for r in requests], params,
                                 use_tqdm=False, lora_request=self.lora)
        else:
            outs = self.llm.generate([r.prompt for r in requests], params, use_tqdm=False, lora_request=self.lora)
        for o in outs:
            self.counts["tokens_in"] += len(o.prompt_token_ids or [])
            self.counts["tokens_out"] += sum(len(c.token_ids) for c in o.outputs)
        return [to_completions(o, list(r.sampling.stop)) for o, r in zip(outs, requests, strict=True)]

    @property
    def stats(self) -> dict:
        return dict(self.counts)

    def close(self) -> None:
        self.llm = None
