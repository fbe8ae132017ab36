"""`selfinstruct run`: two rounds end to end on tiny CPU models (the round-1 student generates round 2),
and a run killed during round 2's training that a re-run finishes without repeating anything."""

import json
import os
import signal
import subprocess
import time

import pytest
import tiny
from conftest import ROOT, assert_html_report, cli

from selfinstruct.dedup import rouge_l
from selfinstruct.records import read_jsonl

# The student is the tiny Self-Instruct teacher itself plus a LoRA adapter, so as a generator in
# round 2 it still speaks the Self-Instruct format: true self-instruct. Training runs long enough
# (many small steps, frequent checkpoints) for a kill to land in the middle of it.
LOOP_CONFIG = f"""\
teacher:
  backend: transformers
generate:
  prompts_dir: {tiny.TEST_PROMPTS}
  request_batch_size: 4
  max_stalled_requests: 200
  num_instructions: 3
  instruction_sampling: {{temperature: 1.0, top_p: 1.0, presence_penalty: 0.0, max_tokens: 96}}  # paper's stop
  instance_sampling: {{temperature: 0.0, presence_penalty: 0.0, max_tokens: 96, stop: ["Task:"]}}
train:
  epochs: 25
  batch_size: 1
  learning_rate: 0.0003
  logging_steps: 10
  save_steps: 5
  max_length: 256
eval:
  backend: transformers
  max_items: 4
  response_sampling: {{temperature: 0.0, max_tokens: 32}}
  judge_sampling: {{temperature: 0.0, max_tokens: 8}}
rounds:
  rounds: 2
  generator: student
"""


def run_args(out, teacher_dir, judge_dir, config):
    return ["run", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--student", teacher_dir,
            "--judge", judge_dir, "--heldout", ROOT / "heldout", "--out", out, "--config", config]


@pytest.fixture(scope="module")
def loop_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("loop") / "loop.yaml"
    path.write_text(LOOP_CONFIG)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, teacher_dir, judge_dir, loop_config):
    out = tmp_path_factory.mktemp("run") / "run"
    env = {"XDG_CACHE_HOME": str(out.parent / "cache")}
    r = cli(*run_args(out, teacher_dir, judge_dir, loop_config), env=env)
    assert r.returncode == 0, r.stderr
    return out


def counts(report):
    """What an interrupted and an uninterrupted run must agree on."""
    return [(r["round"], r["accepted_instructions"], r["accepted_records"], r["rejected"], r["train_examples"],
             r["vs_base"]["n"] + r["vs_base"]["unjudged"]) for r in report["rounds"]]


def test_two_rounds_student_generates_round_two(finished_run, teacher_dir):
    run = finished_run
    for k in (1, 2):
        for stage in ("generate", "train", "eval"):
            m = json.loads((run / f"round-{k}" / stage / "manifest.json").read_text())
            assert m["stage"] == stage and m["round"] == k
    r1 = read_jsonl(run / "round-1" / "generate" / "generated.jsonl")
    r2 = read_jsonl(run / "round-2" / "generate" / "generated.jsonl")
    assert r1 and r2 and all(r["id"].startswith("r1-") and r["round"] == 1 for r in r1)
    assert all(r["id"].startswith("r2-") and r["round"] == 2 for r in r2)
    # round 1: the teacher; round 2: the round-1 student (base + its adapter)
    assert {r["teacher"] for r in r1} == {str(teacher_dir)}
    assert {r["teacher"] for r in r2} == {r2[0]["teacher"]} and "+round-1-train-" in r2[0]["teacher"]
    # round 2 was deduplicated against round 1
    assert all(rouge_l(a["instruction"], b["instruction"]) < 0.7 for a in r2 for b in r1)
    # train_from base: round 2 trained a fresh adapter on both rounds' records
    m1 = json.loads((run / "round-1" / "train" / "metrics.json").read_text())
    m2 = json.loads((run / "round-2" / "train" / "metrics.json").read_text())
    assert m1["train_examples"] + m1["eval_examples"] == len(r1)
    assert m2["train_examples"] + m2["eval_examples"] == len(r1) + len(r2)  # both rounds' splits, as train does
    page = assert_html_report(run / "report.html", ["selfinstruct run", "Rounds", "Round 1: generated data",
                                                    "Round 2: generated data", "Rejections by reason"])
    assert page.count("data:image/png;base64,") == 4 + 2 * 3  # the run's plots, each round's diversity plots

    report = json.loads((run / "report.json").read_text())
    assert report["base_heldout_loss"] > 0
    for row in report["rounds"]:
        for key in ("vs_base", "vs_previous"):
            w = row[key]
            assert w["n"] + w["unjudged"] == 4 and w["wins"] + w["ties"] + w["losses"] == w["n"]
            if w["win_rate"] is not None:
                assert w["ci95"][0] <= w["win_rate"] <= w["ci95"][1]
        assert row["heldout_loss"] > 0
    ev2 = json.loads((run / "round-2" / "eval" / "eval.json").read_text())
    judged = read_jsonl(run / "round-2" / "eval" / "judgements.jsonl")
    assert [j["comparison"] for j in judged] == ["vs_base"] * 4 + ["vs_previous"] * 4
    assert ev2["vs_previous"]["n"] == sum(j["score"] is not None for j in judged[4:])
    assert {p.name for p in (run / "plots").iterdir()} == {"win_rate.png", "heldout_loss.png", "accepted.png",
                                                           "rejections.png"}
    heldout = [json.loads(line)["id"] for line in (ROOT / "heldout" / "heldout_tasks.jsonl").open()][:4]
    assert [b["id"] for b in read_jsonl(run / "base" / "responses.jsonl")] == heldout

    # selfinstruct eval on a finished run: nothing is redone, the report is printed
    before = (run / "round-1" / "eval" / "manifest.json").read_text()
    r = cli("eval", run)
    assert r.returncode == 0, r.stderr
    assert "rounds" in r.stdout and "base" in r.stdout
    assert (run / "round-1" / "eval" / "manifest.json").read_text() == before


def test_eval_evaluates_the_rounds_left_unevaluated(finished_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "round-2" / "eval")  # as if round 2 stopped after training
    report = json.loads((run / "report.json").read_text())
    before = (run / "round-1" / "eval" / "manifest.json").read_text()
    r = cli("eval", run)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "round-2" / "eval" / "manifest.json").read_text())["stage"] == "eval"
    assert (run / "round-1" / "eval" / "manifest.json").read_text() == before  # round 1 was not redone
    again = json.loads((run / "report.json").read_text())
    assert again["rounds"][1]["vs_base"]["n"] + again["rounds"][1]["vs_base"]["unjudged"] == 4
    assert again["rounds"][0] == report["rounds"][0]


def test_killed_during_round_two_training_resumes(finished_run, teacher_dir, judge_dir, loop_config, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ["selfinstruct", *map(str, run_args(out, teacher_dir, judge_dir, loop_config))]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = out / "round-2" / "train" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("checkpoint-*")):  # round 2 is training: a checkpoint was written
        assert proc.poll() is None, "the run ended before round 2's training could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "round-2" / "train" / "manifest.json").exists()
    done = {p: p.read_text() for p in out.glob("round-*/*/manifest.json")}
    assert len(done) == 4  # round 1's three stages and round 2's generation
    generated = (out / "round-2" / "generate" / "generated.jsonl").read_text()

    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for path, text in done.items():  # finished stages were not redone
        assert path.read_text() == text
    assert (out / "round-2" / "generate" / "generated.jsonl").read_text() == generated
    report = json.loads((out / "report.json").read_text())
    assert counts(report) == counts(json.loads((finished_run / "report.json").read_text()))


def test_round_config_maps_generator_training_and_dedup(tmp_path):
    from selfinstruct.config import Config
    from selfinstruct.rounds import round_config

    cfg = Config()
    cfg.train.student, cfg.generate.dedup_against = "student-model", ["old.jsonl"]
    cfg.rounds.generator, cfg.rounds.train_from = "student", "previous"
    one, two = round_config(cfg, tmp_path, 1), round_config(cfg, tmp_path, 2)
    assert one.teacher == cfg.teacher and one.train.init_adapter is None  # round 1: the teacher, a fresh adapter
    assert one.train.data == str(tmp_path / "round-1" / "train-data")
    assert two.teacher.model == "student-model" and two.teacher.lora_path == str(tmp_path / "round-1/train/adapter")
    assert two.train.data == str(tmp_path / "round-2" / "generate")
    assert two.train.init_adapter == str(tmp_path / "round-1" / "train" / "adapter")
    assert two.generate.dedup_against == ["old.jsonl", str(tmp_path / "round-1" / "generate")]
    assert two.generate.seed != one.generate.seed and two.train.out == str(tmp_path / "round-2" / "train")
    cfg.rounds.generator, cfg.rounds.train_from = "teacher", "base"
    two = round_config(cfg, tmp_path, 2)
    assert two.teacher == cfg.teacher and two.train.data == str(tmp_path / "round-2" / "train-data")
    assert cfg.generate.dedup_against == ["old.jsonl"]  # the run's own config is left alone


def test_rounds_train_on_the_union_of_each_rounds_split(tmp_path):
    """train_from base: round 2 trains on rounds 1 and 2's train splits and evaluates on their test splits, the
    split `selfinstruct train --data <generate run>` uses; a record keeps its side."""
    from selfinstruct.dataset import load_training_data, save_dataset
    from selfinstruct.records import json_line
    from selfinstruct.rounds import train_data

    sides = {}
    for k in (1, 2):
        gen = tmp_path / f"round-{k}" / "generate"
        gen.mkdir(parents=True)
        recs = [{"id": f"r{k}-{i}", "method": "alpaca", "instruction": f"Task {k} {i}.", "input": "",
                 "output": f"Answer {k} {i}."} for i in range(10)]
        (gen / "generated.jsonl").write_text("".join(json_line(r) for r in recs))
        save_dataset(recs, gen / "dataset", 0.2, seed=42)
        own_train, own_test = load_training_data(gen)
        sides[k] = (own_train, own_test)
    train, test = load_training_data(train_data(tmp_path, 2))
    assert train == sides[1][0] + sides[2][0] and test == sides[1][1] + sides[2][1]
    assert len(test) == 4 and not {str(c) for c in train} & {str(c) for c in test}


def test_a_round_of_one_record_has_an_empty_test_split_that_loads(tmp_path):
    """One accepted record: train 1, test 0. The empty split is saved so that it loads (datasets wrote no file
    for it and then failed to read the DatasetDict: `run` stopped with an IndexError after round 1)."""
    from selfinstruct.dataset import load_training_data, save_dataset
    from selfinstruct.records import json_line
    from selfinstruct.rounds import train_data

    gen = tmp_path / "round-1" / "generate"
    gen.mkdir(parents=True)
    rec = {"id": "r1-1", "method": "evol:deepen", "instruction": "Name a river.", "input": "", "output": "The Nile."}
    (gen / "generated.jsonl").write_text(json_line(rec))
    assert save_dataset([rec], gen / "dataset", 0.1, seed=1) == {"train": 1, "test": 0}
    assert [len(x) for x in load_training_data(gen)] == [1, 0]
    assert [len(x) for x in load_training_data(train_data(tmp_path, 1))] == [1, 0]


def test_adapters_vllm_cannot_serve_are_refused_up_front(tmp_path):
    from selfinstruct.config import Config
    from selfinstruct.errors import UserError
    from selfinstruct.roles import check_servable

    cfg = Config()
    cfg.eval.backend = "vllm"
    check_servable(cfg)  # the defaults are servable: rank 16 <= max_lora_rank 16, plain LoRA
    cfg.train.lora_r = 64
    with pytest.raises(UserError, match="max_lora_rank"):
        check_servable(cfg)
    cfg.train.lora_r, cfg.train.use_dora = 16, True
    with pytest.raises(UserError, match="use_dora"):
        check_servable(cfg)
    cfg.eval.backend = "transformers"  # opting out: PEFT runs anything
    check_servable(cfg)


def test_bad_student_or_heldout_fails_before_anything_is_written(teacher_dir, tmp_path):
    base = ["run", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--rounds", 2]
    r = cli(*base, "--student", tmp_path / "no-student", "--heldout", ROOT / "heldout", "--out", tmp_path / "a")
    assert r.returncode == 2 and "cannot load student model" in r.stderr and "--student PATH" in r.stderr
    r = cli(*base, "--student", teacher_dir, "--heldout", tmp_path / "missing.jsonl", "--out", tmp_path / "b")
    assert r.returncode == 2 and "held-out set (--heldout / eval.heldout)" in r.stderr and "missing.jsonl" in r.stderr
    r = cli(*base, "--student", teacher_dir, "--judge", tmp_path / "no-judge", "--heldout", ROOT / "heldout",
            "--out", tmp_path / "c")
    assert r.returncode == 2 and "cannot load judge model" in r.stderr
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_judge_that_cannot_be_read_fails_the_evaluation(finished_run, random_model_dir, tmp_path, monkeypatch):
    """A judge whose verdicts cannot be read: the evaluation stops with the count and the fix, instead of
    reporting a win rate; the round stays unevaluated, so a later `eval` with a better judge redoes it.
    On transformers the verdict is an enforced choice and always readable, so the garbled answers are
    injected (as a server that ignores the choice would send them), around the real evaluation."""
    import shutil

    from selfinstruct.configfile import load_config
    from selfinstruct.errors import JudgeError
    from selfinstruct.generators import Completion
    from selfinstruct.generators.hf import HFGenerator
    from selfinstruct.rounds import evaluate_run

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "round-2" / "eval")
    monkeypatch.setattr(HFGenerator, "_choose", lambda self, req: Completion("The weather is nice today.", "stop"))
    cfg = load_config(run / "config.yaml", {"eval.judge": str(random_model_dir)})
    with pytest.raises(JudgeError, match=r"verdict could not be read in .*eval\.max_unparsed_share"):
        evaluate_run(cfg, run)
    assert not (run / "round-2" / "eval" / "manifest.json").exists()
    assert read_jsonl(run / "round-2" / "eval" / "judgements.jsonl")  # the raw replies are kept for a look
