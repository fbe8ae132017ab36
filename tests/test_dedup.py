import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from selfinstruct.dedup import (
    RougePool,
    exact_dedup,
    greedy_dedup,
    lsh_bands,
    minhash_dedup,
    rouge_l,
    rouge_tokens,
)

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
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


def reference_greedy(texts, threshold):
    """The greedy loop of Self-Instruct / Alpaca, written with the rouge_score package."""
    kept_texts, kept = [], []
    for i, t in enumerate(texts):
        if all(SCORER.score(t, k)["rougeL"].fmeasure < threshold for k in kept_texts):
            kept_texts.append(t)
            kept.append(i)
    return kept


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(WORDS, min_size=0, max_size=9).map(" ".join), max_size=30),
       st.sampled_from([0.3, 0.5, 0.6, 0.7, 0.8, 1.0]))
def test_greedy_dedup_equals_reference_on_random_lists(texts, threshold):
    # A 20-word vocabulary makes near-duplicates and exact ties at the threshold common.
    assert greedy_dedup(texts, threshold) == reference_greedy(texts, threshold)


def instruction_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` instruction-like sentences from a few templates and a small vocabulary, seeded: many near-duplicates,
    exact repeats and ROUGE-L ties, like a real pool (built here, so the test needs no data beside the repo)."""
    rng = random.Random(seed)
    verbs = ["Write", "Describe", "Explain", "List", "Summarize", "Give", "Create", "Suggest"]
    things = ["a poem", "a short story", "three facts", "an email", "a recipe", "two reasons", "a plan", "a haiku"]
    topics = ["the sea", "a busy city", "climate change", "your favourite book", "the moon", "a rainy day",
              "healthy eating", "a job interview", "the history of tea", "learning to code"]
    tails = ["", " in one sentence", " for a child", " in simple words", " using five adjectives", " briefly"]
    moods = ["", "funny ", "sad ", "formal ", "surprising ", "clear ", "detailed "]
    pick = rng.choice
    return [f"{pick(verbs)} {pick(moods)}{pick(things)} about {pick(topics)}{pick(tails)}." for _ in range(n)]


@pytest.mark.parametrize("threshold", [0.7, 0.5])
def test_greedy_dedup_matches_reference_on_a_realistic_pool(threshold):
    instructions = instruction_corpus(2000)
    ours = greedy_dedup(instructions, threshold)
    assert ours == reference_greedy(instructions, threshold)
    if threshold == 0.5:  # the case with many exact ties: some F values sit exactly on 0.5
        scores = [SCORER.score(instructions[i], instructions[j])["rougeL"].fmeasure
                  for i in range(300) for j in range(i)]
        assert scores.count(0.5) > 10


def test_exact_dedup_normalises():
    texts = ["Write a poem.", "write  a POEM.", "Write a poem!", "Ｗrite a poem."]
    assert exact_dedup(texts) == [0, 2]


def test_minhash_removes_near_copies_in_any_script():
    ja = "猫は日当たりの良い窓辺で一日中眠っていることが多いです。"
    texts = [ja, ja.replace("一日中", "午後ずっと"), "東京は日本の首都であり、人口が最も多い都市です。",
             "The quick brown fox jumps over the lazy dog near the river bank today.",
             "The quick brown fox jumps over the lazy dog near the river bank, today."]
    assert minhash_dedup(texts, 0.5) == [0, 2, 3]
    assert greedy_dedup(texts[:3], 0.7) == [0, 1, 2]  # ROUGE sees no tokens in Japanese: keeps all
    assert lsh_bands(0.7, 128) in [(16, 8), (8, 16), (32, 4)]


def test_dedup_cli(tmp_path):
    from conftest import cli

    src = tmp_path / "in.json"
    rows = [{"instruction": "Write a poem about the sea.", "output": "1"},
            {"instruction": "Write a poem about the sea!", "output": "2"},
            {"messages": [{"role": "user", "content": "List three fruits."}, {"role": "assistant", "content": "x"}]},
            {"instruction": "List three fruits", "input": "", "output": "3"}]
    src.write_text(json.dumps(rows))
    out = tmp_path / "out.jsonl"
    r = cli("dedup", src, "--out", out)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in out.read_text().splitlines()] == [rows[0], rows[2]]
    assert "read 4, kept 2, removed 2" in r.stderr
    r = cli("dedup", src, "--out", out, "--method", "exact")
    assert len(out.read_text().splitlines()) == 4
    (tmp_path / "bad.jsonl").write_text('{"output": "no instruction"}\n')
    r = cli("dedup", tmp_path / "bad.jsonl", "--out", tmp_path / "o.jsonl")
    assert r.returncode == 2 and "bad.jsonl:1:" in r.stderr and not (tmp_path / "o.jsonl").exists()


def test_dedup_cli_minhash_and_threshold_checks(tmp_path):
    from conftest import cli

    ja = "猫は日当たりの良い窓辺で一日中眠っていることが多いです。"
    rows = [{"instruction": ja, "output": "1"}, {"instruction": ja.replace("一日中", "午後ずっと"), "output": "2"},
            {"instruction": "東京は日本の首都であり、人口が最も多い都市です。", "output": "3"}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    r = cli("dedup", src, "--out", out, "--method", "minhash", "--threshold", "0.5")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in out.read_text().splitlines()] == [rows[0], rows[2]]  # the near copy went
    assert "minhash dedup (threshold 0.5): read 3, kept 2, removed 1" in r.stderr
    r = cli("dedup", src, "--out", out, "--method", "minhash", "--threshold", "0.95")
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 3  # not that similar
    for bad in ("0", "1.5", "-0.2"):
        r = cli("dedup", src, "--out", tmp_path / "x.jsonl", "--method", "minhash", "--threshold", bad)
        assert r.returncode == 2 and "--threshold must be in (0, 1]" in r.stderr
        assert not (tmp_path / "x.jsonl").exists()
