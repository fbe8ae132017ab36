"""OpenAI-compatible backend: `vllm serve`, `transformers serve`, or a hosted endpoint.

    teacher = OpenAITeacher(TeacherConfig(backend="openai", model="m", base_urls=["http://127.0.0.1:8000/v1"]))

Requests go out concurrently (at most `max_concurrency` in flight), spread round-robin over the
base URLs, with retries on connection errors, timeouts, 429 and 5xx. A server that ignores `n`
(transformers serve does) gets the missing samples as separate requests with shifted seeds.
The API key is read from the environment variable named in the config and sent only as a header.
"""

from __future__ import annotations

import asyncio
import os
import random
from urllib.parse import urlparse

import httpx

from selfinstruct.config import TeacherConfig
from selfinstruct.errors import TeacherError, UserError
from selfinstruct.teacher.base import Completion, Request, cut_at_stop

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def normalise_url(url: str) -> str:
    """`http://host:8000` and `http://host:8000/v1/` both mean `http://host:8000/v1`."""
    url = url.rstrip("/")
    return url + "/v1" if urlparse(url).path in ("", "/") else url


class OpenAITeacher:
    def __init__(self, cfg: TeacherConfig):
        if not cfg.base_urls:
            raise UserError("the openai backend needs at least one --base-url (e.g. http://127.0.0.1:8000/v1)")
        self.cfg = cfg
        self.name = cfg.model
        self.urls = [normalise_url(u) for u in cfg.base_urls]
        self.chat = cfg.prompt_format != "completion"
        self.ignores_n: set[str] = set()  # servers seen returning fewer choices than asked
        key = os.environ.get(cfg.api_key_env)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._next = 0

    def close(self) -> None:
        pass

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        return asyncio.run(self._generate(requests))

    async def _generate(self, requests: list[Request]) -> list[list[Completion]]:
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=self.cfg.request_timeout, limits=limits) as client:
            sem = asyncio.Semaphore(self.cfg.max_concurrency)
            return list(await asyncio.gather(*(self._one(client, sem, r) for r in requests)))

    async def _one(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, req: Request) -> list[Completion]:
        url = self.urls[self._next % len(self.urls)]
        self._next += 1
        n = req.sampling.n
        out = await self._post(client, sem, url, req, n if url not in self.ignores_n else 1, 0)
        while len(out) < n:
            self.ignores_n.add(url)
            more = await self._post(client, sem, url, req, 1, len(out))
            if not more:
                raise TeacherError(f"teacher server {url} answered with no choices")
            out += more
        return out[:n]

    def _body(self, req: Request, n: int, sample: int) -> dict:
        s = req.sampling
        body: dict = {"model": self.name, "max_tokens": s.max_tokens, "temperature": s.temperature,
                      "top_p": s.top_p}
        if self.chat:
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        # Only what differs from the defaults: some servers warn about or reject fields they lack.
        if s.stop:
            body["stop"] = list(s.stop)
        if n > 1:
            body["n"] = n
        if s.seed is not None:
            body["seed"] = s.seed + sample
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        return body

    async def _post(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, url: str, req: Request,
                    n: int, sample: int) -> list[Completion]:
        endpoint = url + ("/chat/completions" if self.chat else "/completions")
        body = self._body(req, n, sample)
        problem = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random()))
            try:
                async with sem:
                    resp = await client.post(endpoint, json=body, headers=self._headers)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code in RETRY_STATUS:
                problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                raise UserError(f"teacher server {endpoint} rejected the request with HTTP "
                                f"{resp.status_code}: {resp.text[:300]}")
            return self._parse(resp.json(), req)
        raise TeacherError(f"teacher server {endpoint} failed {self.cfg.max_retries + 1} times; last: {problem}")

    def _parse(self, data: dict, req: Request) -> list[Completion]:
        out = []
        for choice in data.get("choices") or []:
            text = (choice.get("message") or {}).get("content") if self.chat else choice.get("text")
            text, stopped = cut_at_stop(text or "", req.sampling.stop)
            reason = "stop" if stopped else (choice.get("finish_reason") or "stop")
            out.append(Completion(text, "length" if reason == "length" else "stop"))
        return out
