"""ROUGE-L near-duplicate detection with exactly rouge_score's numbers, fast.

    pool = RougePool(); pool.add("Write a poem."); score, i = pool.best("Write a short poem.")
    kept = greedy_dedup(texts, threshold=0.7)          # indices rouge_score's greedy loop keeps

rouge_score's `RougeScorer(["rougeL"], use_stemmer=False)` lower-cases, turns every run of
characters outside [a-z0-9] into a space and splits; F = 2PR/(P+R) with P = LCS/len(prediction),
R = LCS/len(target). We keep that tokeniser and that floating-point formula (so exact ties at a
threshold fall the same way; the formula is symmetric in its two arguments bit for bit).

Speed: each token becomes one code point, so a text is a short string and rapidfuzz's
bit-parallel LCS compares two of them in nanoseconds. `RougePool.best` scores one text against
the whole pool (`process.cdist` over column chunks, all cores), which is what generation needs:
the exact highest score, for provenance. `greedy_dedup` decides keep/drop for a whole file and
only scores the pairs a prefix filter cannot rule out.

Text with no Latin letters or digits has no tokens, so it scores 0 against everything: the ROUGE
filter never removes it. Use `selfinstruct dedup --method exact` or `minhash` for such text.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
import zlib
from array import array
from collections.abc import Collection

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID = re.compile(r"^[a-z0-9]+$")
CHUNK = 16384  # pool texts per cdist call


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokeniser without stemming."""
    text = _NON_ALNUM.sub(" ", text.lower())
    return [t for t in _SPACES.split(text) if _VALID.match(t)]


def f_measure(lcs: np.ndarray | int, len_a: np.ndarray | int, len_b: np.ndarray | int) -> np.ndarray:
    """rouge_score's F1 from LCS lengths, in its order of floating-point operations (0 where empty)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.asarray(lcs, dtype=np.float64) / len_b
        r = np.asarray(lcs, dtype=np.float64) / len_a
        f = 2 * p * r / (p + r)
    return np.where(p + r > 0, f, 0.0)  # also 0 where a side is empty (NaN)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts (symmetric)."""
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    if not ta or not tb:
        return 0.0
    return float(f_measure(LCSseq.similarity(ta, tb), len(ta), len(tb)))


class RougePool:
    """Texts that new candidates are compared against."""

    def __init__(self, workers: int = -1) -> None:
        self.texts: list[str] = []
        self.workers = workers
        self._codes: dict[str, str] = {}
        self._seqs: list[str] = []
        self._lens: list[int] = []
        self.first_index: dict[str, int] = {}  # text -> where it was first added
        self.retired: set[int] = set()  # indices best() no longer compares against

    def __len__(self) -> int:
        return len(self.texts)

    def _encode(self, text: str) -> str:
        out = []
        for tok in rouge_tokens(text):
            code = self._codes.get(tok)
            if code is None:
                n = len(self._codes) + 1
                code = self._codes[tok] = chr(_code(n))
            out.append(code)
        return "".join(out)

    def add(self, text: str) -> None:
        self._append(text, self._encode(text))

    def _append(self, text: str, seq: str) -> None:
        self.first_index.setdefault(text, len(self.texts))
        self.texts.append(text)
        self._seqs.append(seq)
        self._lens.append(len(seq))

    def retire(self, index: int) -> None:
        """Stop comparing against the text at `index` (a candidate that was dropped later on)."""
        self.retired.add(index)

    def best(self, text: str, exclude: Collection[int] = ()) -> tuple[float, int]:
        """Highest ROUGE-L F of `text` against the pool (leaving out the indices in `exclude`), and the
        index of that pool text (-1 if none)."""
        skip = np.asarray(sorted(self.retired.union(exclude)), dtype=np.int64)
        score, idx = self._best_many([self._encode(text)], skip)
        return float(score[0]), int(idx[0])

    def _best_many(self, seqs: list[str], exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        best = np.zeros(len(seqs))
        where = np.full(len(seqs), -1)
        qlens = np.array([len(s) for s in seqs])[:, None]
        for start in range(0, len(self._seqs), CHUNK):
            cols = self._seqs[start: start + CHUNK]
            lcs = process.cdist(seqs, cols, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers)
            f = f_measure(lcs, qlens, np.asarray(self._lens[start: start + CHUNK])[None, :])
            if exclude is not None and len(exclude):
                cut = exclude[(exclude >= start) & (exclude < start + len(cols))] - start
                f[:, cut] = -1.0
            arg = f.argmax(axis=1)
            top = f[np.arange(len(seqs)), arg]
            better = top > best
            best[better], where[better] = top[better], arg[better] + start
        return best, where


def greedy_dedup(texts: list[str], threshold: float) -> list[int]:
    """Indices of the texts rouge_score's greedy loop keeps: each scores below `threshold` against every
    text kept before it. Exact, and near-linear in practice through a prefix filter:

    F = 2*LCS/(la+lb) >= t needs lb >= r*la (r = t/(2-t)) and LCS >= t*la*(1+r)/2, and LCS is at most
    the multiset overlap of the two token lists. Two texts whose overlap reaches a bound `alpha`
    must share one of the first len-alpha+1 elements of each, in one global rarest-first order
    (elements are (token, k-th occurrence), so multisets become sets). Only kept texts sharing such
    an element, within the length window, are scored. LCS is an integer, so a pair whose exact F is
    below t misses it by at least 2/(la+lb); the bounds carry a 1e-6 slack, far above the rounding
    error of rouge_score's formula and far below that gap, so no pair that rounds to >= t is missed.
    """
    r = threshold / (2 - threshold)
    toks = [rouge_tokens(t) for t in texts]
    elems = [_elements(t) for t in toks]
    freq: dict[tuple[str, int], int] = {}
    for es in elems:
        for e in es:
            freq[e] = freq.get(e, 0) + 1
    rank = {e: i for i, e in enumerate(sorted(freq, key=lambda e: (freq[e], e)))}
    codes: dict[str, str] = {}
    index: dict[int, array] = {}  # element rank -> positions (in the kept arrays) of texts whose prefix has it
    kept: list[int] = []
    kept_seqs = np.empty(len(texts), dtype=object)
    kept_lens = np.zeros(len(texts), dtype=np.int64)
    n_kept = 0
    for i, tl in enumerate(toks):
        n = len(tl)
        if n == 0:  # no ROUGE tokens: scores 0 against everything
            kept.append(i)
            continue
        order = sorted(rank[e] for e in elems[i])
        alpha = max(1, math.ceil(threshold * n * (1 + r) / 2 - 1e-6))
        prefix = order[: n - alpha + 1]
        seq = "".join(codes.setdefault(t, chr(_code(len(codes) + 1))) for t in tl)
        cands = _union(index, prefix)
        if len(cands):
            lens = kept_lens[cands]
            cands = cands[(lens >= r * n * (1 - 1e-6)) & (lens <= n / r * (1 + 1e-6))]
            if len(cands):
                lcs = process.cdist([seq], kept_seqs[cands], scorer=LCSseq.similarity, dtype=np.int32)
                if f_measure(lcs[0], n, kept_lens[cands]).max() >= threshold:
                    continue
        for e in prefix:
            index.setdefault(e, array("i")).append(n_kept)
        kept.append(i)
        kept_seqs[n_kept], kept_lens[n_kept] = seq, n
        n_kept += 1
    return kept


def _union(index: dict[int, array], keys: list[int]) -> np.ndarray:
    # The buffer views must be gone before the arrays grow again, hence a function of their own.
    hits = [np.frombuffer(index[k], dtype=np.int32) for k in keys if k in index]
    return np.unique(np.concatenate(hits)) if hits else np.empty(0, dtype=np.int32)


def _elements(tokens: list[str]) -> list[tuple[str, int]]:
    seen: dict[str, int] = {}
    out = []
    for t in tokens:
        seen[t] = seen.get(t, 0) + 1
        out.append((t, seen[t]))
    return out


def _code(n: int) -> int:
    return n if n < 0xD800 else n + 0x800  # one code point per token, skipping surrogates


# ---------------------------------------------------------------- other languages, larger scales


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: what `exact` compares."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_dedup(texts: list[str]) -> list[int]:
    """Indices of the first occurrence of each normalised text."""
    seen: set[bytes] = set()
    kept = []
    for i, t in enumerate(texts):
        key = hashlib.blake2b(normalise(t).encode(), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            kept.append(i)
    return kept


MERSENNE = (1 << 31) - 1


def minhash_signatures(texts: list[str], num_perm: int = 128, shingle: int = 5, seed: int = 0) -> np.ndarray:
    """(len(texts), num_perm) MinHash signatures of each normalised text's character `shingle`-grams."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, MERSENNE, num_perm, dtype=np.uint64)
    b = rng.integers(0, MERSENNE, num_perm, dtype=np.uint64)
    sigs = np.full((len(texts), num_perm), MERSENNE, dtype=np.uint64)
    for i, t in enumerate(texts):
        s = normalise(t)
        grams = {s[j: j + shingle] for j in range(max(1, len(s) - shingle + 1))}
        x = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
        sigs[i] = ((np.outer(x, a) + b) % MERSENNE).min(axis=0)  # a*x < 2^63: no overflow
    return sigs


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands*rows = num_perm whose S-curve midpoint (1/b)^(1/r) is nearest the threshold."""
    pairs = [(b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0]
    return min(pairs, key=lambda br: abs((1 / br[0]) ** (1 / br[1]) - threshold))


def minhash_dedup(texts: list[str], threshold: float, num_perm: int = 128, seed: int = 0) -> list[int]:
    """Greedy: a text is kept unless an earlier kept text that shares an LSH bucket with it has an
    estimated Jaccard similarity (fraction of equal signature slots) >= threshold."""
    sigs = minhash_signatures(texts, num_perm, seed=seed)
    bands, rows = lsh_bands(threshold, num_perm)
    buckets: dict[tuple[int, bytes], list[int]] = {}
    kept: list[int] = []
    for i in range(len(texts)):
        keys = [(band, sigs[i, band * rows: (band + 1) * rows].tobytes()) for band in range(bands)]
        cands = {c for k in keys for c in buckets.get(k, ())}
        if cands and max(float(np.mean(sigs[i] == sigs[c])) for c in cands) >= threshold:
            continue
        kept.append(i)
        for k in keys:
            buckets.setdefault(k, []).append(i)
    return kept
