"""`--teacher smollm2` (the built-in small model) and a hub id without hub access failing in seconds."""

import socket

from conftest import ROOT, cli

from selfinstruct.builtin import hub_reachable


def test_the_builtin_name_resolves_to_the_fetched_model(smollm2_home, smollm2_dir, monkeypatch):
    from selfinstruct.modeling import check_model, resolve_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(smollm2_home))
    assert resolve_model("smollm2") == str(smollm2_home / "selfinstruct" / "models" / smollm2_dir.name)
    assert resolve_model("SmolLM2") == resolve_model("smollm2")
    check_model("smollm2", False, "teacher")  # no hub needed


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: a connection there is refused


def test_a_hub_model_without_the_hub_is_refused_with_the_builtin_advice(tmp_path):
    """No --teacher: the default hub teacher; the hub (HF_ENDPOINT) refuses connections. Exit 2 with the advice,
    nothing written (transformers alone would retry for half a minute per file)."""
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    out = tmp_path / "run"
    r = cli("generate", "--seeds", ROOT / "seeds", "--out", out, env=env)
    assert r.returncode == 2, r.stderr
    assert "cannot load teacher model 'Qwen/Qwen2.5-1.5B-Instruct'" in r.stderr
    assert "hub is not reachable" in r.stderr and "--teacher smollm2" in r.stderr
    assert not out.exists()
    r = cli("run", "--seeds", ROOT / "seeds", "--out", tmp_path / "r", env=env)  # the student is checked first
    assert r.returncode == 2 and "cannot load student model" in r.stderr and "--student smollm2" in r.stderr
    assert not (tmp_path / "r").exists()


def test_hub_reachable_follows_the_endpoint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert not hub_reachable(timeout=2)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        assert hub_reachable(timeout=2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable(timeout=2)
