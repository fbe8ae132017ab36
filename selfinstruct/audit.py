"""What the quality scores of a set of records say: each scorer's distribution, the share past each threshold,
and the judge's audit in the Self-Instruct paper's form (Table 2) with 95% intervals.

    s = summarise(scored_rows, cfg.quality)     # stats.json's "quality", `selfinstruct score`'s summary.json
    console.print(*tables(s))

Audit columns: valid task, appropriate input, correct output, all three (a record counts in a column's
denominator only when the judge's answer to it was read). Interval: Wilson's 95% score interval.
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from selfinstruct.config import QualityConfig
from selfinstruct.scoring import all_valid

Z95 = 1.959963984540054
AUDIT = (("task", "valid task"), ("input", "appropriate input"), ("output", "correct output"))


def wilson(k: int, n: int) -> list[float] | None:
    """Wilson's 95% interval of a proportion k / n (None for n = 0)."""
    if n == 0:
        return None
    p, z2 = k / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def _distribution(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, int(p * len(v)))], 4)

    return {"n": len(v), "mean": round(sum(v) / len(v), 4), "p10": q(0.1), "p50": q(0.5), "p90": q(0.9),
            "min": round(v[0], 4), "max": round(v[-1], 4)}


def audit(judged: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's Table 2 over judgements (scores["judge"] dicts)."""
    out: dict[str, Any] = {"records": len(judged), "unparsed_answers": sum(j.get("unparsed", 0) for j in judged)}
    for key, label in AUDIT:
        read = [j[key] for j in judged if j.get(key) is not None]
        out[label] = {"share": round(sum(read) / len(read), 4) if read else None, "n": len(read),
                      "ci95": wilson(sum(read), len(read))}
    complete = [j for j in judged if all(j.get(k) is not None for k, _ in AUDIT)]
    k = sum(all_valid(j) for j in complete)
    out["all valid"] = {"share": round(k / len(complete), 4) if complete else None, "n": len(complete),
                        "ci95": wilson(k, len(complete))}
    return out


def summarise(scores: list[dict[str, Any]], q: QualityConfig) -> dict[str, Any]:
    """Per scorer: the distribution of its values, the share past its threshold; the judge's audit."""
    ifd = [s["ifd"] for s in scores if s.get("ifd") is not None]
    judge = [s["judge"] for s in scores if isinstance(s.get("judge"), dict)]
    qual = [s["quality"] for s in scores if s.get("quality") is not None]
    out: dict[str, Any] = {"records": len(scores)}
    if ifd:
        out["ifd"] = {**_distribution(ifd), "share_at_least_1": round(sum(x >= 1 for x in ifd) / len(ifd), 4)}
        if q.max_ifd is not None:
            out["ifd"]["share_past_max_ifd"] = round(sum(x >= q.max_ifd for x in ifd) / len(ifd), 4)
    if judge:
        points = [j["score"] for j in judge if j.get("score") is not None]
        out["judge"] = {"score": _distribution(points), "audit": audit(judge)}
        if q.min_judge is not None and points:
            out["judge"]["share_below_min_judge"] = round(sum(p < q.min_judge for p in points) / len(points), 4)
    if qual:
        out["quality"] = _distribution(qual)
        if q.min_quality is not None:
            out["quality"]["share_below_min_quality"] = round(sum(x < q.min_quality for x in qual) / len(qual), 4)
    return out


def tables(s: dict[str, Any]) -> list[Table]:
    """The summary as terminal tables: one row per scorer, then the audit."""
    dist = Table(title=f"quality scores of {s['records']} records")
    for col in ("scorer", "n", "mean", "p10", "p50", "p90", "past its threshold"):
        dist.add_column(col, justify="left" if col == "scorer" else "right")
    rows = [("ifd (lower: the instruction helps more)", s.get("ifd"), "share_past_max_ifd"),
            ("judge score (1-5)", s.get("judge", {}).get("score"), None),
            ("quality (0-1)", s.get("quality"), "share_below_min_quality")]
    for name, d, key in rows:
        if d and d.get("n"):
            past = d.get(key) if key else s.get("judge", {}).get("share_below_min_judge")
            dist.add_row(name, str(d["n"]), *(str(d[k]) for k in ("mean", "p10", "p50", "p90")),
                         "-" if past is None else f"{100 * past:.1f}%")
    out = [dist]
    if "judge" in s:
        a = s["judge"]["audit"]
        t = Table(title=f"audit (Self-Instruct, Table 2): {a['records']} records, {a['unparsed_answers']} answers "
                        "unread")
        for col in ("question", "share", "95% interval", "answers read"):
            t.add_column(col, justify="left" if col == "question" else "right")
        for label in ("valid task", "appropriate input", "correct output", "all valid"):
            v = a[label]
            t.add_row(label, "-" if v["share"] is None else f"{100 * v['share']:.1f}%",
                      "-" if v["ci95"] is None else f"{100 * v['ci95'][0]:.1f}-{100 * v['ci95'][1]:.1f}%", str(v["n"]))
        out.append(t)
    return out
