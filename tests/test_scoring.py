"""Quality scores: the judge's answers read into an audit, IFD from a real model (SmolLM2-135M-Instruct), the
combined `quality`, and n-gram decontamination."""

import pytest

from selfinstruct.config import Sampling
from selfinstruct.decontam import NgramIndex
from selfinstruct.generators import Completion
from selfinstruct.prompts import Prompts
from selfinstruct.scoring import QUESTIONS, judge_requests, quality, read_judgements


def test_judge_asks_the_audit_questions_as_choices():
    reqs = judge_requests(Prompts(), [("Name a fruit.", "", "Apple."), ("Sort the list.", "3, 1", "1, 3")],
                          Sampling(temperature=0, max_tokens=4))
    assert len(reqs) == 2 * len(QUESTIONS)
    assert [r.choices for r in reqs[:4]] == [("Yes", "No")] * 3 + [("1", "2", "3", "4", "5")]
    assert "Input: (none)" in reqs[0].prompt and "Input: 3, 1" in reqs[4].prompt
    assert "valid, sensible task" in reqs[0].prompt and "appropriate" in reqs[1].prompt
    assert "correct and acceptable" in reqs[2].prompt and "from 1" in reqs[3].prompt


def test_judgements_are_read_and_unparsed_ones_counted():
    texts = ["Yes", "no.", "Yes, it is", "4", "Maybe", "No", "I think so", "Score: 2/5"]
    judged = read_judgements([[Completion(t, "stop")] for t in texts], "parsed")
    assert judged[0] == {"task": True, "input": False, "output": True, "score": 4, "unparsed": 0, "mode": "parsed"}
    assert judged[1] == {"task": None, "input": False, "output": None, "score": 2, "unparsed": 2, "mode": "parsed"}


def test_quality_combines_the_scorers_that_ran():
    good = {"task": True, "input": True, "output": True, "score": 5}
    assert quality({"judge": good}) == 1.0
    assert quality({"judge": {"task": True, "input": False, "output": None, "score": 3}}) == pytest.approx(0.5)
    assert quality({"ifd": 0.3}) == 1.0 and quality({"ifd": 0.75}) == 0.5 and quality({"ifd": 1.2}) == 0.0
    assert quality({"ifd": 0.75, "judge": good}) == 0.75
    assert quality({"ifd": None}) is None and quality({}) is None


def test_decontamination_finds_13_grams_and_short_items_whole(tmp_path):
    f = tmp_path / "eval.jsonl"
    f.write_text('{"id": "h1", "instruction": "What is the history of NYC Prospect Park?", "output": "It opened '
                 'in 1867, designed by Frederick Law Olmsted and Calvert Vaux after their work on Central Park."}\n'
                 '{"id": "h2", "instruction": "Name a colour.", "output": "Red"}\n')
    index = NgramIndex.from_paths([str(f)], 13)
    assert index.hit(["Tell me: what is the history of NYC prospect park? Be brief."]) == "eval.jsonl:h1"  # whole
    assert index.hit(["Olmsted and Calvert Vaux after their work on Central Park, it opened in 1867, designed by "
                      "Frederick Law Olmsted and Calvert Vaux after their work on Central"]) == "eval.jsonl:h1"
    assert index.hit(["Designed by Frederick Law Olmsted and Calvert Vaux."]) is None  # 8 words of a long text
    assert index.hit(["Name a colour.", "Red"]) is None  # too short to count whole
    assert NgramIndex(13).hit(["anything"]) is None


@pytest.mark.slow
def test_ifd_ranks_an_output_below_its_swapped_copy(smollm2_dir):
    """SmolLM2 as the IFD model: an output under its own instruction scores a lower IFD than under another."""
    from selfinstruct.scoring import IFDScorer

    pairs = [("What is the capital of France?", "The capital of France is Paris."),
             ("Translate 'good morning' into Spanish.", "Buenos días."),
             ("List three primary colours.", "Red, blue and yellow."),
             ("What is 12 times 12?", "12 times 12 is 144."),
             ("Name the largest planet in the Solar System.", "Jupiter is the largest planet in the Solar System.")]
    items = [(i, "", o) for i, o in pairs]
    swapped = [(items[k][0], "", items[(k + 2) % len(items)][2]) for k in range(len(items))]
    scorer = IFDScorer(str(smollm2_dir), device="cpu", batch_size=4)
    real, bad = scorer.score(items), scorer.score(swapped)
    for r, b in zip(real, bad, strict=True):
        assert r["ifd"] < b["ifd"], (r, b)
        assert r["loss_alone"] > 0 and r["loss"] > 0
    assert all(r["ifd"] < 1 for r in real)
    assert scorer.score([("Say hi.", "", "")])[0] == {"ifd": None, "loss": None, "loss_alone": None}
