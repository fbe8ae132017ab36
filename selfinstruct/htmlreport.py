"""`selfinstruct report RUN`: one self-contained HTML page (RUN/report.html) to browse a run.

    path = write_html_report(Path("outputs/<run>"))    # a generate run or a `selfinstruct run` directory

A generate run: its counts, rejections by reason with examples of each, a seeded sample of accepted records,
the quality scores when present, and the diversity plots. A rounds run: each round's win rates and held-out
loss, its plots, then each round's generate section. Images are inlined (base64), there is no script and no
link to anything outside the file, so it opens anywhere, offline, and can be mailed as it is. Every text from
the run is HTML-escaped (a teacher's reply is data, never markup).
"""

from __future__ import annotations

import base64
import html
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from selfinstruct.errors import UserError
from selfinstruct.records import read_jsonl, write_atomic
from selfinstruct.rundir import kind_of

SAMPLE = 12  # accepted records shown
EXAMPLES = 3  # rejected candidates shown per reason
CLIP = 600  # characters of a field shown

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;vertical-align:top}
th{background:#f4f4f4;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;margin:0;font:13px/1.35 ui-monospace,monospace}
details{margin:.3em 0}summary{cursor:pointer}.note{color:#666}.bad{color:#a00}
img{max-width:min(100%,44em);border:1px solid #eee;margin:.5em 0}
"""


def esc(value: Any) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return html.escape(text if len(text) <= CLIP else text[:CLIP] + " …")


def table(header: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{esc(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{esc(path.stem)}" src="data:image/png;base64,{data}">'


def images(d: Path) -> str:
    return "".join(image(p) for p in sorted(d.glob("*.png"))) if d.is_dir() else ""


def record_block(rec: dict[str, Any], keys: tuple[str, ...]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td><pre>{esc(rec[k])}</pre></td></tr>" for k in keys
                   if rec.get(k) not in (None, ""))
    return f"<table>{rows}</table>"


def counts_section(stats: dict[str, Any]) -> str:
    target = stats.get("target_instructions", "?")
    rows = [["accepted instructions", f"{stats.get('accepted_instructions', 0)} / {target}"],
            ["accepted records", stats.get("accepted_records", 0)],
            ["rejected candidates", sum(stats.get("rejected", {}).values())],
            ["stopped", stats.get("stopped", "")], ["teacher", stats.get("teacher", "")],
            ["method", stats.get("method", "")]]
    rows += [[f"teacher requests: {k}", v] for k, v in stats.get("requests", {}).items()]
    if stats.get("dataset"):
        rows.append(["dataset train / test", f"{stats['dataset'].get('train', 0)} / {stats['dataset'].get('test', 0)}"])
    alerts = "".join(f"<li class=bad>{esc(a.get('stage', ''))}: every candidate failed for "
                     f"<b>{esc(a.get('reason', ''))}</b> in {esc(a.get('steps', '?'))} steps. "
                     f"{esc(a.get('fix', ''))}</li>"
                     for a in stats.get("alerts", []))
    return "<h2>Counts</h2>" + table(["what", "count"], rows) + (f"<ul>{alerts}</ul>" if alerts else "")


def rejections_section(stats: dict[str, Any], rejected: list[dict[str, Any]]) -> str:
    by_reason: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rejected:
        if len(by_reason[r.get("reason", "?")]) < EXAMPLES:
            by_reason[r.get("reason", "?")].append(r)
    counts = stats.get("rejected") or {k: len(v) for k, v in by_reason.items()}
    parts = ["<h2>Rejections by reason</h2>", '<p class="note">Every rejected candidate is in rejected.jsonl '
             "with its reason; the first examples of each reason are shown.</p>"]
    for reason, n in sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: -kv[1]):
        shown = "".join(record_block(r, ("stage", "instruction", "input", "output", "why", "nearest", "reply"))
                        for r in by_reason.get(reason, []))
        parts.append(f"<details><summary><b>{esc(reason)}</b>: {esc(n)}</summary>{shown}</details>")
    return "".join(parts)


def quality_section(stats: dict[str, Any]) -> str:
    q = stats.get("quality") or {}
    if not q:
        return ""
    return ("<h2>Quality scores</h2><p class=note>Each scorer's distribution (and the judge's audit) for the "
            "accepted records and for every scored candidate.</p>"
            f"<pre>{esc(json.dumps(q, indent=1, ensure_ascii=False)[:20000])}</pre>")


def quality(rec: dict[str, Any]) -> str:
    q = (rec.get("scores") or {}).get("quality")
    return f" · quality {q:.2f}" if isinstance(q, (int, float)) else ""


def unfinished_stats(run: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """A run that has not finished (interrupted, killed, or still running) has no stats.json: its counts as of
    the last checkpoint (state.json) and its target (config.yaml)."""
    state = json.loads((run / "state.json").read_text(encoding="utf-8")) if (run / "state.json").exists() else {}
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    gen, teacher = cfg.get("generate") or {}, cfg.get("teacher") or {}
    counts = state.get("counts", {})
    return {"target_instructions": gen.get("num_instructions", "?"), "method": gen.get("method", ""),
            "accepted_instructions": len({r.get("instruction") for r in records}), "accepted_records": len(records),
            "rejected": state.get("reasons", {}), "teacher": teacher.get("model", ""),
            "stopped": "not finished (no stats.json): counts as of the last checkpoint; --resume finishes it",
            "requests": {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("requests/")}}


def generate_section(run: Path, title: str, seed: int = 0) -> str:
    records = read_jsonl(run / "generated.jsonl") if (run / "generated.jsonl").exists() else []
    stats = json.loads((run / "stats.json").read_text(encoding="utf-8")) if (run / "stats.json").exists() \
        else unfinished_stats(run, records)
    rejected = read_jsonl(run / "rejected.jsonl") if (run / "rejected.jsonl").exists() else []
    sample = random.Random(seed).sample(records, min(SAMPLE, len(records)))
    accepted = "".join(f"<details open><summary>{esc(r.get('id', ''))} · {esc(r.get('method', ''))}{quality(r)}"
                       f"</summary>{record_block(r, ('instruction', 'input', 'output'))}</details>" for r in sample)
    return (f"<h1>{esc(title)}</h1>" + counts_section(stats)
            + f"<h2>Accepted records: a sample of {len(sample)} of {len(records)}</h2>"
            + (accepted or "<p class=bad>No record was accepted.</p>")
            + rejections_section(stats, rejected) + quality_section(stats)
            + ("<h2>Diversity</h2>" + images(run / "plots") if (run / "plots").is_dir() else ""))


def rounds_section(run: Path) -> str:
    report = json.loads((run / "report.json").read_text(encoding="utf-8")) if (run / "report.json").exists() \
        else {"rounds": [], "base_heldout_loss": None}

    def rate(w: Any) -> str:
        if not w or w.get("win_rate") is None:
            return "-"
        return f"{w['win_rate']:.2f} [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}]"

    rows = [["base", "", "", "", "", "", report.get("base_heldout_loss")]]
    rows += [[r["round"], r.get("generator", ""), r.get("accepted_records", ""), r.get("train_examples", ""),
              rate(r.get("vs_base")), rate(r.get("vs_previous")), r.get("heldout_loss")] for r in report["rounds"]]
    out = [f"<h1>selfinstruct run: {esc(run.name)}</h1><h2>Rounds</h2>",
           table(["round", "generator", "accepted", "trained on", "win vs base [95% CI]", "win vs previous",
                  "held-out loss"], rows, {2, 3, 6}), images(run / "plots")]
    k = 1
    while (run / f"round-{k}" / "generate").is_dir():
        out.append(generate_section(run / f"round-{k}" / "generate", f"Round {k}: generated data"))
        k += 1
    return "".join(out)


def write_html_report(run: Path) -> Path:
    """RUN/report.html for a generate run or a rounds run; returns its path."""
    kind = kind_of(run)
    if kind == "run":
        body = rounds_section(run)
    elif kind == "generate" or (run / "stats.json").exists():
        body = generate_section(run, f"selfinstruct generate: {run.name}")
    else:
        raise UserError("not a generate run or a `selfinstruct run` directory", run)
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(run.name)} · selfinstruct"
            f"</title><style>{STYLE}</style></head><body>{body}</body></html>\n")
    path = run / "report.html"
    write_atomic(path, page)
    return path
