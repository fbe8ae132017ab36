"""The report of a `selfinstruct run`: report.json, the rounds table and plots/, built from what the stages
wrote (so a resumed run reports the same)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from selfinstruct.records import write_json


def write_report(run_dir: Path) -> dict[str, Any]:
    """report.json and plots/ from what the stages wrote (so a resumed run reports the same)."""
    rounds = []
    k = 1
    while (run_dir / f"round-{k}").exists():
        rd = run_dir / f"round-{k}"
        row: dict[str, Any] = {"round": k}
        if (rd / "generate" / "stats.json").exists():
            s = json.loads((rd / "generate" / "stats.json").read_text())
            row.update(generator=s["teacher"], accepted_instructions=s["accepted_instructions"],
                       accepted_records=s["accepted_records"], rejected=s["rejected"])
        if (rd / "train" / "manifest.json").exists():
            m = json.loads((rd / "train" / "metrics.json").read_text())
            row.update(train_examples=m["train_examples"], train_loss=m["train_loss"])
        if (rd / "eval" / "manifest.json").exists():
            e = json.loads((rd / "eval" / "eval.json").read_text())
            row.update(vs_base=e["vs_base"], vs_previous=e["vs_previous"], heldout_loss=e["heldout_loss"])
        rounds.append(row)
        k += 1
    base = run_dir / "base" / "eval.json"
    report = {"base_heldout_loss": json.loads(base.read_text())["heldout_loss"] if base.exists() else None,
              "rounds": rounds}
    write_json(run_dir / "report.json", report)
    plot_report(report, run_dir / "plots")
    return report


def report_table(report: dict[str, Any]) -> Table:
    t = Table(title="rounds")
    for col in ("round", "generator", "accepted", "rejected", "trained on", "win vs base [95% CI]",
                "win vs previous", "held-out loss"):
        t.add_column(col, justify="left" if col == "generator" else "right", overflow="fold")
    t.add_row("base", "", "", "", "", "", "", _num(report["base_heldout_loss"]))
    for r in report["rounds"]:
        gen = str(r.get("generator", ""))
        gen = f"student {gen.split('+', 1)[1]}" if "+" in gen else Path(gen).name
        t.add_row(str(r["round"]), gen, str(r.get("accepted_records", "")),
                  str(sum(r.get("rejected", {}).values())), str(r.get("train_examples", "")),
                  _rate(r.get("vs_base")), _rate(r.get("vs_previous")), _num(r.get("heldout_loss")))
    return t


def _rate(w: dict[str, Any] | None) -> str:
    if not w or w["win_rate"] is None:
        return "-"
    lo, hi = w["ci95"]
    return f"{w['win_rate']:.2f} [{lo:.2f},{hi:.2f}]"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def plot_report(report: dict[str, Any], out: Path) -> None:
    """win_rate.png, heldout_loss.png, accepted.png, rejections.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selfinstruct.stats import _save

    out.mkdir(parents=True, exist_ok=True)
    rounds = report["rounds"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, colour in (("vs_base", "#4C72B0"), ("vs_previous", "#DD8452")):
        pts = [(r["round"], r[key]) for r in rounds if r.get(key) and r[key]["win_rate"] is not None]
        if pts:
            xs, ws = [p[0] for p in pts], [p[1] for p in pts]
            ys = [w["win_rate"] for w in ws]
            err = [[y - w["ci95"][0] for y, w in zip(ys, ws, strict=True)],
                   [w["ci95"][1] - y for y, w in zip(ys, ws, strict=True)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, color=colour, label=key.replace("_", " "))
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_xlabel("round")
    ax.set_ylabel("win rate (95% CI)")
    ax.legend()
    ax.set_title("Held-out win rate by round")
    _save(fig, out / "win_rate.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(0, report["base_heldout_loss"])] + [(r["round"], r.get("heldout_loss")) for r in rounds]
    pts = [p for p in pts if p[1] is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#55A868")
    ax.set_xlabel("round (0 = base)")
    ax.set_ylabel("loss per reference token")
    ax.set_title("Held-out loss by round")
    _save(fig, out / "heldout_loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r["round"] for r in rounds], [r.get("accepted_records", 0) for r in rounds], color="#4C72B0")
    ax.set_xlabel("round")
    ax.set_ylabel("accepted records")
    ax.set_title("Accepted records by round")
    _save(fig, out / "accepted.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    totals = Counter()
    for r in rounds:
        totals.update(r.get("rejected", {}))
    bottom = [0] * len(rounds)
    for reason, _ in totals.most_common(8):
        vals = [r.get("rejected", {}).get(reason, 0) for r in rounds]
        ax.bar([r["round"] for r in rounds], vals, bottom=bottom, label=reason)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xlabel("round")
    ax.set_ylabel("rejected candidates")
    ax.set_title("Rejections by reason and round (top 8 reasons)")
    if totals:
        ax.legend(fontsize=7)
    _save(fig, out / "rejections.png")
