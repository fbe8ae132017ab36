import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from selfinstruct.dedup import RougePool, rouge_l, rouge_tokens

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_data.json"
WORDS = st.sampled_from(["the", "a", "cat", "Cat", "dog", "runs", "ran", "fast", "über", "x1", "1", "!", "--",
                         "naïve", "日本", "İstanbul", "co-op", "e.g.", "\n", "  "])


@settings(max_examples=400, deadline=None)
@given(st.lists(WORDS, max_size=14).map(" ".join), st.lists(WORDS, max_size=14).map(" ".join))
def test_score_equals_rouge_score_exactly(a, b):
    assert rouge_l(a, b) == SCORER.score(a, b)["rougeL"].fmeasure
    assert rouge_l(b, a) == SCORER.score(a, b)["rougeL"].fmeasure


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_score_equals_rouge_score_on_any_text(a, b):
    assert rouge_l(a, b) == SCORER.score(a, b)["rougeL"].fmeasure


def test_tokeniser_drops_non_latin():
    assert rouge_tokens("Hello, WORLD! 日本語 über-cool") == ["hello", "world", "ber", "cool"]
    assert rouge_l("日本語のテキスト", "日本語のテキスト") == 0.0  # documented: ROUGE cannot see it


def test_pool_best_matches_brute_force():
    texts = ["Write a poem about the sea.", "List three fruits.", "Explain gravity to a child.", ""]
    pool = RougePool()
    for t in texts:
        pool.add(t)
    q = "Write a short poem about the sea and sky."
    score, i = pool.best(q)
    brute = [SCORER.score(q, t)["rougeL"].fmeasure for t in texts]
    assert score == max(brute) and i == brute.index(max(brute))
    assert RougePool().best(q) == (0.0, -1)


@pytest.mark.skipif(not ALPACA.exists(), reason=f"{ALPACA} not present (benchmark data lives beside the repo)")
def test_greedy_dedup_matches_reference_on_alpaca_slice():
    instructions = [r["instruction"] for r in json.loads(ALPACA.read_text())[:300]]
    for threshold in (0.7, 0.5):
        kept_ref: list[str] = []
        ref = []
        for i, text in enumerate(instructions):
            if all(SCORER.score(text, k)["rougeL"].fmeasure < threshold for k in kept_ref):
                kept_ref.append(text)
                ref.append(i)
        pool, ours = RougePool(), []
        for i, text in enumerate(instructions):
            if pool.best(text)[0] < threshold:
                pool.add(text)
                ours.append(i)
        assert ours == ref
