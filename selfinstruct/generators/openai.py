"""OpenAI-compatible backend: `vllm serve`, `transformers serve`, or a hosted endpoint.

    teacher = OpenAIGenerator(TeacherConfig(backend="openai", model="m", base_urls=["http://127.0.0.1:8000/v1"]))

- One asyncio loop in a background thread runs every request, so `max_concurrency` bounds what is
  in flight across all callers (a step and the next step's prefetch), over one connection pool.
- Requests are spread round-robin over the base URLs. An endpoint that fails `dead_after` times in a
  row (connection error, timeout, 5xx) leaves the rotation for `dead_cooldown` seconds, then is
  tried again; requests go to the others meanwhile.
- Retries with exponential backoff and jitter on connection errors, timeouts, 408/429/5xx; a
  Retry-After header (seconds or an HTTP date) is honoured. Every retry and failure is counted in
  `stats`; a request that fails `max_retries + 1` times ends the call with TeacherError.
- Chat stages that expect a format prefill the assistant's reply (`continue_final_message`), and
  Yes/No-style stages ask for a choice (`structured_outputs`): vLLM's extensions of the API.
- Per-server fallbacks: a server that ignores `n` (transformers serve) gets the missing samples as
  separate requests with shifted seeds; one that rejects `response_format`, `structured_outputs` or
  `continue_final_message` (a 4xx naming the field) gets the request again without it, and never
  again; its free-text replies are parsed as they come.
- The API key is read from the environment variable named in the config and sent only as a header.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlparse

import aiohttp

from selfinstruct.config import TeacherConfig
from selfinstruct.errors import TeacherError, UserError
from selfinstruct.generators.base import Completion, Request, choice_budget, cut_at_stop, teacher_name, with_prefill

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
# Request fields some servers lack (vLLM has all three; transformers serve none): a 4xx naming one turns it
# off for that server, and the request goes again without it.
OPTIONAL_FIELDS = {"response_format": "rejects_response_format", "structured_outputs": "rejects_structured_outputs",
                   "continue_final_message": "rejects_prefill"}


def normalise_url(url: str) -> str:
    """`http://host:8000` and `http://host:8000/v1/` both mean `http://host:8000/v1`."""
    url = url.rstrip("/")
    return url + "/v1" if urlparse(url).path in ("", "/") else url


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), None if absent/invalid."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class Endpoint:
    def __init__(self, url: str):
        self.url = url
        self.failures = 0  # in a row
        self.dead_until = 0.0
        self.ignores_n = False
        self.rejects_response_format = False
        self.rejects_prefill = False
        self.rejects_structured_outputs = False


class OpenAIGenerator:
    concurrent = True
    enforces_choices = False  # asked for (structured_outputs), but a server may ignore it: answers are parsed

    def __init__(self, cfg: TeacherConfig, health: Callable[[], None] | None = None):
        if not cfg.server.base_urls:
            raise UserError("the openai backend needs at least one --base-url (e.g. http://127.0.0.1:8000/v1)")
        self.cfg = cfg
        self.health = health  # a launched server's check: raises at once when it died (launch.Server.check)
        self.name, adapter = teacher_name(cfg)
        # A student adapter is loaded into each server at runtime (vllm serve --enable-lora with
        # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and requested by its name.
        self.served = adapter or cfg.model
        self._adapter_loaded = not cfg.lora_path
        self.endpoints = [Endpoint(normalise_url(u)) for u in cfg.server.base_urls]
        self.chat = cfg.prompt_format != "completion"
        self.counts: Counter = Counter()
        key = os.environ.get(cfg.server.api_key_env)
        if key and not cfg.server.allow_plain_http:
            for u in cfg.server.base_urls:
                url = urlparse(u)
                if url.scheme == "http" and url.hostname not in ("127.0.0.1", "localhost", "::1"):
                    raise UserError(f"the API key (${cfg.server.api_key_env}) would cross the network unencrypted "
                                    f"to {url.hostname}: use an https URL, or set teacher.server.allow_plain_http: "
                                    "true if that network is trusted")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-http", daemon=True)
        self._thread.start()
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        self._loading: asyncio.Lock | None = None

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    @property
    def ignores_n(self) -> set[str]:
        return {e.url for e in self.endpoints if e.ignores_n}

    @property
    def stats(self) -> dict:
        return dict(self.counts)

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        return self.submit(requests).result()

    def submit(self, requests: list[Request]) -> Future:
        return asyncio.run_coroutine_threadsafe(self._generate(requests), self._loop)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._session is not None:
            asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _generate(self, requests: list[Request]) -> list[list[Completion]]:
        if self._session is None:  # created on the loop that uses it
            # aiohttp rather than httpx: httpcore's pool rescans every connection for every queued
            # request, which costs ~10 ms of CPU per request at 64 in flight (bench/teacher.py).
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.server.request_timeout),
                connector=aiohttp.TCPConnector(limit=self.cfg.server.max_concurrency, limit_per_host=0))
            self._sem = asyncio.Semaphore(self.cfg.server.max_concurrency)
            self._loading = asyncio.Lock()
        if not self._adapter_loaded:
            async with self._loading:  # several steps' batches arrive at once: the first loads it, once
                if not self._adapter_loaded:
                    await asyncio.gather(*(self._load_adapter(e.url) for e in self.endpoints))
                    self._adapter_loaded = True
        tasks = [asyncio.ensure_future(self._one(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    async def _load_adapter(self, url: str) -> None:
        """vLLM's runtime LoRA loading: POST /v1/load_lora_adapter {lora_name, lora_path}."""
        body = {"lora_name": self.served, "lora_path": str(Path(self.cfg.lora_path).resolve())}
        try:
            async with self._session.post(f"{url}/load_lora_adapter", json=body, headers=self._headers) as r:
                text = await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise TeacherError(f"{url}: cannot load the student adapter: {e!r}") from None
        if r.status != 200 and "already" not in text.lower():
            raise TeacherError(
                f"{url}: loading adapter {self.served} failed ({r.status}: {text[:200]}). The server must run "
                "`vllm serve BASE --enable-lora` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and see the adapter "
                "at the same path.")
        self.counts["adapters_loaded"] += 1

    async def _one(self, req: Request) -> list[Completion]:
        n = req.sampling.n
        out = await self._post(req, n, 0)
        while len(out) < n:  # the server returned fewer choices than asked: it ignores `n`
            more = await self._post(req, 1, len(out))
            if not more:
                raise TeacherError(f"teacher server answered with no choices for model '{self.name}'")
            out += more
        return out[:n]

    def _pick(self) -> Endpoint | None:
        now = time.monotonic()
        alive = [e for e in self.endpoints if e.dead_until <= now]
        if not alive:
            return None
        ep = alive[self._next % len(alive)]
        self._next += 1
        return ep

    def _body(self, ep: Endpoint, req: Request, n: int, sample: int) -> dict:
        s = req.sampling
        body: dict = {"model": self.served, "max_tokens": s.max_tokens, "temperature": s.temperature,
                      "top_p": s.top_p}
        if self.chat:
            prefill = req.prefill and not ep.rejects_prefill
            body["messages"] = (req if prefill else dataclasses.replace(req, prefill=None)).messages()
            if prefill:  # vLLM's (and SGLang's) extension: continue the assistant's message
                body.update(continue_final_message=True, add_generation_prompt=False)
        else:
            body["prompt"] = req.prompt
        # Only what differs from the defaults: some servers warn about or reject fields they lack.
        if s.stop:
            body["stop"] = list(s.stop)
        if n > 1 and not ep.ignores_n:
            body["n"] = n
        if s.seed is not None:
            body["seed"] = s.seed + sample
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if req.choices and not ep.rejects_structured_outputs:  # vLLM's field; other servers may ignore it
            body["structured_outputs"] = {"choice": list(req.choices)}
            body["max_tokens"] = max(s.max_tokens, choice_budget(req.choices))
        if req.json_schema is not None and not ep.rejects_response_format:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": req.json_schema}}
        return body

    async def _post(self, req: Request, n: int, sample: int) -> list[Completion]:
        problem = "no attempt"
        for attempt in range(self.cfg.server.max_retries + 1):
            ep = self._pick()
            while ep is None:  # every endpoint is cooling down: wait for the first to come back
                await asyncio.sleep(max(0.05, min(e.dead_until for e in self.endpoints) - time.monotonic()))
                ep = self._pick()
            endpoint = ep.url + ("/chat/completions" if self.chat else "/completions")
            wait = None
            body = self._body(ep, req, n, sample)
            try:
                async with self._sem:
                    self.counts["sent"] += 1
                    async with self._session.post(endpoint, json=body, headers=self._headers) as resp:
                        status, text, headers = resp.status, await resp.text(errors="replace"), resp.headers
            except asyncio.CancelledError:  # the run no longer needs it (it ended, or its step was dropped)
                self.counts["cancelled"] += 1
                raise
            except asyncio.TimeoutError as e:
                problem = f"{endpoint}: timed out after {self.cfg.server.request_timeout} s ({type(e).__name__})"
                self._failed(ep, "retried_timeout")
                if self.health is not None:
                    self.health()
            except aiohttp.ClientError as e:
                problem = f"{endpoint}: ConnectError: {type(e).__name__}: {e}"
                self._failed(ep, "retried_connection")
                if self.health is not None:  # a launched server that died: say so now, with its log
                    self.health()
            else:
                if status == 429:  # alive but busy: back off, keep it in rotation
                    problem = f"{endpoint}: HTTP 429"
                    self.counts["retried_429"] += 1
                    wait = retry_after(headers.get("retry-after"))
                elif status in RETRY_STATUS:
                    problem = f"{endpoint}: HTTP {status}: {text[:200]}"
                    self._failed(ep, f"retried_{status}")
                    wait = retry_after(headers.get("retry-after"))
                elif status >= 400:
                    named = [f for f in OPTIONAL_FIELDS if f in body and f in text]
                    if named:  # a server without these extensions: again without them, the parsers cope
                        for f in named:
                            if not getattr(ep, OPTIONAL_FIELDS[f]):
                                self.counts[f"fallback_{f}"] += 1
                            setattr(ep, OPTIONAL_FIELDS[f], True)
                            self.counts[f"retried_4xx_{f}"] += 1
                        continue
                    self.counts["failed_4xx"] += 1
                    raise UserError(f"teacher server {endpoint} rejected the request with HTTP {status}: {text[:300]}")
                else:
                    out = self._answered(ep, req, body, text, n)
                    if out is not None:
                        return out
                    problem = f"{endpoint}: answered 200 with a body that is not a completion: {text[:200]}"
            if attempt < self.cfg.server.max_retries:
                backoff = min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random())
                await asyncio.sleep(min(120.0, wait) if wait is not None else backoff)
        self.counts["failed"] += 1
        raise TeacherError(f"a teacher request failed {self.cfg.server.max_retries + 1} times; last: {problem}. "
                           "Accepted records are on disk: fix the server and re-run with --resume.")

    def _answered(self, ep: Endpoint, req: Request, body: dict, text: str, n: int) -> list[Completion] | None:
        """A 200's completions, with the server's token counts; None (counted, to retry) when the body is none."""
        try:
            data = json.loads(text)
            out = self._parse(data, req, bool(body.get("continue_final_message")))
        except (ValueError, AttributeError, TypeError, RecursionError):  # RecursionError: deep nesting
            out = None
        usage = data.get("usage") if out is not None and isinstance(data, dict) else None
        if isinstance(usage, dict):  # tokens in and out, as the server counts them
            self.counts["tokens_in"] += self._tokens(usage.get("prompt_tokens"))
            self.counts["tokens_out"] += self._tokens(usage.get("completion_tokens"))
        if out is None:  # a 200 whose body is no completion: a misbehaving server, retried
            self._failed(ep, "retried_bad_json")
            return None
        ep.failures = 0
        self.counts["ok"] += 1
        if 0 < len(out) < n:
            ep.ignores_n = True
        return out

    def _failed(self, ep: Endpoint, what: str) -> None:
        self.counts[what] += 1
        ep.failures += 1
        if ep.failures >= self.cfg.server.dead_after:
            ep.dead_until = time.monotonic() + self.cfg.server.dead_cooldown
            ep.failures = 0
            self.counts["endpoint_taken_out"] += 1

    def _tokens(self, value: object) -> int:
        """A token count from a server's `usage`; anything but a whole number is counted as bad_usage."""
        if value is None:
            return 0
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        self.counts["bad_usage"] += 1
        return 0

    def _parse(self, data: dict, req: Request, continued: bool) -> list[Completion]:
        out = []
        for choice in data.get("choices") or []:
            text = (choice.get("message") or {}).get("content") if self.chat else choice.get("text")
            if not isinstance(text, str | None):
                raise TypeError("content is not a string")
            text, stopped = cut_at_stop(text or "", req.sampling.stop)
            reason = "stop" if stopped else (choice.get("finish_reason") or "stop")
            out.append(Completion(with_prefill(req, text, continued), "length" if reason == "length" else "stop"))
        return out
