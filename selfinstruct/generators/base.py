"""The generator interface (teachers, students and judges alike): a batch of requests in, a list of
completions per request out, and the helpers every backend shares.

    gen = make_generator(cfg.teacher)      # selfinstruct.generators, the package's face
    outs = gen.generate([Request("Come up with...", sampling)])   # outs[i]: n Completions
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from selfinstruct.config import Sampling, TeacherConfig
from selfinstruct.errors import UserError
from selfinstruct.records import clean_text


@dataclass(frozen=True)
class Request:
    """One prompt (rendered from a template) and how to sample from it."""

    prompt: str
    sampling: Sampling
    json_schema: dict | None = None  # ask for JSON of this schema where the backend can enforce it
    system: str | None = None  # a system message before the prompt (chat teachers; completion ones ignore it)
    # The start of the assistant's reply, for stages that expect a format ("Example 1\nInput:"): a chat
    # teacher continues it, and its Completion text begins with it. Completion-format teachers ignore it
    # (their prompt already ends where the format starts).
    prefill: str | None = None
    # The answer must be one of these (Yes / No, Equal / Not Equal): enforced where the backend can
    # (`enforces_choices`: vLLM's structured outputs, a likelihood comparison on transformers), asked
    # for otherwise (a server's structured_outputs field), and parsed from free text where ignored.
    choices: tuple[str, ...] | None = None

    def messages(self) -> list[dict[str, str]]:
        """The request as a chat: the system message, if any, the prompt as the user's turn, and the
        prefilled start of the assistant's reply, if any (to be continued, not closed)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "assistant", "content": self.prefill}] if self.prefill else []
        return [*head, {"role": "user", "content": self.prompt}, *tail]


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (ended by itself or a stop string) or "length" (hit max_tokens)


class Generator(Protocol):
    """What every backend offers (in-process transformers and vLLM, OpenAI-compatible servers, the cache).

    `concurrent`: `submit` returns at once and the work proceeds while the caller goes on (servers);
    a backend that cannot run concurrently answers `submit` with a finished future.
    `enforces_choices`: a request's `choices` are guaranteed, not just asked for.
    `chat`: prompts go out as chat messages (the cache keys on it)."""

    name: str
    chat: bool
    concurrent: bool
    enforces_choices: bool

    @property
    def stats(self) -> dict: ...

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        """Completions for every request, in order; `sampling.n` of them each."""
        ...

    def submit(self, requests: list[Request]) -> Future:
        """`generate` as a future."""
        ...

    def close(self) -> None: ...


def finished(generate: Callable[[list[Request]], list[list[Completion]]], requests: list[Request]) -> Future:
    """`submit` for a backend that cannot run concurrently: the answers, computed now, as a done future."""
    fut: Future = Future()
    try:
        fut.set_result(generate(requests))
    except Exception as e:  # noqa: BLE001 - delivered through the future, as a concurrent backend would
        fut.set_exception(e)
    return fut


class Blocking:
    """The `Generator` defaults of a backend that answers one batch at a time (transformers in process, test
    doubles): not concurrent, `submit` answers before it returns, no enforced choices, no counters.
    Subclasses set `name`, `generate` and `close`, and override what they do differently."""

    name: str
    chat = False
    concurrent = False
    enforces_choices = False

    @property
    def stats(self) -> dict:
        return {}

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        raise NotImplementedError

    def submit(self, requests: list[Request]) -> Future:
        return finished(self.generate, requests)

    def close(self) -> None:
        pass


def use_chat(cfg: TeacherConfig, has_template: bool) -> bool:
    """Whether prompts go out as a user chat message (`auto`: when the model has a chat template)."""
    if cfg.prompt_format == "chat" and not has_template:
        raise UserError(f"teacher '{cfg.model}' has no chat template; use --prompt-format completion")
    return cfg.prompt_format == "chat" or (cfg.prompt_format == "auto" and has_template)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string (servers differ in whether they do it themselves). A stop
    string at the very start (after whitespace) is an echoed header, not the end: it never erases a reply."""
    lead = len(text) - len(text.lstrip())
    hits = []
    for s in filter(None, stop):
        i = text.find(s)
        if i == lead:  # the echo: look for the next one
            i = text.find(s, i + len(s))
        if i >= 0:
            hits.append(i)
    return (text[: min(hits)], True) if hits else (text, False)


def choice_mode(gen: Generator) -> str:
    """How a record's Yes / No or Equal answer was decided: a choice the backend enforced, or parsed text."""
    return "choice" if gen.enforces_choices else "parsed"


def choice_budget(choices: tuple[str, ...]) -> int:
    """Tokens enough for any of `choices` however it is tokenised (at least a character per token)."""
    return max(len(c) for c in choices) + 2


def with_prefill(req: Request, text: str, chat: bool) -> str:
    """A reply as the parsers see it: a chat teacher continued the prefill, so it comes first. Every backend
    builds its replies here, so this is where hostile text is made safe (clean_text)."""
    return clean_text((req.prefill or "") + text if chat else text)



def adapter_name(lora_path: str) -> str:
    """A LoRA adapter's identity: its directory name and a hash of its weights and config, so a
    retrained adapter at the same path is a different model to the response cache."""
    p = Path(lora_path)
    files = [f for f in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin") if (p / f).exists()]
    if "adapter_config.json" not in files:
        raise UserError("not a LoRA adapter directory (no adapter_config.json)", p)
    h = hashlib.sha256()
    for f in files:
        h.update((p / f).read_bytes())
    where = "-".join(p.resolve().parts[-3:-1]) if p.name == "adapter" else p.name  # e.g. round-1-train
    return f"{where}-{h.hexdigest()[:10]}"


def teacher_name(cfg: TeacherConfig) -> tuple[str, str | None]:
    """The name records and the cache know a generator by (the model, plus the adapter if any), and the
    adapter's own name (None without one); the adapter's weights are hashed once, here."""
    if not cfg.lora_path:
        return cfg.model, None
    adapter = adapter_name(cfg.lora_path)
    return f"{cfg.model}+{adapter}", adapter
