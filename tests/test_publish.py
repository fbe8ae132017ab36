"""Looking at and publishing a run: show, exports, the dataset card, the run manifest, path
confinement, and secrets that must reach no written file."""

import json

import pytest
from conftest import ROOT, cli

from selfinstruct.manifest import redact
from selfinstruct.records import read_jsonl

SECRET = "sk-secret-7Q2x-DO-NOT-WRITE"


@pytest.fixture(scope="module")
def run(tmp_path_factory, teacher_dir):
    d = tmp_path_factory.mktemp("pub")
    cfg = d / "fast.yaml"
    from conftest import FAST_CONFIG

    cfg.write_text(FAST_CONFIG)
    out = d / "run"
    env = {"OPENAI_API_KEY": SECRET, "HF_TOKEN": SECRET, "XDG_CACHE_HOME": str(d / "cache")}
    r = cli("generate", "--seeds", ROOT / "seeds", "--teacher", teacher_dir, "--num-instructions", 3,
            "--out", out, "--config", cfg, env=env)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    return out


def test_manifest_and_card(run):
    m = json.loads((run / "manifest.json").read_text())
    assert m["versions"]["torch"] and m["versions"]["transformers"] and m["versions"]["python"]
    assert "generate" in m["command"] and "--num-instructions" in m["command"]
    assert m["timings_s"]["generate"] > 0 and m["method"] == "self-instruct" and m["stopped"] == "done"
    assert m["teacher_tokens"]["in"] > 0 and m["teacher_tokens"]["out"] > 0
    assert m["git_revision"] is None or len(m["git_revision"].split("-")[0]) == 40
    card = (run / "dataset" / "README.md").read_text()
    stats = json.loads((run / "stats.json").read_text())
    assert f"| accepted records | {stats['accepted_records']} |" in card
    assert "## Licence" in card and "rouge" in card.lower() and str(stats["teacher"]) in card


def test_show_records_and_rejections(run):
    records = read_jsonl(run / "generated.jsonl")
    r = cli("show", run, "--n", 2)
    assert r.returncode == 0 and records[0]["id"] in r.stdout and f"2 of {len(records)} accepted" in r.stdout
    reasons = {x["reason"] for x in read_jsonl(run / "rejected.jsonl")}
    r = cli("show", run, "--rejected", "--reason", "no_such_reason")
    assert r.returncode == 2 and "no rejection with reason 'no_such_reason'" in r.stderr
    if reasons:
        reason = sorted(reasons)[0]
        r = cli("show", run, "--reason", reason, "--n", 1)
        assert r.returncode == 0 and reason in r.stdout
    assert cli("show", run.parent / "nothing").returncode == 2


def test_exports(run):
    records = read_jsonl(run / "generated.jsonl")
    for fmt in ("alpaca", "chat", "sharegpt", "parquet"):
        r = cli("export", run, "--format", fmt)
        assert r.returncode == 0, r.stderr
    alpaca = json.loads((run / "export" / "alpaca.json").read_text())
    assert alpaca == [{"instruction": x["instruction"], "input": x["input"], "output": x["output"]} for x in records]
    chat = read_jsonl(run / "export" / "chat.jsonl")
    assert [c["messages"][1]["content"] for c in chat] == [x["output"] for x in records]
    share = json.loads((run / "export" / "sharegpt.json").read_text())
    assert [[t["from"] for t in s["conversations"]] for s in share] == [["human", "gpt"]] * len(records)
    import datasets

    pq = datasets.Dataset.from_parquet(str(run / "export" / "parquet.parquet"))
    assert pq["id"] == [x["id"] for x in records]
    # an export is a valid training input again
    from selfinstruct.seeds import load_conversations

    assert len(load_conversations(run / "export" / "alpaca.json")) == len(records)


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped", "sub/dir", "..", ".hidden"])
def test_export_names_cannot_escape_the_run(run, name):
    before = set(run.parent.rglob("*"))
    r = cli("export", run, "--format", "chat", "--name", name)
    assert r.returncode == 2 and "plain file name" in r.stderr
    assert set(run.parent.rglob("*")) == before


def test_push_to_hub_offline_is_a_clear_failure(run):
    r = cli("export", run, "--format", "chat", "--push-to-hub", "someone/data",
            env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": SECRET})
    assert r.returncode == 1 and "push to the hub failed" in r.stderr and SECRET not in r.stderr


def test_no_secret_in_any_written_file(run):
    written = [p for p in run.parent.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written) and any(p.suffix == ".sqlite" for p in written)
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]


def test_redact_credentials_in_urls():
    assert redact("http://user:pw@127.0.0.1:8000/v1") == "http://***@127.0.0.1:8000/v1"
    assert redact("--base-url=https://tok@host/v1 other") == "--base-url=https://***@host/v1 other"
    assert redact("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
