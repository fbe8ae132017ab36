"""Nothing lost, nothing left behind (issue: the run directory, hostile replies, the cache, secrets, training
checkpoints, the hub), with real processes, files and servers. The engine and launched-server cases (SIGKILL
leaves no process) are in test_vllm_processes.py."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli
from serve import ScriptedServer, free_port

from selfinstruct.records import read_jsonl


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file's bytes (the lock file aside: taking the lock of a directory that is ours is not a change)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".selfinstruct.lock"}


def test_a_users_directory_is_refused_and_left_untouched(tmp_path):
    d = tmp_path / "mine"
    (d / "dataset").mkdir(parents=True)
    (d / "dataset" / "keep").write_text("my data")
    (d / "config.yaml").write_text("mine: true\n")
    before = snapshot(d)
    for args in (["generate", "--seeds", ROOT / "seeds", "--teacher", "m", "--out", d],
                 ["generate", "--seeds", ROOT / "seeds", "--teacher", "m", "--out", d, "--resume"],
                 ["run", "--seeds", ROOT / "seeds", "--teacher", "m", "--student", "m", "--out", d],
                 ["train", "--data", ROOT / "seeds", "--student", "m", "--out", d]):
        r = cli(*args)
        assert r.returncode == 2 and "not a selfinstruct run directory" in r.stderr, (args, r.stderr)
        assert snapshot(d) == before


def test_files_the_tool_never_wrote_are_not_resumed(tmp_path, fast_config, teacher_dir):
    """A generated.jsonl of someone else's (Alpaca rows, no state.json) is refused, in a user's directory and in a
    marked one; a checkpointed file changed behind the run's back is refused too. Nothing is touched."""
    d = tmp_path / "foreign"
    d.mkdir()
    rows = "".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": str(i)}) + "\n" for i in range(5))
    (d / "generated.jsonl").write_text(rows)
    args = ["generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--config", fast_config,
            "--num-instructions", 2, "--out"]
    r = cli(*args, d, "--resume")
    assert r.returncode == 2 and (d / "generated.jsonl").read_text() == rows
    (d / ".selfinstruct").write_text('{"kind": "generate"}\n')  # marked as ours, but no state.json
    before = snapshot(d)
    r = cli(*args, d, "--resume")
    assert r.returncode == 2 and "state.json is not" in r.stderr and snapshot(d) == before

    run = tmp_path / "run"
    assert cli(*args, run).returncode == 0
    text = (run / "generated.jsonl").read_text()
    (run / "generated.jsonl").write_text(text.replace('"output": "', '"output": "EDITED ', 1))
    before = snapshot(run)
    r = cli(*args, run, "--resume")
    assert r.returncode == 2 and "differs from what was written before" in r.stderr and snapshot(run) == before
    (run / "generated.jsonl").write_text(text[: len(text) // 2])
    r = cli(*args, run, "--resume")
    assert r.returncode == 2 and "shorter than" in r.stderr


@pytest.mark.slow
def test_two_runs_on_one_directory(tmp_path, fast_config, teacher_dir):
    """The second process is refused (exit 2, naming the first's pid) and the first finishes with every record."""
    run = tmp_path / "run"
    args = ["selfinstruct", "generate", "--seeds", str(ROOT / "seeds"), "--teacher", str(teacher_dir), "--config",
            str(fast_config), "--num-instructions", "12", "--out", str(run)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (run / "state.json").exists():  # the first has written a checkpoint: it holds the lock
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    second = cli(*args[1:], "--resume")
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err
    records = read_jsonl(run / "generated.jsonl")
    assert len({r["instruction"] for r in records}) == 12
    assert len({r["id"] for r in records}) == len(records)


TOPICS = ["rain", "bread", "salt", "trains", "maps of rivers", "owls", "tea", "glass", "chess", "bees", "clocks",
          "snow", "kites", "copper", "tides", "violins", "moss", "ink"]


def scripted_teacher():
    """A teacher whose replies hold a lone surrogate, control characters and Rich markup."""
    asked = iter(range(10**6))

    def reply(prompt: str) -> str:
        if "Is it classification?" in prompt:
            return "No"
        if "Come up with a series of tasks" in prompt:
            k = next(asked) * 3 % len(TOPICS)
            a, b, c = (TOPICS[(k + j) % len(TOPICS)] for j in range(3))
            return (f" Write a haiku about [bold]{a}[/bold] \ud83d.\n10. Explain how {b} is made [/INST].\n"
                    f"11. List three facts about {c}\x07.")
        task = prompt.rsplit("Task:", 1)[-1].strip()
        return f" <none>\nOutput: An answer to {task} \ud83d with [/] markup and a bell\x07."

    return reply


def test_hostile_replies_are_data_not_crashes(tmp_path):
    """A lone surrogate (valid JSON), control characters, Rich markup and a `usage` that is no number: the run ends
    normally, the text is stored cleaned, bad usage is counted, and a resume (replaying the cache) is clean too."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher:\n  max_retries: 0\ngenerate:\n  request_batch_size: 2\n  max_stalled_requests: 8\n")
    run = tmp_path / "run"
    with ScriptedServer(scripted_teacher(), usage={"prompt_tokens": "many", "completion_tokens": [1]}) as server:
        args = ["generate", "--seeds", ROOT / "seeds", "--teacher", "scripted", "--base-url", server.url,
                "--num-instructions", 3, "--out", run, "--config", cfg]
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        records = read_jsonl(run / "generated.jsonl")
        assert records and all("\x07" not in x["output"] for x in records)
        assert any("\ufffd" in x["output"] for x in records) and any("[/INST]" in x["instruction"] for x in records)
        stats = json.loads((run / "stats.json").read_text())
        assert stats["teacher_calls"]["bad_usage"] > 0 and stats["teacher_calls"].get("tokens_in", 0) == 0
        answered = server.answered
        r = cli(*args[:-4], "--num-instructions", 3, "--out", run, "--config", cfg, "--resume")
        assert r.returncode == 0 and "Traceback" not in r.stderr
        r = cli(*args[:-4], "--num-instructions", 3, "--out", tmp_path / "again", "--config", cfg)  # the cache
        assert r.returncode == 0 and server.answered == answered, r.stderr
        assert read_jsonl(tmp_path / "again" / "generated.jsonl") == read_jsonl(run / "generated.jsonl")


def test_an_unreadable_cache_is_a_warning_and_a_new_one_is_private(tmp_path, fast_config, teacher_dir):
    cache = tmp_path / "xdg" / "selfinstruct" / "responses.sqlite"
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    args = ["generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--config", fast_config,
            "--num-instructions", 2, "--out"]
    assert cli(*args, tmp_path / "a", env=env).returncode == 0
    assert oct(cache.stat().st_mode & 0o777) == oct(0o600)
    cache.write_bytes(b"this is not a database" * 100)
    r = cli(*args, tmp_path / "b", env=env)
    assert r.returncode == 0 and "cannot be used" in r.stderr and "running without it" in r.stderr


def test_a_replaced_local_model_is_not_answered_from_the_cache(tmp_path):
    from selfinstruct.config import Sampling
    from selfinstruct.generators import Request
    from selfinstruct.generators.cache import cache_key, model_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"a" * 1000)
    first = model_fingerprint(str(model))
    (model / "model.safetensors").write_bytes(b"b" * 1000)  # same path, same size, other weights
    assert model_fingerprint(str(model)) != first and model_fingerprint("Qwen/Qwen2.5-0.5B") is None
    req = Request("p", Sampling(seed=1))
    assert cache_key(str(model), True, req, 0, first) != cache_key(str(model), True, req, 0, "other")


def test_credentials_are_redacted_and_keys_stay_off_plain_http(tmp_path):
    secret = "pw-7Q2x-DO-NOT-WRITE"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher:\n  max_retries: 0\n")
    run = tmp_path / "run"
    url = f"http://user:{secret}@127.0.0.1:{free_port()}/v1"  # nothing listens there
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", "m", "--base-url", url, "--out", run, "--config", cfg)
    assert r.returncode == 1 and "***@127.0.0.1" in r.stderr and secret not in r.stderr + r.stdout
    assert "***@127.0.0.1" in (run / "config.yaml").read_text()
    assert not [p for p in run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", "m", "--base-url", "http://10.9.8.7/v1", "--out",
            tmp_path / "r2", env={"OPENAI_API_KEY": secret})
    assert r.returncode == 2 and "unencrypted" in r.stderr and secret not in r.stderr
    assert not (tmp_path / "r2").exists()


def test_a_launch_command_binds_loopback_only():
    from selfinstruct.errors import UserError
    from selfinstruct.generators.launch import bind_loopback

    assert bind_loopback(["srv", "--port", "1"]) == ["srv", "--port", "1", "--host", "127.0.0.1"]
    assert bind_loopback(["srv", "--host", "127.0.0.1"]) == ["srv", "--host", "127.0.0.1"]
    assert bind_loopback(["srv", "--bind", "127.0.0.1"]) == ["srv", "--bind", "127.0.0.1"]
    for cmd in (["srv", "--host", "0.0.0.0"], ["srv", "--host=10.0.0.2"], ["srv", "--bind", "::"]):
        with pytest.raises(UserError, match="only listens on 127.0.0.1"):
            bind_loopback(cmd)


def test_an_unexpected_failure_is_a_short_message(tmp_path):
    """The last-resort handler: exit 1, no traceback, what failed and how to report it."""
    code = ("import sys; from selfinstruct import cli; cli.cmd_stats = lambda a: 1 / 0; "
            "sys.exit(cli.main(['stats', 'x']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "SELFINSTRUCT_TRACEBACK": ""})
    assert r.returncode == 1 and "internal error: ZeroDivisionError" in r.stderr and "Traceback" not in r.stderr
    assert "please report it" in r.stderr
