"""End-to-end: the console script as a user runs it, on tiny models, CPU only."""

import html
import json

import pytest
import torch
from conftest import ROOT, assert_html_report, cli
from safetensors.torch import load_file
from serve import transformers_serve

from selfinstruct.records import read_jsonl

RECORD_KEYS = {"id", "instruction", "input", "output", "method", "round", "parents", "teacher", "template",
               "sampling", "scores", "lineage"}


def check_run(run, n_instructions, teacher, method="self-instruct", mode="choice"):
    records = read_jsonl(run / "generated.jsonl")
    assert len({r["instruction"] for r in records}) == n_instructions
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["teacher"] == str(teacher) and r["method"] == method and r["round"] == 1
        assert len(r["parents"]) == (8 if method == "self-instruct" else 3) and r["output"].strip()
        assert r["template"].startswith({"self-instruct": "self_instruct/instructions.jinja@",
                                         "alpaca": "alpaca/prompt.jinja@"}[method])
        assert r["scores"]["rouge_max"] < 0.7
        if method == "self-instruct":  # Yes / No: a choice the backend enforced (transformers), or parsed text
            assert r["scores"]["classification_mode"] == mode
    stats = json.loads((run / "stats.json").read_text())
    assert stats["accepted_instructions"] == n_instructions and stats["accepted_records"] == len(records)
    assert stats["stopped"] == "done"
    rejected = read_jsonl(run / "rejected.jsonl")
    assert stats["rejected_total"] == len(rejected)
    assert all(r["reason"] for r in rejected)
    assert (run / "config.yaml").exists()
    from datasets import load_from_disk

    dd = load_from_disk(str(run / "dataset"))
    assert len(dd["train"]) + len(dd["test"]) == len(records) and len(dd["test"]) >= 1
    assert dd["train"][0]["messages"][1]["role"] == "assistant"
    assert stats["diversity"]["rouge_vs_seeds"]["n"] == n_instructions
    assert {p.name for p in (run / "plots").iterdir()} == {"leading_verbs.png", "lengths.png", "rouge_vs_seeds.png"}
    return records


def test_generate_then_train(teacher_dir, random_model_dir, fast_config, tmp_path):
    run = tmp_path / "run"
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--num-instructions", 4,
            "--out", run, "--config", fast_config, "--seed", 1)
    assert r.returncode == 0, r.stderr
    assert "accepted instructions" in r.stderr  # the summary table
    check_run(run, 4, teacher_dir)
    assert f"report: {run / 'report.html'}" in r.stderr
    page = assert_html_report(run / "report.html", ["selfinstruct generate", "Counts", "Accepted records",
                                                    "Rejections by reason", "Diversity"])
    assert all(html.escape(r["instruction"][:40]) in page for r in read_jsonl(run / "generated.jsonl"))  # < 12
    assert page.count("data:image/png;base64,") == 3  # the diversity plots
    (run / "report.html").unlink()
    r = cli("report", run)
    assert r.returncode == 0 and r.stdout.strip() == str(run / "report.html")
    assert_html_report(run / "report.html", ["Counts"])
    (run / "stats.json").rename(run / "stats.bak")  # a run that did not finish: its checkpoint's counts
    from selfinstruct.htmlreport import write_html_report

    page = write_html_report(run).read_text()
    state = json.loads((run / "state.json").read_text())
    assert "not finished" in page and f"<td>{sum(state['reasons'].values())}</td>" in page
    assert f"<td>{len(read_jsonl(run / 'generated.jsonl'))}</td>" in page
    (run / "stats.bak").rename(run / "stats.json")

    r = cli("train", "--data", run, "--student", random_model_dir, "--config", fast_config)
    assert r.returncode == 0, r.stderr
    adapter = run / "train" / "adapter"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(random_model_dir), adapter)
    trained = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert trained and all(torch.count_nonzero(v) > 0 for v in trained.values())
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved)
    metrics = json.loads((run / "train" / "metrics.json").read_text())
    evals = [h["eval_loss"] for h in metrics["log_history"] if "eval_loss" in h]
    assert metrics["eval_examples"] >= 1 and len(evals) >= 2  # once per epoch, and at the end
    assert metrics["eval_loss"] == evals[-1] and 0 < metrics["eval_loss"] < 20
    assert metrics["trained_tokens_per_epoch"] > 0


@pytest.mark.slow
def test_generate_through_transformers_serve(teacher_dir, fast_config, tmp_path):
    secret = "sk-test-DO-NOT-WRITE-4f8a1c"
    with transformers_serve(teacher_dir, tmp_path / "serve.log") as url:
        run = tmp_path / "run"
        r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--backend", "openai",
                "--base-url", url, "--num-instructions", 3, "--out", run, "--config", fast_config,
                env={"OPENAI_API_KEY": secret})
        assert r.returncode == 0, r.stderr
    check_run(run, 3, teacher_dir, mode="parsed")  # a server may ignore the choice: the answer is parsed
    stats = json.loads((run / "stats.json").read_text())
    log = (tmp_path / "serve.log").read_text()
    sent = log.count('"POST /v1/chat/completions HTTP/1.1" 200')
    counts = stats["counts"]
    # Steps in flight past the one that reaches the target are dropped; what they asked for is counted as
    # unused (a request cancelled before it left is counted there too, but the server never saw it).
    assert sum(stats["requests"].values()) <= sent <= sum(stats["requests"].values()) + counts.get("requests_unused", 0)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "serve.log"]
    assert any(p.suffix == ".sqlite" for p in written)  # the cache is among the files searched
    assert not [p for p in written if secret.encode() in p.read_bytes()], "the API key reached a file"
    assert secret not in r.stderr + r.stdout


def test_garbage_teacher_ends_with_clear_message(random_model_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher:\n  backend: transformers\ngenerate:\n  request_batch_size: 4\n  max_stalled_requests: 8\n"
                   "  instruction_sampling: {max_tokens: 24}\n  instance_sampling: {max_tokens: 24}\n")
    run = tmp_path / "run"
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", random_model_dir, "--num-instructions", 5,
            "--out", run, "--config", cfg, timeout=300)
    assert r.returncode == 1
    assert "no acceptable instruction in 8 requests" in r.stderr
    stats = json.loads((run / "stats.json").read_text())
    assert stats["stopped"] == "stalled" and stats["requests"]["instructions"] == 8
    assert stats["accepted_instructions"] == 0


def test_resume_continues_and_refuses_to_mix(teacher_dir, fast_config, tmp_path):
    run = tmp_path / "run"
    args = ["generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--out", run, "--config", fast_config]
    assert cli(*args, "--num-instructions", 2).returncode == 0
    first = read_jsonl(run / "generated.jsonl")
    r = cli(*args, "--num-instructions", 4)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = cli(*args, "--num-instructions", 4, "--resume")
    assert r.returncode == 0, r.stderr
    records = check_run(run, 4, teacher_dir)
    assert records[: len(first)] == first  # nothing accepted earlier is lost or rewritten


def test_default_teacher_offline_says_pass_teacher(tmp_path):
    r = cli("generate", "--seeds", ROOT / "seeds", "--out", tmp_path / "run",
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2
    assert "Qwen/Qwen2.5-1.5B-Instruct" in r.stderr and "--teacher PATH" in r.stderr
    assert not (tmp_path / "run").exists()


def test_unloadable_student_writes_nothing(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    r = cli("train", "--data", data, "--student", tmp_path / "no-model", "--out", tmp_path / "t")
    assert r.returncode == 2 and "--student PATH" in r.stderr
    assert not (tmp_path / "t").exists()


def test_bad_config_names_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("generate:\n  num_instructions: -3\n")
    r = cli("generate", "--seeds", ROOT / "seeds", "--config", cfg, "--out", tmp_path / "run")
    assert r.returncode == 2 and f"{cfg}:2:" in r.stderr and "must be >= 1" in r.stderr
    assert not (tmp_path / "run").exists()


def test_train_bad_data(tmp_path, random_model_dir):
    r = cli("train", "--data", tmp_path / "missing.jsonl", "--student", random_model_dir)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_resume_cuts_rows_of_an_unfinished_step(teacher_dir, fast_config, tmp_path):
    """Rows appended after the last checkpoint (a crash mid-step) are cut, and the step is redone."""
    run = tmp_path / "run"
    args = ["generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--out", run, "--config", fast_config]
    assert cli(*args, "--num-instructions", 2).returncode == 0
    good = read_jsonl(run / "generated.jsonl")
    with (run / "generated.jsonl").open("a") as fh:  # what a step that died before its checkpoint leaves
        fh.write(json.dumps({**good[0], "id": "r1-999999"}) + "\n")
    assert cli(*args, "--num-instructions", 3, "--resume").returncode == 0
    records = read_jsonl(run / "generated.jsonl")
    assert "r1-999999" not in {r["id"] for r in records}
    assert records[: len(good)] == good and len({r["id"] for r in records}) == len(records)


def test_resume_needs_out(tmp_path):
    r = cli("generate", "--seeds", ROOT / "seeds", "--resume", cwd=tmp_path)
    assert r.returncode == 2 and "--resume needs --out" in r.stderr


def test_generate_alpaca_and_stats(alpaca_teacher_dir, fast_config, tmp_path):
    run = tmp_path / "run"
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", alpaca_teacher_dir, "--method", "alpaca",
            "--num-instructions", 4, "--out", run, "--config", fast_config)
    assert r.returncode == 0, r.stderr
    records = check_run(run, 4, alpaca_teacher_dir, method="alpaca")
    assert all(r["sampling"]["task"]["temperature"] == 1.0 for r in records)
    stats = json.loads((run / "stats.json").read_text())
    assert set(stats["requests"]) == {"tasks"}
    r = cli("stats", run)
    assert r.returncode == 0 and "accepted instructions" in r.stdout and "ROUGE-L against the seeds" in r.stdout


def test_dedup_against_earlier_runs(teacher_dir, fast_config, tmp_path):
    """Instructions of an earlier run join the pool: a second run accepts nothing near them. Both runs
    use the same seed, so the second one's first step proposes the first run's instructions again."""
    first, second = tmp_path / "r1", tmp_path / "r2"
    base = ["generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--num-instructions", 3]
    assert cli(*base, "--config", fast_config, "--out", first).returncode == 0
    cfg = tmp_path / "more.yaml"
    cfg.write_text(fast_config.read_text().replace("generate:\n", f"generate:\n  dedup_against: ['{first}']\n"))
    r = cli(*base, "--config", cfg, "--out", second)
    assert r.returncode == 0, r.stderr
    from selfinstruct.dedup import rouge_l

    old = {r["instruction"] for r in read_jsonl(first / "generated.jsonl")}
    new = {r["instruction"] for r in read_jsonl(second / "generated.jsonl")}
    assert all(rouge_l(a, b) < 0.7 for a in new for b in old)
    near_old = [r for r in read_jsonl(second / "rejected.jsonl")
                if r["reason"] == "rouge_similar" and r["nearest"] in old]
    assert near_old, "no candidate was rejected for being near an earlier run's instruction"


SWALLOWER = """
import multiprocessing, signal, sys, time
from selfinstruct import signals
signals.GRACE_S = 1.0
if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,))
    child.start()
    print(child.pid, flush=True)
    signal.signal(signal.SIGTERM, signals.on_signal)
    while True:  # like a native call that swallows the interrupt (vLLM's start-up handshake does)
        try:
            time.sleep(600)
        except KeyboardInterrupt:
            pass
"""


def test_a_swallowed_sigterm_still_ends_the_run_and_its_children(tmp_path):
    import signal
    import subprocess
    import sys

    import psutil

    script = tmp_path / "swallow.py"
    script.write_text(SWALLOWER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(proc.stdout.readline()))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    child.wait(60)  # raises if the child outlived its parent


def test_a_stage_that_fails_the_same_way_every_time_is_reported(teacher_dir, tmp_path):
    """One token per instruction list: every reply is cut (`truncated`). The run does not just stall: the
    summary and the error say which stage failed how, show a reply, and name the fix."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher:\n  backend: transformers\ngenerate:\n  request_batch_size: 4\n  max_stalled_requests: 8\n"
                   "  instruction_sampling: {max_tokens: 1}\n")
    run = tmp_path / "run"
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--num-instructions", 3, "--out", run,
            "--config", cfg)
    assert r.returncode == 1
    assert "Every instructions candidate failed as truncated in 2 step(s)" in r.stderr
    assert "raise the stage's max_tokens" in r.stderr and "stages where every candidate failed" in r.stderr
    alerts = json.loads((run / "stats.json").read_text())["alerts"]
    assert [(a["stage"], a["reason"], a["steps"], a["candidates"]) for a in alerts] == [("instructions", "truncated",
                                                                                         2, 8)]
    assert alerts[0]["sample"].startswith("9.")  # the prefilled item number and the one token after it


def test_every_subcommand_help_ends_with_an_example():
    from selfinstruct.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        last = p.format_help().rstrip().rsplit("\n\n", 1)[-1]  # the help's last paragraph
        assert " ".join(last.split()) == p.epilog and p.epilog.startswith(f"example: selfinstruct {name} "), name
