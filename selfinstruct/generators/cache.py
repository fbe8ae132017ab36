"""A persistent response cache in front of any teacher: a re-run or a resumed run pays for nothing twice.

    teacher = CachedGenerator(OpenAIGenerator(cfg), ResponseCache("~/.cache/selfinstruct/responses.sqlite"))

Key: sha256 of (model, chat or completion, prompt, system message and reply prefill if any, JSON
schema, sampling parameters without `n`, sample index). Without `n` and with the index, asking for 5
samples after 3 reuses the first 3.
SQLite in WAL mode with a busy timeout: several threads or processes (two stages, two runs) may
read and write at once. Nothing secret is in a key: the API key never reaches this layer. The file is made
with mode 0600 (prompts and replies may be private). A local model directory's key includes a fingerprint of
its weights (`model_fingerprint`), so a model replaced at the same path is never answered from the old one's
entries.

The cache cannot stop a run: a file that cannot be opened as a cache is a warning and the run goes on
without it (`make_generator`), and so does a cache that fails while the run uses it (`CachedGenerator`): the
answers then come from the teacher. Delete the file, or pass --no-cache, to silence the warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
from concurrent.futures import Future
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from selfinstruct.generators.base import Completion, Generator, Request, clean_text

console = Console(stderr=True, soft_wrap=True)


def model_fingerprint(model: str) -> str | None:
    """A local model's identity (a directory, or a .gguf file): the name, size and first and last MiB of each
    weight and config file (None for a hub id: its revision is the hub's business)."""
    p = Path(model)
    if not p.exists():
        return None
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(p.iterdir())  # a .gguf file, or a model directory
    for f in files:
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".gguf", ".pt"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read())
    return h.hexdigest()[:16]


def cache_key(model: str, chat: bool, req: Request, sample: int, fingerprint: str | None = None) -> str:
    sampling = dataclasses.asdict(req.sampling)
    sampling.pop("n")
    key = {"model": model, "chat": chat, "prompt": req.prompt, "schema": req.json_schema, "sampling": sampling,
           "sample": sample}
    if fingerprint is not None:
        key["weights"] = fingerprint
    if req.choices:
        key["choices"] = list(req.choices)
    for extra in ("system", "prefill"):  # only when set: earlier answers keep their keys
        if getattr(req, extra) is not None and chat:
            key[extra] = getattr(req, extra)
    blob = json.dumps(key, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """Raises sqlite3.DatabaseError or OSError when `path` cannot be used as a cache."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # made private before SQLite writes anything into it
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
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
                    found[key] = Completion(clean_text(text), finish)  # entries from before clean_text too
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

    def __init__(self, inner: Generator, cache: ResponseCache, fingerprint: str | None = None):
        self.inner, self.cache, self.fingerprint = inner, cache, fingerprint
        self.name, self.chat = inner.name, inner.chat
        self.broken = ""  # why the cache was given up mid-run ("": it works)
        self.concurrent, self.enforces_choices = inner.concurrent, inner.enforces_choices
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    @property
    def stats(self) -> dict:
        return {**self.inner.stats, "cache_hits": self.hits, "cache_misses": self.misses}

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        return self.submit(requests).result()

    def _give_up(self, e: Exception) -> None:
        if not self.broken:
            self.broken = f"{type(e).__name__}: {e}"
            console.print(f"[yellow]warning:[/] the response cache {escape(str(self.cache.path))} failed "
                          f"({escape(self.broken)}): going on without it", highlight=False)

    def submit(self, requests: list[Request]) -> Future:
        if self.broken:
            return self.inner.submit(requests)
        keys = [[cache_key(self.name, self.chat, r, k, self.fingerprint) for k in range(r.sampling.n)]
                for r in requests]
        try:
            found = self.cache.get_many([k for ks in keys for k in ks])
        except (sqlite3.Error, OSError) as e:
            self._give_up(e)
            return self.inner.submit(requests)
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
                try:
                    self.cache.put_many(new)
                except (sqlite3.Error, OSError) as e:
                    self._give_up(e)
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
        with contextlib.suppress(sqlite3.Error):
            self.cache.close()
