import json

import pytest
from conftest import ROOT, cli

from selfinstruct.errors import UserError
from selfinstruct.seeds import load_conversations, load_tasks

SI = {"id": "t1", "name": "n", "instruction": "Add the numbers.", "is_classification": False,
      "instances": [{"input": "2, 3", "output": "5"}]}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_shipped_seeds_and_heldout():
    seeds = load_tasks(ROOT / "seeds")
    held = load_tasks(ROOT / "heldout")
    assert len(seeds) >= 60 and len(held) >= 30
    assert sum(t.is_classification for t in seeds) >= 0.15 * len(seeds)
    assert not {t.instruction for t in seeds} & {t.instruction for t in held}


def test_three_formats(tmp_path):
    d = tmp_path / "seeds"
    d.mkdir()
    write(d / "a.jsonl", [SI])
    (d / "b.json").write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!"},
                                          {"instruction": "Echo.", "output": "x"}]))
    write(d / "c.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Capital of France?"},
                                        {"role": "assistant", "content": "Paris."}]}])
    (d / "notes.txt").write_text("ignored: not .json/.jsonl")
    tasks = load_tasks(d)
    assert [t.instruction for t in tasks] == ["Add the numbers.", "Say hi.", "Echo.", "Capital of France?"]
    assert tasks[0].instances[0].output == "5" and tasks[3].instances[0].output == "Paris."
    convs = load_conversations(d)
    assert convs[0] == [{"role": "user", "content": "Add the numbers.\n\n2, 3"},
                        {"role": "assistant", "content": "5"}]
    assert convs[3][0]["role"] == "system"  # chat records keep all their turns


@pytest.mark.parametrize("content,line,needle", [
    ('{"id": "t1", "name": "n"\n', 1, "invalid JSON"),
    (json.dumps({k: v for k, v in SI.items() if k != "instruction"}) + "\n", 1, "missing field 'instruction'"),
    (json.dumps({**SI, "is_classification": "no"}) + "\n", 1, "'is_classification' must be true or false"),
    (json.dumps({**SI, "instances": [{"input": "a", "output": 5}]}) + "\n", 1, "instances[0]"),
    (json.dumps({**SI, "instances": []}) + "\n", 1, "non-empty list"),
    (json.dumps({"instruction": 3, "output": "x"}) + "\n", 1, "'instruction' must be a string"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n", 1, "messages[0]"),
    (json.dumps({"prompt": "x"}) + "\n", 1, "unrecognised record"),
    ("[1, 2]\n", 1, "expected a JSON object"),
    (json.dumps(SI) + "\n" + json.dumps(SI) + "\n", 2, "duplicate task id"),
])
def test_malformed_seed_files(tmp_path, content, line, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(UserError) as e:
        load_tasks(f)
    assert needle in str(e.value)
    assert (e.value.path, e.value.line) == (str(f), line)


def test_empty_missing_and_binary(tmp_path):
    (tmp_path / "empty.jsonl").write_text("  \n")
    with pytest.raises(UserError, match="file is empty"):
        load_tasks(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="no such file"):
        load_tasks(tmp_path / "missing")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not UTF-8"):
        load_tasks(tmp_path / "bin.jsonl")
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="no .jsonl or .json"):
        load_tasks(tmp_path / "d")


def test_cli_bad_seeds_exit_2_and_nothing_written(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SI) + "\n{oops\n")
    out = tmp_path / "run"
    r = cli("generate", "--seeds", bad, "--teacher", "unused", "--out", out)
    assert r.returncode == 2
    assert f"{bad}:2: invalid JSON" in r.stderr
    assert not out.exists()


def test_self_instruct_seed_needs_only_what_generation_reads(tmp_path):
    """`instruction` and `instances` are required; `id` and `is_classification` default; `name` (which
    Self-Instruct's seed file carries and nothing reads) may be absent."""
    f = write(tmp_path / "mine.jsonl", [{"instruction": "Add the numbers.", "instances": [{"input": "2, 3",
                                                                                           "output": "5"}]},
                                        {**SI, "is_classification": True}])
    tasks = load_tasks(f)
    assert tasks[0].id == "mine-1" and tasks[0].is_classification is False and tasks[0].name == ""
    assert tasks[1].id == "t1" and tasks[1].is_classification is True
    with pytest.raises(UserError, match="'id' must be a string"):
        load_tasks(write(tmp_path / "bad.jsonl", [{**SI, "id": 3}]))
