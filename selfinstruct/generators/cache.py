"""A persistent response cache in front of any teacher: a re-run or a resumed run pays for nothing twice.

    teacher = CachedGenerator(OpenAIGenerator(cfg), ResponseCache("~/.cache/selfinstruct/responses.sqlite"))

Key: sha256 of (model, chat or completion, prompt, system message and reply prefill if any, JSON
schema, sampling parameters without `n`, sample index). Without `n` and with the index, asking for 5
samples after 3 reuses the first 3.
SQLite in WAL mode with a busy timeout: several threads or processes (two stages, two runs) may
read and write at once. Nothing secret is in a key: the API key never reaches this layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
from concurrent.futures import Future
from pathlib import Path

from selfinstruct.generators.base import Completion, Generator, Request


def cache_key(model: str, chat: bool, req: Request, sample: int) -> str:
    sampling = dataclasses.asdict(req.sampling)
    sampling.pop("n")
    key = {"model": model, "chat": chat, "prompt": req.prompt, "schema": req.json_schema, "sampling": sampling,
           "sample": sample}
    if req.choices:
        key["choices"] = list(req.choices)
    for extra in ("system", "prefill"):  # only when set: earlier answers keep their keys
        if getattr(req, extra) is not None and chat:
            key[extra] = getattr(req, extra)
    blob = json.dumps(key, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                         "finish TEXT NOT NULL)")

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
                chunk = keys[start: start + 500]
                marks = ",".join("?" * len(chunk))
                for key, text, finish in self._db.execute(
                        f"SELECT key, text, finish FROM responses WHERE key IN ({marks})", chunk):
                    found[key] = Completion(text, finish)
        return found

    def put_many(self, items: dict[str, Completion]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)",
                                 [(k, c.text, c.finish_reason) for k, c in items.items()])
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedGenerator:
    """Answers what the cache knows; asks the inner generator for requests with any sample missing (through its
    `submit`, so a concurrent backend keeps serving other callers meanwhile)."""

    def __init__(self, inner: Generator, cache: ResponseCache):
        self.inner, self.cache = inner, cache
        self.name, self.chat = inner.name, inner.chat
        self.concurrent, self.enforces_choices = inner.concurrent, inner.enforces_choices
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    @property
    def stats(self) -> dict:
        return {**self.inner.stats, "cache_hits": self.hits, "cache_misses": self.misses}

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        return self.submit(requests).result()

    def submit(self, requests: list[Request]) -> Future:
        keys = [[cache_key(self.name, self.chat, r, k) for k in range(r.sampling.n)] for r in requests]
        found = self.cache.get_many([k for ks in keys for k in ks])
        missing = [i for i, ks in enumerate(keys) if any(k not in found for k in ks)]
        with self._lock:
            self.hits += len(requests) - len(missing)
            self.misses += len(missing)
        result: Future = Future()
        if not missing:
            result.set_result([[found[k] for k in ks] for ks in keys])
            return result

        def store(asked: Future) -> None:
            if result.done():  # cancelled by the caller
                return
            try:
                outs = asked.result()
                # Samples already cached stay as they were; only the missing indices are filled in.
                new = {k: c for i, out in zip(missing, outs, strict=True)
                       for k, c in zip(keys[i], out, strict=True) if k not in found}
                self.cache.put_many(new)
                found.update(new)
                result.set_result([[found[k] for k in ks] for ks in keys])
            except BaseException as e:  # noqa: BLE001 - the inner generator's failure, delivered to the caller
                if not result.done():
                    result.set_exception(e)

        asked = self.inner.submit([requests[i] for i in missing])
        result.add_done_callback(lambda f: asked.cancel() if f.cancelled() else None)
        asked.add_done_callback(store)
        return result

    def close(self) -> None:
        self.inner.close()
        self.cache.close()
