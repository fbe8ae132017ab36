from pathlib import Path

import pytest

from selfinstruct.config import Config
from selfinstruct.configfile import config_reference, dump_yaml, load_config
from selfinstruct.errors import UserError


def test_defaults_are_the_papers():
    g = Config().generate
    assert (g.num_prompt_instructions, g.num_machine_demos, g.max_instances) == (8, 2, 5)
    s = g.instruction_sampling
    assert (s.temperature, s.top_p, s.presence_penalty, s.max_tokens) == (0.7, 0.5, 2.0, 1024)
    assert s.stop == ["\n\n", "\n16", "16.", "16 ."]
    assert g.instance_sampling.temperature == 0.0
    assert Config().filters.rouge_threshold == 0.7


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("teacher:\n  model: from-file\ngenerate:\n  num_instructions: 7\n"
                 "  instruction_sampling:\n    top_p: 0.9\n")
    cfg = load_config(f, {"teacher.model": "from-flag"})
    assert cfg.teacher.model == "from-flag"
    assert cfg.generate.num_instructions == 7
    assert cfg.generate.instruction_sampling.top_p == 0.9
    # untouched fields keep their field's defaults (the paper's), not the Sampling class's
    s = cfg.generate.instruction_sampling
    assert (s.temperature, s.presence_penalty, s.max_tokens) == (0.7, 2.0, 1024)
    assert s.stop == Config().generate.instruction_sampling.stop == ["\n\n", "\n16", "16.", "16 ."]


def test_toml_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[filters]\nrouge_threshold = 0.5\nblacklist = ["image"]\n')
    cfg = load_config(f)
    assert cfg.filters.rouge_threshold == 0.5 and cfg.filters.blacklist == ["image"]


@pytest.mark.parametrize("text,line,needle", [
    ("generate:\n  num_instructoins: 3\n", 2, "unknown key 'generate.num_instructoins'"),
    ("generate:\n  num_instructions: three\n", 2, "must be an integer"),
    ("generate:\n  num_instructions: 0\n", 2, "must be >= 1"),
    ("filters:\n  rouge_threshold: 1.5\n", 2, "rouge_threshold"),
    ("teacher:\n  backend: gpt\n", 2, "must be one of"),
    ("teacher: [1, 2]\n", 1, "must be a mapping"),
    ("generate:\n  seeds: [unclosed\n", 3, "invalid YAML"),
    ("quality:\n  scorers: [ifd, vibes]\n", 2, "unknown scorer 'vibes'"),
    ("quality:\n  keep_top: 0\n", 2, "'quality.keep_top': must be in (0, 1]"),
    ("quality:\n  max_ifd: -1\n", 2, "'quality.max_ifd': must be > 0"),
    ("quality:\n  min_judge: 7\n", 2, "'quality.min_judge': must be between 1 and 5"),
    ("quality:\n  min_quality: high\n", 2, "must be a number"),
    ("quality:\n  decontaminate: [1, 2]\n", 2, "must be a list of str"),
    ("quality:\n  ngram: 2\n", 2, "'quality.ngram': must be >= 4"),
])
def test_bad_yaml_names_file_and_line(tmp_path, text, line, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(f)
    assert needle in str(e.value)
    assert e.value.path == str(f) and e.value.line == line


def test_bad_toml_line(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[train]\nepochs = 1\nlora_r = "big"\n')
    with pytest.raises(UserError) as e:
        load_config(f)
    assert e.value.line == 3 and "lora_r" in str(e.value)


def test_missing_and_wrong_suffix(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(UserError, match="must end in"):
        load_config(tmp_path / "c.json")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, {"generate.num_instructions": 12, "teacher.server.base_urls": ["http://127.0.0.1:1/v1"]})
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_yaml(cfg))
    assert load_config(f) == cfg


def test_a_config_of_an_earlier_version_with_flat_teacher_keys_still_reads(tmp_path):
    """teacher.base_urls, teacher.max_model_len... (before the section was split into server and engine) are read
    into their new places, and a bad value still names its own line."""
    old = tmp_path / "old.yaml"
    old.write_text("teacher:\n  model: m\n  base_urls: [http://127.0.0.1:8000/v1]\n  max_model_len: 2048\n"
                   "  engine: {dtype: bfloat16}\n")
    cfg = load_config(old, {"teacher.max_retries": 1})
    assert cfg.teacher.server.base_urls == ["http://127.0.0.1:8000/v1"] and cfg.teacher.server.max_retries == 1
    assert cfg.teacher.engine.max_model_len == 2048 and cfg.teacher.engine.dtype == "bfloat16"
    (tmp_path / "new.yaml").write_text(dump_yaml(cfg))  # written in the new form, read back the same
    assert "server:" in (tmp_path / "new.yaml").read_text() and load_config(tmp_path / "new.yaml") == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  model: m\n  max_retries: -1\n")
    with pytest.raises(UserError, match="max_retries") as e:
        load_config(bad)
    assert f"{bad}:3" in str(e.value)


def test_readme_config_reference_is_current():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert config_reference() in readme, "regenerate the table in docs/configuration.md from config_reference()"


def test_the_builtin_teacher_gets_cpu_sized_settings_the_user_did_not_choose(tmp_path):
    from selfinstruct.builtin import SMALL_TEACHER
    from selfinstruct.configfile import load_config

    plain = load_config(None, {"teacher.model": "Qwen/Qwen2.5-1.5B-Instruct"})
    small = load_config(None, {"teacher.model": "smollm2"})
    assert plain.generate.instruction_sampling.max_tokens == 1024 and plain.teacher.engine.max_model_len is None
    assert small.generate.instruction_sampling.max_tokens == SMALL_TEACHER["generate.instruction_sampling.max_tokens"]
    assert small.generate.instruction_sampling.stop == plain.generate.instruction_sampling.stop  # the rest stays
    assert small.generate.request_batch_size == 4 and small.teacher.engine.max_model_len == 2048
    cfg = tmp_path / "c.yaml"
    cfg.write_text("generate:\n  instance_sampling: {temperature: 0.0, max_tokens: 300}\n")
    mine = load_config(cfg, {"teacher.model": "smollm2", "generate.request_batch_size": 2})
    assert mine.generate.instance_sampling.max_tokens == 300 and mine.generate.request_batch_size == 2


def test_a_resumed_run_keeps_its_config_under_the_new_file_and_flags(tmp_path):
    """--resume --config FILE: the run's own config.yaml first, FILE on top key by key, then the flags."""
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(load_config(None, {"teacher.model": "m", "generate.num_instructions": 7,
                                                   "generate.request_batch_size": 3})))
    mine = tmp_path / "more.yaml"
    mine.write_text("generate:\n  request_batch_size: 2\n  instance_sampling: {max_tokens: 64}\n")
    cfg = load_config(mine, {"generate.seed": 5}, under=saved)
    g = cfg.generate
    assert (cfg.teacher.model, g.num_instructions, g.request_batch_size, g.seed) == ("m", 7, 2, 5)
    assert g.instance_sampling.max_tokens == 64 and g.instance_sampling.stop == ["Task:"]  # the rest kept
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  request_batch_size: 0\n")
    with pytest.raises(UserError) as e:
        load_config(bad, under=saved)
    assert f"{bad}:2" in str(e.value)
