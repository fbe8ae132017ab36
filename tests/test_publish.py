"""Looking at and publishing a run: show, exports, the dataset card, the run manifest, path
confinement, and secrets that must reach no written file."""

import json

import pytest
from conftest import ROOT, cli

from selfinstruct.errors import redact
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
    assert r.returncode == 1 and "cannot check the hub repo" in r.stderr and SECRET not in r.stderr


class FakeHub:
    """A hub on 127.0.0.1 that knows one public dataset repo (someone/public), no other, and fails every upload."""

    def __enter__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from serve import free_port

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path.startswith("/api/datasets/someone/public"):
                    body = json.dumps({"id": "someone/public", "private": False, "sha": "0" * 40, "siblings": [],
                                       "tags": [], "author": "someone", "downloads": 0, "likes": 0}).encode()
                    self.send_response(200)
                elif self.path.startswith("/api/datasets/"):
                    body = b'{"error": "Repository not found"}'
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                else:
                    body = b"{}"
                    self.send_response(500)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_PUT = do_GET  # noqa: N815 - uploads fail (500 or 404)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def test_push_to_hub_never_publishes_into_a_public_repo_unasked(run):
    with FakeHub() as hub:
        env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": SECRET, "HF_ENDPOINT": hub.url}
        r = cli("export", run, "--format", "chat", "--push-to-hub", "someone/public", env=env,
                process=True)  # huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT when imported
        assert r.returncode == 2 and "exists and is public" in r.stderr and "--public" in r.stderr
        for repo, flags in (("someone/public", ["--public"]), ("someone/new", [])):  # the check lets these through
            r = cli("export", run, "--format", "chat", "--push-to-hub", repo, *flags, env=env, process=True)
            assert r.returncode == 1 and "push to the hub failed" in r.stderr and SECRET not in r.stderr


def test_no_secret_in_any_written_file(run):
    written = [p for p in run.parent.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written) and any(p.suffix == ".sqlite" for p in written)
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]


def test_redact_credentials_in_urls():
    assert redact("http://user:pw@127.0.0.1:8000/v1") == "http://***@127.0.0.1:8000/v1"
    assert redact("--base-url=https://tok@host/v1 other") == "--base-url=https://***@host/v1 other"
    assert redact("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
