"""Looking at and publishing a generate run: `show`, exports, the dataset card, the hub.

    show_run("outputs/run", n=5, rejected=True, reason="rouge_similar")
    export_run("outputs/run", "sharegpt")            # -> outputs/run/export/sharegpt.json
    write_card(run_dir, stats, cfg)                   # dataset/README.md

Exports are written under <run>/export/ only: a `--name` that would leave that directory (an
absolute path, "..", a separator) is refused, so no output escapes the run directory.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from selfinstruct.config import Config
from selfinstruct.errors import RemoteError, UserError
from selfinstruct.records import Record, read_jsonl, write_atomic

FORMATS = {"alpaca": ".json", "chat": ".jsonl", "sharegpt": ".json", "parquet": ".parquet"}


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "generated.jsonl"
    if not path.exists():
        raise UserError("not a generate run directory (no generated.jsonl)", run)
    return read_jsonl(path)


def show_run(run: str | Path, n: int = 5, rejected: bool = False, reason: str | None = None) -> int:
    """Pretty-print the first `n` accepted records, or rejected candidates (optionally of one reason)."""
    run = Path(run)
    out = Console()
    if not rejected and reason is None:
        rows = _records(run)
        for r in rows[:n]:
            body = Text()
            body.append("instruction  ", style="bold cyan").append(r["instruction"] + "\n")
            if r["input"].strip():
                body.append("input        ", style="bold cyan").append(r["input"] + "\n")
            body.append("output       ", style="bold green").append(r["output"])
            meta = f"{r['id']} · {r['method']} · round {r['round']} · parents {', '.join(r['parents'][:4])}"
            if r.get("lineage"):
                meta += f" · depth {r['lineage']['depth']} ({' → '.join(r['lineage']['operations'])})"
            out.print(Panel(body, title=Text(meta), title_align="left"))  # Text: the data's brackets are no markup
        out.print(f"{min(n, len(rows))} of {len(rows)} accepted records")
        return len(rows)
    path = run / "rejected.jsonl"
    if not path.exists():
        raise UserError("not a generate run directory (no rejected.jsonl)", run)
    rows = read_jsonl(path)
    counts = Counter(r["reason"] for r in rows)
    if reason is not None and reason not in counts:
        known = ", ".join(f"{k} ({v})" for k, v in counts.most_common()) or "none"
        raise UserError(f"no rejection with reason '{reason}' in this run; reasons here: {known}", path)
    picked = [r for r in rows if reason is None or r["reason"] == reason]
    for r in picked[:n]:
        body = Text()
        for key, value in r.items():
            if key not in ("stage", "reason") and value not in ("", None, [], {}):
                body.append(f"{key:<12} ", style="bold cyan").append(f"{value}\n")
        out.print(Panel(body, title=Text(f"{r['reason']} · stage {r['stage']}", style="red"), title_align="left"))
    out.print(f"{min(n, len(picked))} of {len(picked)} rejected" + (f" for {reason}" if reason else ""))
    return len(picked)


def export_path(run: Path, fmt: str, name: str | None) -> Path:
    """<run>/export/<name><ext>, refusing any name that would land elsewhere."""
    name = name or fmt
    base = (run / "export").resolve()
    target = (base / f"{name}{FORMATS[fmt]}").resolve()
    if "/" in name or "\\" in name or name.startswith(".") or target.parent != base:
        raise UserError(f"export name '{name}' must be a plain file name (exports stay in {run / 'export'})")
    return target


def export_run(run: str | Path, fmt: str, name: str | None = None) -> Path:
    """Accepted records as Alpaca JSON, chat JSONL, ShareGPT JSON or Parquet."""
    run = Path(run)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (choose from {', '.join(FORMATS)})")
    rows = _records(run)
    target = export_path(run, fmt, name)
    target.parent.mkdir(exist_ok=True)
    if fmt == "alpaca":
        data = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows]
        write_atomic(target, json.dumps(data, ensure_ascii=False, indent=1))
    elif fmt == "chat":
        write_atomic(target, "".join(json.dumps({"id": r["id"], "messages": Record(**r).messages()},
                                                ensure_ascii=False) + "\n" for r in rows))
    elif fmt == "sharegpt":
        roles = {"user": "human", "assistant": "gpt"}
        data = [{"id": r["id"], "conversations": [{"from": roles[m["role"]], "value": m["content"]}
                                                  for m in Record(**r).messages()]} for r in rows]
        write_atomic(target, json.dumps(data, ensure_ascii=False, indent=1))
    else:
        import datasets

        flat = [{**r, "sampling": json.dumps(r["sampling"]),
                 "scores": json.dumps(r["scores"]), "lineage": json.dumps(r.get("lineage", {}))} for r in rows]
        tmp = target.with_name(target.name + ".tmp")
        datasets.Dataset.from_list(flat).to_parquet(str(tmp))
        tmp.replace(target)
    return target


def card_text(stats: dict[str, Any], cfg: Config, records: list[dict[str, Any]]) -> str:
    """The dataset card: what made the data, how much there is, what was filtered, the licence caveat."""
    methods = Counter(r["method"] for r in records)
    rejected = "\n".join(f"| {k} | {v} |" for k, v in stats.get("rejected", {}).items()) or "| (none) | 0 |"
    f = cfg.filters
    evol = stats.get("evol")
    lineage = ""
    if evol:
        depth = ", ".join(f"depth {d}: {v['n']}" for d, v in evol["per_depth"].items())
        lineage = (f"\nEvol-Instruct: {evol['inputs']} inputs, {evol['rounds']} rounds, {evol['accepted']} accepted "
                   f"and {evol['eliminated']} eliminated evolutions ({depth}). Each evolved record's "
                   "`lineage` holds its ancestor ids, the operation of each step, and its depth.\n")
    return f"""---
tags: [synthetic, instruction-tuning, selfinstruct]
---
# Synthetic instruction dataset

Generated with selfinstruct by the **{stats['method']}** recipe, with teacher
`{stats['teacher']}`, from {stats['seed_tasks']} seed tasks.

| | |
|---|---|
| accepted instructions | {stats['accepted_instructions']} |
| accepted records | {stats['accepted_records']} |
| train / test | {stats['dataset']['train']} / {stats['dataset']['test']} |
| methods | {', '.join(f'{k}: {v}' for k, v in methods.most_common())} |
| seed | {cfg.generate.seed} |

Columns: `id`, `method`, `messages` (user instruction + input, assistant output). The full records,
with `parents` (the demonstrations or the evolved-from instruction), the template and sampling
parameters and `scores`, are in `generated.jsonl` next to this directory.
{lineage}
## Filters

Instructions with fewer than {f.min_words} or more than {f.max_words} words, containing a blacklisted
word ({', '.join(f.blacklist)}), starting with {', '.join(repr(p) for p in f.banned_prefixes)}, punctuation
or a non-ASCII character, or with ROUGE-L >= {f.rouge_threshold} against the pool were dropped;
instances with an empty output or an output equal to the input too. Rejections:

| reason | count |
|---|---|
{rejected}

## Licence

The seed tasks are the project's own. Generated text comes from `{stats['teacher']}`: check that
model's licence and terms of use (some forbid training competing models on its outputs) before you
publish or train on this data. Synthetic data can carry the teacher's errors and biases.
"""


def write_card(run: Path, stats: dict[str, Any], cfg: Config, records: list[dict[str, Any]]) -> None:
    write_atomic(run / "dataset" / "README.md", card_text(stats, cfg, records))


def check_visibility(repo_id: str, private: bool) -> None:
    """Data meant to stay private never lands in a public repo: an existing public dataset repo is refused
    unless --public was given (`datasets` would upload into it whatever `private` says)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import RepositoryNotFoundError

    try:
        info = HfApi().repo_info(repo_id, repo_type="dataset")
    except RepositoryNotFoundError:
        return  # a new repo: created private unless --public
    except Exception as e:  # network, auth, offline mode
        raise RemoteError(f"cannot check the hub repo {repo_id}: {str(e).splitlines()[0] if str(e) else e!r}. "
                          "Log in with `hf auth login` (or set HF_TOKEN) and check the repo id.") from None
    if private and not info.private:
        raise UserError(f"the hub dataset {repo_id} exists and is public: pushing would publish this data; pass "
                        "--public to publish it, or choose another repo id")


def push_to_hub(run: str | Path, repo_id: str, private: bool = True) -> None:
    """Upload the run's dataset (train/test) and its card with `datasets`."""
    import datasets

    run = Path(run)
    if not (run / "dataset" / "dataset_dict.json").exists():
        raise UserError("no dataset/ here: not a finished generate run", run)
    dd = datasets.load_from_disk(str(run / "dataset"))
    check_visibility(repo_id, private)
    try:
        dd.push_to_hub(repo_id, private=private)
        from huggingface_hub import HfApi

        HfApi().upload_file(path_or_fileobj=str(run / "dataset" / "README.md"), path_in_repo="README.md",
                            repo_id=repo_id, repo_type="dataset")
    except Exception as e:  # network, auth, offline mode: the message is what the user needs
        raise RemoteError(f"push to the hub failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                           "Log in with `hf auth login` (or set HF_TOKEN) and check the repo id.") from None
