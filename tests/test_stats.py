import json

from selfinstruct.stats import diversity, leading_word, plot_diversity, show_stats


def rec(instruction, input="", output="an answer"):
    return {"instruction": instruction, "input": input, "output": output}


RECORDS = [rec("Write a poem about rain."), rec("Write a poem about rain.", "short"),
           rec("Explain how tides work.", "", "The moon pulls the oceans."), rec("- what is 2+2?", "", "4")]
SEEDS = ["Write a poem about rain.", "List three fruits."]


def test_leading_word():
    assert leading_word("  - What is it?") == "what" and leading_word("123") == ""


def test_diversity_numbers():
    d = diversity(RECORDS, SEEDS)
    assert d["leading_verbs"] == [("write", 1), ("explain", 1), ("what", 1)]  # unique instructions
    assert d["lengths_words"]["instruction"]["n"] == 3 and d["lengths_words"]["input"]["n"] == 1
    assert d["lengths_words"]["output"]["max"] == 5
    assert d["inputs_empty_fraction"] == 0.75
    h = d["rouge_vs_seeds"]["histogram"]
    assert sum(h["counts"]) == 3 and h["counts"][-1] == 1  # the copy of a seed sits in [0.95, 1.0]
    json.dumps(d)  # it goes into stats.json


def test_plots_are_pngs(tmp_path):
    paths = plot_diversity(diversity(RECORDS, SEEDS), tmp_path / "plots")
    assert [p.name for p in paths] == ["leading_verbs.png", "lengths.png", "rouge_vs_seeds.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_show_stats_prints_tables(tmp_path, capsys):
    stats = {"method": "alpaca", "teacher": "t", "accepted_instructions": 3, "target_instructions": 3,
             "accepted_records": 4, "requests": {"tasks": 2}, "counts": {"candidates": 9},
             "rejected": {"rouge_similar": 5}, "diversity": diversity(RECORDS, SEEDS)}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    show_stats(tmp_path)
    out = capsys.readouterr().out
    assert "rejected: rouge_similar" in out and "explain" in out and "0.95-1.00" in out


def test_alerts_only_when_one_reason_sank_a_whole_stage():
    from selfinstruct.generate.alerts import FIXES, dominant, raise_alert, uniform_failure

    assert uniform_failure(["classify_unclear"] * 4) == "classify_unclear"
    assert uniform_failure(["classify_unclear", ""]) is None  # one succeeded
    assert uniform_failure(["truncated", "preamble"]) is None and uniform_failure([]) is None
    assert dominant(["a", "b", "b"]) == "b" and dominant([]) == "empty_reply"
    alerts: dict = {}
    line = raise_alert(alerts, "classify", "classify_unclear", 4, ["", "The task is to determine..."])
    raise_alert(alerts, "classify", "classify_unclear", 2, ["Hmm."])
    a = alerts["classify:classify_unclear"]
    assert line == "classify: all 4 failed (classify_unclear)"
    assert (a["steps"], a["candidates"], a["sample"]) == (2, 6, "Hmm.") and a["fix"] == FIXES["classify_unclear"]
