"""The run manifest: what produced a run directory, so it can be reproduced and audited.

    write_manifest(run_dir, timings={"generate": 12.3}, teacher_stats=teacher.stats)

manifest.json holds the package versions, the git revision of the selfinstruct source (when it
runs from a checkout), the command line (credentials in URLs redacted; API keys are only ever
read from the environment and appear nowhere), timings per stage, and the teacher's tokens in and
out as the backends count them (cache hits cost no tokens). Written atomically.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from selfinstruct.errors import redact
from selfinstruct.records import write_json

PACKAGES = ("selfinstruct", "torch", "transformers", "trl", "peft", "datasets", "vllm", "aiohttp", "rapidfuzz")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    """HEAD of the checkout the package runs from (with "-dirty" for uncommitted changes), else None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if rev and dirty else rev or None


def write_manifest(run_dir: Path, timings: dict[str, float], teacher_stats: dict[str, Any] | None = None,
                   **extra: Any) -> dict[str, Any]:
    stats = teacher_stats or {}
    manifest = {
        "command": [redact(a) for a in sys.argv],
        "finished_at": datetime.now().isoformat(timespec="seconds"),
        "versions": versions(),
        "git_revision": git_revision(),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "teacher_tokens": {"in": stats.get("tokens_in", 0), "out": stats.get("tokens_out", 0)},
        **extra,
    }
    write_json(run_dir / "manifest.json", manifest)
    return manifest
