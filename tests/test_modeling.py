"""Models from a .gguf file (llama.cpp, Ollama): converted once into a directory every backend loads,
accepted wherever a model is (--teacher, --student, --judge)."""

import json
import os

import pytest
from conftest import CACHE, ROOT, cli

from selfinstruct.errors import UserError
from selfinstruct.modeling import resolve_model
from selfinstruct.records import read_jsonl


@pytest.fixture()
def xdg(tmp_path, smollm2_dir):
    """An XDG cache whose models/ already holds the session's conversion (made by the smollm2_dir fixture,
    through resolve_model), so the CLI below must find it rather than convert again."""
    home = tmp_path / "xdg"
    (home / "selfinstruct").mkdir(parents=True)
    os.symlink(CACHE / "models", home / "selfinstruct" / "models")
    return home


def test_conversion_is_a_complete_model_directory(smollm2_gguf_file, smollm2_dir):
    files = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"  # vLLM must not look for GGUF
    assert resolve_model(str(smollm2_gguf_file), CACHE / "models") == str(smollm2_dir)  # found, not redone
    assert resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # anything else is passed through


def test_missing_gguf_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "model.gguf"))


def test_gguf_as_student_and_teacher(smollm2_gguf_file, xdg, tmp_path):
    env = {"XDG_CACHE_HOME": str(xdg)}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Name a colour.", "output": "Blue."}) + "\n")
    r = cli("train", "--data", data, "--student", smollm2_gguf_file, "--preview", "1", "--json", env=env)
    assert r.returncode == 0, r.stderr
    tokens = json.loads(r.stdout)[0]
    assert "".join(t["token"] for t in tokens if t["trained"]).startswith("Blue.")  # its ChatML template
    assert "converting" not in r.stderr  # the cached conversion was used

    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher: {backend: transformers}\ngenerate:\n  evol: {rounds: 1, max_inputs: 1, "
                   "evolve_sampling: {temperature: 0.7, top_p: 1.0, max_tokens: 40}, "
                   "response_sampling: {temperature: 0.7, top_p: 1.0, max_tokens: 40}, "
                   "equality_sampling: {temperature: 0.0, max_tokens: 4}}\n")
    run = tmp_path / "run"
    r = cli("generate", "--method", "evol", "--seeds", ROOT / "tests" / "data" / "plain_tasks.jsonl", "--teacher",
            smollm2_gguf_file, "--out", run, "--config", cfg, env=env)
    assert r.returncode == 0, r.stderr
    stats = json.loads((run / "stats.json").read_text())
    assert stats["teacher"] == str(smollm2_gguf_file) and stats["requests"]["evolve"] == 1
    assert all(x["teacher"] == str(smollm2_gguf_file) for x in read_jsonl(run / "generated.jsonl"))
