import json

import pytest

from selfinstruct.errors import UserError
from selfinstruct.records import JsonlAppender, read_jsonl, read_rows, write_atomic


def test_json_list_reports_element_lines(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('[\n  {"a": 1},\n\n  {"b": 2}\n]\n')
    assert [(line, row) for _, line, row in read_rows(f)] == [(2, {"a": 1}), (4, {"b": 2})]


def test_json_list_bad_element_line(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('[\n  {"a": 1},\n  {"b": 2,}\n]\n')
    with pytest.raises(UserError) as e:
        list(read_rows(f))
    assert e.value.line == 3


def test_torn_tail_is_cut_before_appending(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text('{"id": 1}\n{"id": 2, "trunc')
    assert read_jsonl(f) == [{"id": 1}]
    with JsonlAppender(f) as out:
        out.write_many([{"id": 3}])
    assert [json.loads(x)["id"] for x in f.read_text().splitlines()] == [1, 3]


def test_write_atomic_replaces_whole_file(tmp_path):
    f = tmp_path / "s.json"
    write_atomic(f, "old")
    write_atomic(f, "new")
    assert f.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
