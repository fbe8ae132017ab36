"""ROUGE-L near-duplicate detection with exactly rouge_score's numbers.

    pool = RougePool(); pool.add("Write a poem."); score, i = pool.best("Write a short poem.")

rouge_score's `RougeScorer(["rougeL"], use_stemmer=False)` lower-cases, turns every run of
characters outside [a-z0-9] into a space and splits; F = 2PR/(P+R) with P = LCS/len(prediction),
R = LCS/len(target). We keep that tokeniser and that floating-point formula (so exact ties at a
threshold fall the same way), and compute the LCS with rapidfuzz on token-coded strings.
Text with no Latin letters or digits has no tokens, so it scores 0 against everything: the ROUGE
filter never removes it (use exact or MinHash dedup for such text).
"""

from __future__ import annotations

import re

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID = re.compile(r"^[a-z0-9]+$")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokeniser without stemming."""
    text = _NON_ALNUM.sub(" ", text.lower())
    return [t for t in _SPACES.split(text) if _VALID.match(t)]


def f_measure(lcs: np.ndarray | int, len_a: np.ndarray | int, len_b: np.ndarray | int) -> np.ndarray | float:
    """rouge_score's F1 from LCS lengths, in its order of floating-point operations."""
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
    """Texts to compare new candidates against. Tokens are mapped to single code points so
    rapidfuzz's bit-parallel LCS runs on plain strings."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self._codes: dict[str, str] = {}
        self._seqs: list[str] = []
        self._lens: list[int] = []

    def __len__(self) -> int:
        return len(self.texts)

    def _encode(self, text: str) -> str:
        out = []
        for tok in rouge_tokens(text):
            code = self._codes.get(tok)
            if code is None:
                n = len(self._codes) + 1
                code = self._codes[tok] = chr(n if n < 0xD800 else n + 0x800)  # skip surrogates
            out.append(code)
        return "".join(out)

    def add(self, text: str) -> None:
        seq = self._encode(text)
        self.texts.append(text)
        self._seqs.append(seq)
        self._lens.append(len(seq))

    def best(self, text: str) -> tuple[float, int]:
        """Highest ROUGE-L F of `text` against the pool, and the index of that pool text (-1 if none)."""
        seq = self._encode(text)
        if not seq or not self._seqs:
            return 0.0, -1
        lcs = process.cdist([seq], self._seqs, scorer=LCSseq.similarity, dtype=np.int32)[0]
        scores = f_measure(lcs, len(seq), np.asarray(self._lens))
        i = int(np.argmax(scores))
        return float(scores[i]), i
