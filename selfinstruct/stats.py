"""Diversity statistics of a run, their PNG plots, and `selfinstruct stats RUN`.

    d = diversity(records, seed_instructions)      # what stats.json holds under "diversity"
    plot_diversity(d, run / "plots")                 # leading_verbs.png, lengths.png, rouge_vs_seeds.png

Leading verb: the first word of the instruction, lower-cased (a cheap stand-in for the paper's
parser-based verb; "What/How/Which" show up as questions). ROUGE-L against the seeds: for each
accepted instruction, its highest ROUGE-L F1 against any seed instruction (the paper's Figure 3).
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from selfinstruct.dedup import RougePool
from selfinstruct.errors import UserError

ROUGE_BINS = [round(0.05 * i, 2) for i in range(20)]  # lower edges; the last bin is [0.95, 1.0]
LENGTH_BINS = [0, 5, 10, 15, 20, 30, 40, 60, 80, 100, 150, 200, 300, 500]


def leading_word(text: str) -> str:
    m = re.match(r"[^A-Za-z]*([A-Za-z]+)", text)
    return m.group(1).lower() if m else ""


def _histogram(values: list[float], lower_edges: list[float], top: float) -> dict[str, Any]:
    counts, _ = np.histogram(values, bins=[*lower_edges, top])
    return {"bins": lower_edges, "counts": counts.tolist()}


def _summary(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": round(statistics.fmean(values), 2), "median": statistics.median(values),
            "max": max(values), "histogram": _histogram(values, LENGTH_BINS, 10**9)}


def diversity(records: list[dict[str, Any]], seed_instructions: list[str], top: int = 20) -> dict[str, Any]:
    instructions = list(dict.fromkeys(r["instruction"] for r in records))  # unique, in order
    pool = RougePool()
    for s in seed_instructions:
        pool.add(s)
    rouge = [pool.best(i)[0] for i in instructions] if seed_instructions else []
    return {
        "leading_verbs": Counter(leading_word(i) for i in instructions).most_common(top),
        "lengths_words": {
            "instruction": _summary([len(i.split()) for i in instructions]),
            "input": _summary([len(r["input"].split()) for r in records if r["input"].strip()]),
            "output": _summary([len(r["output"].split()) for r in records]),
        },
        "inputs_empty_fraction": round(sum(not r["input"].strip() for r in records) / len(records), 4)
        if records else 0.0,
        "rouge_vs_seeds": {"n": len(rouge), "mean": round(statistics.fmean(rouge), 4) if rouge else None,
                           "histogram": _histogram(rouge, ROUGE_BINS, 1.0000001) if rouge else None},
    }


# Difficulty proxy for evolved instructions: cue words and phrases of constraints and requirements.
_CONSTRAINT = re.compile(
    r"\b(must|should|only|exactly|without|ensure|requir\w*|limit\w*|within|maximum|minimum|each|every|"
    r"at (?:least|most)|no (?:more|less|fewer) than|(?:more|less|fewer) than|include\w*|specif\w*|"
    r"step[- ]by[- ]step|\d+)\b", re.IGNORECASE)


def constraint_count(text: str) -> int:
    """How many constraint cues ("must", "at least", "exactly", numbers...) a text has: a crude,
    cheap proxy for how constrained an instruction is, compared across evolution depths."""
    return len(_CONSTRAINT.findall(text))


def evol_stats(records: list[dict[str, Any]], rejected: list[dict[str, Any]], inputs: list[str],
               rounds: int) -> dict[str, Any]:
    """Evol-Instruct's numbers: accepted / eliminated per operation and per reason, the paper's four
    rules, and difficulty proxies per evolution depth (depth 0 = the inputs)."""
    from selfinstruct.config import EVOL_OPERATIONS
    from selfinstruct.filters import EVOL_RULES

    evolved = [r for r in records if r["method"].startswith("evol:")]
    failed = [r for r in rejected if r.get("stage") == "evol"]
    per_op = {}
    for op in EVOL_OPERATIONS:
        reasons = Counter(r["reason"] for r in failed if r["operation"] == op)
        per_op[op] = {"accepted": sum(r["method"] == f"evol:{op}" for r in evolved),
                      "eliminated": sum(reasons.values()), "reasons": dict(reasons.most_common())}
    reasons = Counter(r["reason"] for r in failed)
    by_depth: dict[int, list[str]] = {0: inputs}
    for r in evolved:
        by_depth.setdefault(r["lineage"]["depth"], []).append(r["instruction"])
    return {
        "inputs": len(inputs),
        "rounds": rounds,
        "attempts": len(evolved) + len(failed),
        "accepted": len(evolved),
        "eliminated": len(failed),
        "rules": {f"{n}_{name}": reasons.get(name, 0) for name, n in EVOL_RULES.items()},
        "other_reasons": {k: v for k, v in reasons.most_common() if k not in EVOL_RULES},
        "per_operation": per_op,
        "per_depth": {str(d): {"n": len(texts),
                               "instruction_words": round(statistics.fmean(len(t.split()) for t in texts), 2),
                               "constraints": round(statistics.fmean(map(constraint_count, texts)), 2)}
                      for d, texts in sorted(by_depth.items()) if texts},
    }


def plot_diversity(d: dict[str, Any], out: Path) -> list[Path]:
    """Three PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 5))
    verbs = d["leading_verbs"][::-1]
    ax.barh([v for v, _ in verbs], [n for _, n in verbs], color="#4C72B0")
    ax.set_title("Most frequent leading words of accepted instructions")
    ax.set_xlabel("instructions")
    paths.append(_save(fig, out / "leading_verbs.png"))

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (name, s) in zip(axes, d["lengths_words"].items(), strict=True):
        if s["n"]:
            h = s["histogram"]
            ax.bar(range(len(h["counts"])), h["counts"], color="#55A868")
            ax.set_xticks(range(len(h["counts"])), [str(b) for b in h["bins"]], rotation=60, fontsize=7)
        ax.set_title(f"{name} length (words), n={s['n']}")
    paths.append(_save(fig, out / "lengths.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    h = d["rouge_vs_seeds"]["histogram"]
    if h:
        ax.bar(h["bins"], h["counts"], width=0.045, align="edge", color="#C44E52")
    ax.set_title("Highest ROUGE-L of each accepted instruction against the seeds")
    ax.set_xlabel("ROUGE-L F1")
    ax.set_ylabel("instructions")
    paths.append(_save(fig, out / "rouge_vs_seeds.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def counts_table(stats: dict[str, Any], title: str) -> Table:
    """Accepted, requests per stage, rejections per reason, split sizes: the end-of-run summary."""
    t = Table(title=title)
    t.add_column("what")
    t.add_column("count", justify="right")
    target = stats.get("target_instructions")
    t.add_row("accepted instructions", f"{stats['accepted_instructions']}" + (f" / {target}" if target and
                                                                               "evol" not in stats else ""))
    t.add_row("accepted records", str(stats["accepted_records"]))
    t.add_row("candidates", str(stats.get("counts", {}).get("candidates", 0)))
    for stage, n in stats.get("requests", {}).items():
        t.add_row(f"teacher requests: {stage}", str(n))
    for reason, n in stats.get("rejected", {}).items():
        t.add_row(f"rejected: {reason}", str(n))
    if "dataset" in stats:
        t.add_row("dataset train / test", f"{stats['dataset']['train']} / {stats['dataset']['test']}")
    return t


def alerts_table(alerts: list[dict[str, Any]]) -> Table:
    """Stages of a step that came to nothing for one reason (generate/alerts.py), loudly."""
    t = Table(title="[bold red]stages where every candidate failed for one reason[/]", show_lines=True)
    for col in ("stage", "reason", "steps", "candidates", "a reply", "likely fix"):
        t.add_column(col, justify="right" if col in ("steps", "candidates") else "left", overflow="fold")
    for a in alerts:
        # A reply is data: Text, so "[/INST]" in it is shown, not read as markup.
        t.add_row(a["stage"], a["reason"], str(a["steps"]), str(a["candidates"]), Text(repr(a["sample"][:120])),
                  a["fix"])
    return t


def evol_tables(e: dict[str, Any]) -> list[Table]:
    """Evol-Instruct: per operation, per elimination rule, per depth."""
    ops = Table(title=f"evolution: {e['inputs']} inputs x {e['rounds']} rounds, {e['attempts']} attempts")
    for col in ("operation", "accepted", "eliminated", "top reasons"):
        ops.add_column(col, justify="left" if col in ("operation", "top reasons") else "right")
    for op, v in e["per_operation"].items():
        top = ", ".join(f"{k} {n}" for k, n in list(v["reasons"].items())[:3])
        ops.add_row(op, str(v["accepted"]), str(v["eliminated"]), top)
    rules = Table(title="eliminated by the paper's rules, and by other checks")
    rules.add_column("reason")
    rules.add_column("count", justify="right")
    for k, n in [*e["rules"].items(), *e["other_reasons"].items()]:
        rules.add_row(k, str(n))
    depth = Table(title="difficulty by evolution depth (0 = inputs)")
    for col in ("depth", "instructions", "mean words", "mean constraint cues"):
        depth.add_column(col, justify="right")
    for d, v in e["per_depth"].items():
        depth.add_row(d, str(v["n"]), str(v["instruction_words"]), str(v["constraints"]))
    return [ops, rules, depth]


def show_stats(run: str | Path) -> dict[str, Any]:
    """Print a run's stats.json as tables (selfinstruct stats RUN)."""
    path = Path(run) / "stats.json"
    if not path.exists():
        raise UserError("no stats.json here: not a finished generate run", run)
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"stats.json is not valid JSON: {e.msg}", path, e.lineno) from None
    console = Console()
    console.print(counts_table(stats, f"{run}: {stats.get('method')} with {stats.get('teacher')}"))
    if stats.get("evol"):
        for table in evol_tables(stats["evol"]):
            console.print(table)
    d = stats.get("diversity")
    if not d:
        return stats
    v = Table(title="leading words")
    v.add_column("word")
    v.add_column("instructions", justify="right")
    for word, n in d["leading_verbs"]:
        v.add_row(word, str(n))
    console.print(v)
    lengths = Table(title="lengths (words)")
    for col in ("field", "n", "mean", "median", "max"):
        lengths.add_column(col, justify="right" if col != "field" else "left")
    for name, s in d["lengths_words"].items():
        lengths.add_row(name, str(s["n"]), *(str(s.get(k, "-")) for k in ("mean", "median", "max")))
    console.print(lengths)
    h = d["rouge_vs_seeds"]["histogram"]
    if h:
        r = Table(title=f"ROUGE-L against the seeds (mean {d['rouge_vs_seeds']['mean']})")
        r.add_column("bin")
        r.add_column("instructions", justify="right")
        r.add_column("")
        peak = max(h["counts"]) or 1
        for lo, n in zip(h["bins"], h["counts"], strict=True):
            r.add_row(f"{lo:.2f}-{lo + 0.05:.2f}", str(n), "█" * round(30 * n / peak))
        console.print(r)
    return stats
