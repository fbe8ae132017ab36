"""The pairwise judge: verdict parsing, the position swap, win rates and their confidence interval."""

import math

import pytest

from selfinstruct.config import Config, EvalConfig
from selfinstruct.errors import JudgeError
from selfinstruct.evaluate import compare, item_score, order_score, parse_verdict, win_rate
from selfinstruct.generators import Completion
from selfinstruct.generators.base import Blocking
from selfinstruct.records import read_jsonl


@pytest.mark.parametrize("text,verdict", [
    ("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"), ("[[ b ]]", "B"), ("**[[A]]**", "A"), ("[[Tie]]", "tie"),
    ("Response A is more detailed, but B is correct.\nFinal verdict: [[B]]", "B"),
    ("I first thought [[A]] but on reflection [[B]]", "B"),  # the last bracketed verdict counts
    ("A", "A"), (" b.", "B"), ("(A)", "A"), ("Response B", "B"), ("Answer A\n", "A"),
    ("Response A is better because it is accurate.", "A"), ("Overall, assistant B is clearly better.", "B"),
    ("Winner: B", "B"), ("My verdict is A.", "A"), ("Verdict: (B)", "B"),
    ("It's a tie.", "tie"), ("Both are equally good.", "tie"), ("Neither is better.", "tie"),
    ("", None), ("I cannot decide", None), ("The responses discuss apples.", None), ("[[D]]", None),
    ("Both responses are bad because they are incomplete", "tie"),
])
def test_parse_messy_verdicts(text, verdict):
    assert parse_verdict(text) == verdict


def test_position_swap_scores():
    # candidate_first: the candidate was Response A; candidate_second: it was Response B
    assert order_score("A", True) == 1 and order_score("A", False) == 0 and order_score("tie", True) == 0.5
    assert order_score(None, True) is None
    assert item_score("A", "B") == 1.0  # preferred in both positions
    assert item_score("B", "A") == 0.0
    assert item_score("A", "A") == 0.5  # a judge that always picks the first position: no preference
    assert item_score("B", "B") == 0.5
    assert item_score("tie", "B") == 0.75 and item_score("A", "tie") == 0.75 and item_score("tie", "tie") == 0.5
    assert item_score(None, "B") == 1.0 and item_score("B", None) == 0.0  # only the parseable order counts
    assert item_score(None, None) is None


def test_confidence_interval_hand_computed():
    # scores 1, 1, 0.5, 0, 1: mean 0.7; deviations .3 .3 -.2 -.7 .3, squares sum to 0.8, s^2 = 0.8/4 = 0.2,
    # standard error sqrt(0.2)/sqrt(5) = 0.2; half-width 1.96 * 0.2 = 0.392 -> [0.308, 1.092] -> [0.308, 1.0]
    w = win_rate([1.0, 1.0, 0.5, 0.0, 1.0, None])
    assert w["n"] == 5 and w["unjudged"] == 1 and (w["wins"], w["ties"], w["losses"]) == (3, 1, 1)
    assert w["win_rate"] == pytest.approx(0.7)
    assert w["ci95"][0] == pytest.approx(0.7 - 1.959964 * 0.2, abs=1e-6) and w["ci95"][1] == 1.0
    assert math.isclose(w["ci95"][0], 0.308007, abs_tol=1e-5)
    w = win_rate([0.25, 0.75])  # mean 0.5, s = sqrt(0.125), se = 0.25 -> 0.5 +- 0.49
    assert w["ci95"] == pytest.approx([0.5 - 1.959964 * 0.25, 0.5 + 1.959964 * 0.25], abs=1e-6)
    assert win_rate([1.0])["ci95"] == [0.0, 1.0]
    assert win_rate([None])["win_rate"] is None


class LengthJudge(Blocking):
    """Prefers the longer response, or always the first one; what the swap has to cope with."""

    name = "judge"

    def __init__(self, mode: str):
        self.mode, self.prompts = mode, []

    def generate(self, requests):
        out = []
        for r in requests:
            self.prompts.append(r.prompt)
            a = r.prompt.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
            b = r.prompt.split("[Response B]\n")[1].split("\n\nGive your verdict")[0]
            verdict = "[[A]]" if self.mode == "first" or len(a) > len(b) else "[[B]]"
            out.append([Completion(verdict, "stop")])
        return out


def test_compare_runs_both_orders(tmp_path):
    cfg = Config(eval=EvalConfig())
    items = [{"id": f"h{i}", "prompt": f"Question {i}?", "reference": "x"} for i in range(3)]
    long, short = ["a long, careful answer"] * 3, ["short"] * 3
    judge = LengthJudge("longer")
    w = compare(cfg, judge, items, long, short, "vs_base", tmp_path / "j.jsonl")
    assert w["win_rate"] == 1.0 and w["wins"] == 3
    # each item was shown twice, the candidate once in each position
    assert [("Response A]\na long" in p) for p in judge.prompts] == [True, False] * 3
    assert compare(cfg, LengthJudge("longer"), items, short, long, "x", tmp_path / "k.jsonl")["win_rate"] == 0.0
    biased = compare(cfg, LengthJudge("first"), items, long, short, "vs_previous", tmp_path / "j.jsonl")
    assert biased["win_rate"] == 0.5 and biased["ties"] == 3
    rows = read_jsonl(tmp_path / "j.jsonl")
    assert [r["comparison"] for r in rows] == ["vs_base"] * 3 + ["vs_previous"] * 3
    assert rows[0]["candidate_first"]["verdict"] == "A" and rows[0]["candidate_second"]["verdict"] == "B"


class GarbleJudge(Blocking):
    """Fault injection: a judge that answers every comparison with something no parser can read."""

    def generate(self, requests):
        return [[Completion("The weather is nice today.", "stop")] for _ in requests]


def test_unparsed_verdicts_are_counted_and_fail_above_the_limit(tmp_path):
    items = [{"id": f"h{i}", "prompt": f"Question {i}?", "reference": "x"} for i in range(4)]
    cands, refs = ["an answer"] * 4, ["another"] * 4
    lenient = Config(eval=EvalConfig(max_unparsed_share=1.0))
    w = compare(lenient, GarbleJudge(), items, cands, refs, "vs_base", tmp_path / "j.jsonl")
    assert w["unparsed_verdicts"] == 8 and w["unparsed_share"] == 1.0 and w["win_rate"] is None
    with pytest.raises(JudgeError, match=r"8 of 8 verdicts \(100%\).*eval.max_unparsed_share"):
        compare(Config(eval=EvalConfig()), GarbleJudge(), items, cands, refs, "vs_base", tmp_path / "k.jsonl")
    assert len(read_jsonl(tmp_path / "k.jsonl")) == 4  # the raw verdicts are kept for a look
    ok = compare(Config(eval=EvalConfig()), LengthJudge("longer"), items, cands, refs, "vs_base", tmp_path / "l.jsonl")
    assert ok["unparsed_verdicts"] == 0 and ok["unparsed_share"] == 0.0


class ChoosingJudge(LengthJudge):
    """A judge whose backend enforces choices (as vLLM's and transformers' do): it records what it was asked."""

    enforces_choices = True

    def generate(self, requests):
        self.requests = requests
        return super().generate(requests)


def test_verdict_is_a_choice_where_the_backend_enforces_one(tmp_path):
    items = [{"id": "h0", "prompt": "Question?", "reference": "x"}]
    choosing, parsing = ChoosingJudge("longer"), ChoosingJudge("longer")
    parsing.enforces_choices = False
    enforced = compare(Config(eval=EvalConfig()), choosing, items, ["long answer"], ["s"], "vs_base", tmp_path / "a")
    parsed = compare(Config(eval=EvalConfig()), parsing, items, ["long answer"], ["s"], "vs_base", tmp_path / "b")
    assert [(r.choices, r.prefill) for r in choosing.requests] == [(("[[A]]", "[[B]]", "[[C]]"), None)] * 2
    assert [(r.choices, r.prefill) for r in parsing.requests] == [(("[[A]]", "[[B]]", "[[C]]"), "[[")] * 2
    assert (enforced["verdict_mode"], parsed["verdict_mode"]) == ("choice", "parsed")
    assert read_jsonl(tmp_path / "a")[0]["verdict_mode"] == "choice"
