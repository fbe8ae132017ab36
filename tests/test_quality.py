"""Quality end to end: `selfinstruct score` on a file it has never seen (SmolLM2-135M-Instruct as IFD model and
judge), the keep_top selection in a generate run (and a crash inside it), decontamination in `run`, and the
refusals. The recipes' copy checks on SmolLM2 are in test_vllm.py."""

import json

import pytest
from conftest import ROOT, cli

from selfinstruct.records import read_jsonl

HELDOUT = ROOT / "heldout" / "heldout_tasks.jsonl"
RECORDS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "List three primary colours.", "input": "", "output": "Red, blue and yellow."},
    {"instruction": "What is 12 times 12?", "input": "", "output": "Red, blue and yellow."},  # a swapped output
    {"instruction": "Label the emotion expressed in the sentence as joy, anger, sadness, fear, or surprise.",
     "input": "I finally got the job!", "output": "joy"},  # a held-out task's instruction, word for word
    {"instruction": "Name the largest planet in the Solar System.", "input": "",
     "output": "Jupiter is the largest planet in the Solar System."},
]


@pytest.mark.slow
def test_score_a_file_with_ifd_judge_and_decontamination(smollm2_dir, tmp_path):
    data = tmp_path / "never_seen.json"  # an Alpaca JSON list
    data.write_text(json.dumps(RECORDS, indent=1))
    out = tmp_path / "scored"
    r = cli("score", data, "--scorers", "ifd,judge", "--model", smollm2_dir, "--judge", smollm2_dir,
            "--backend", "transformers", "--no-cache", "--out", out, "--decontaminate", HELDOUT)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out / "scored.jsonl")
    assert [x["instruction"] for x in rows] == [x["instruction"] for x in RECORDS]  # input order
    for x in rows:
        s = x["scores"]
        assert s["ifd"] > 0 and len(s["ifd_losses"]) == 2 and 0 <= s["quality"] <= 1
        j = s["judge"]
        assert j["mode"] == "choice" and j["unparsed"] == 0 and j["score"] in range(1, 6)
        assert {j["task"], j["input"], j["output"]} <= {True, False}
    assert rows[2]["scores"]["ifd"] > rows[1]["scores"]["ifd"]  # the same output fits its own instruction better
    assert rows[3]["selected"] is False and rows[3]["reason"] == "contaminated" and "heldout_task_2" in rows[3]["why"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 5 and summary["dropped"]["contaminated"] == 1
    assert summary["selected"] == sum(x["selected"] for x in rows) == len(read_jsonl(out / "selected.jsonl"))
    audit = summary["judge"]["audit"]
    assert audit["records"] == 5 and audit["unparsed_answers"] == 0
    assert audit["valid task"]["n"] == 5 and audit["all valid"]["ci95"] is not None
    assert "audit (Self-Instruct, Table 2)" in r.stdout and "selected" in r.stderr


def test_score_refuses_bad_input_with_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Say hi.", "output": "Hi."}\n{"instruction": 3}\n')
    r = cli("score", bad, "--scorers", "ifd", "--model", tmp_path / "no-model")
    assert r.returncode == 2 and f"{bad}:2" in r.stderr
    r = cli("score", bad, "--scorers", "ifd,vibes")
    assert r.returncode == 2 and "unknown scorer 'vibes'" in r.stderr
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"instruction": "Say hi.", "output": "Hi."}\n')
    r = cli("score", ok, "--scorers", "ifd", "--model", tmp_path / "no-model", "--out", tmp_path / "o")
    assert r.returncode == 2 and "cannot load IFD model" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_keep_top_selects_the_best_and_survives_a_crash(teacher_dir, fast_config, tmp_path, monkeypatch):
    """generate with IFD scores and keep_top 0.5: the better half stays, the rest are low_quality rejections
    with their scores. A crash inside the selection (state.json unwritable after generated.jsonl was cut) is
    finished by --resume: every record once, in one file or the other."""
    from selfinstruct.generate import vetting

    cfg = tmp_path / "q.yaml"
    cfg.write_text(fast_config.read_text() + f"quality:\n  scorers: [ifd]\n  ifd_model: {teacher_dir}\n"
                   "  max_ifd: null\n")
    run = tmp_path / "run"
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--num-instructions", 4, "--out", run,
            "--config", cfg)
    assert r.returncode == 0, r.stderr
    before = read_jsonl(run / "generated.jsonl")
    assert len(before) >= 4 and all("ifd" in x["scores"] and "quality" in x["scores"] for x in before)
    real_write = vetting.write_json

    def full_disk(path, obj):
        if path.name == "state.json":
            raise OSError(28, "No space left on device (injected)")
        real_write(path, obj)

    monkeypatch.setattr(vetting, "write_json", full_disk)
    with pytest.raises(OSError):
        vetting.select_top(run, 0.5)
    monkeypatch.undo()
    assert (run / "selection.json").exists()  # the journal is there to finish it
    cfg.write_text(cfg.read_text() + "  keep_top: 0.5\n")
    r = cli("generate", "--out", run, "--resume", "--config", cfg, "--teacher", teacher_dir, "--num-instructions", 4)
    assert r.returncode == 0, r.stderr
    kept = read_jsonl(run / "generated.jsonl")
    dropped = [x for x in read_jsonl(run / "rejected.jsonl") if x.get("stage") == "selection"]
    assert len(kept) == round(len(before) * 0.5) and len(kept) + len(dropped) == len(before)
    assert sorted(x["id"] for x in kept + dropped) == sorted(x["id"] for x in before)
    assert min(x["scores"]["quality"] for x in kept) >= max(x["scores"]["quality"] for x in dropped)
    assert all(x["reason"] == "low_quality" and "keep_top" in x["why"] for x in dropped)
    stats = json.loads((run / "stats.json").read_text())
    assert stats["rejected"]["low_quality"] == len(dropped) and stats["accepted_records"] == len(kept)
    assert not (run / "selection.json").exists()


def test_a_second_in_process_vllm_judge_is_refused():
    from selfinstruct.config import Config
    from selfinstruct.errors import UserError
    from selfinstruct.generate.vetting import make_gate
    from selfinstruct.prompts import Prompts

    cfg = Config()
    cfg.teacher.backend, cfg.eval.judge, cfg.quality.scorers = "vllm", "another/model", ["judge"]
    with pytest.raises(UserError, match="one in-process vLLM engine"):
        make_gate(cfg, Prompts())


def test_every_round_is_decontaminated_against_the_held_out_set(tmp_path):
    from selfinstruct.config import Config
    from selfinstruct.rounds import round_config

    cfg = Config()
    cfg.eval.heldout, cfg.quality.decontaminate = str(HELDOUT), ["other.jsonl"]
    c = round_config(cfg, tmp_path, 2)
    assert c.quality.decontaminate == ["other.jsonl", str(HELDOUT)]
    assert c.quality.scorers == ["ifd"] and cfg.quality.scorers is None  # run scores by default, generate does not
    cfg.rounds.generator = "student"
    assert round_config(cfg, tmp_path, 2).eval.judge == cfg.teacher.model  # the teacher judges the student's data
