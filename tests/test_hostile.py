"""Property-based tests over what users and teachers feed us: seed files, config files and teacher
output never cause an uncaught exception -- always a clear UserError, or a counted rejection."""

import contextlib
import json
import random
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfinstruct.config import Config, EvolConfig, GenerateConfig
from selfinstruct.configfile import load_config
from selfinstruct.errors import UserError
from selfinstruct.evaluate import parse_verdict
from selfinstruct.filters import check_evolved_response, check_instruction, clean_instances
from selfinstruct.generate.loop import generate
from selfinstruct.generate.parse import parse_alpaca, parse_equal, parse_instances, parse_instructions, parse_yes_no
from selfinstruct.generate.run import Run
from selfinstruct.generators import Completion
from selfinstruct.generators.base import Blocking, with_prefill
from selfinstruct.records import read_jsonl
from selfinstruct.seeds import Instance, SeedTask, load_conversations, load_tasks

# derandomize: CI sees the same examples every run (a search that finds something new must not make
# an unrelated submission fail); raise max_examples locally to search harder.
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
# What hostile input is made of: lone surrogates (valid in JSON, impossible in UTF-8), control characters, Rich
# markup, and nesting deeper than Python's parsers go.
hostile = st.lists(st.sampled_from(["[/INST]", "[bold]", "[/]", "[red]x[/red]", "\\", "\x00", "\x07", "\ufffd", "é"])
                   | st.characters(categories=["Cs", "Cc"]) | st.text(max_size=6), max_size=8).map("".join)
deep = st.integers(200, 4000).map(lambda d: "[" * d + "]" * d)
texts = st.text() | hostile
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                           max_leaves=12)
seed_like = st.fixed_dictionaries({}, optional={
    "id": json_values, "name": json_values, "instruction": texts | json_values, "input": texts | json_values,
    "output": texts | json_values, "is_classification": json_values,
    "instances": st.lists(st.fixed_dictionaries({}, optional={"input": texts | json_values,
                                                               "output": texts | json_values}), max_size=3)
    | json_values,
    "messages": st.lists(st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["user", "assistant", "system", "tool", ""]) | json_values,
        "content": texts | json_values}), max_size=3) | json_values})


@SETTINGS
@given(rows=st.lists(seed_like | json_values, max_size=5), as_list=st.booleans(), junk=st.binary(max_size=40),
       nested=deep)
def test_seed_files_load_or_say_where(tmp_path_factory, rows, as_list, junk, nested):
    path = tmp_path_factory.mktemp("seeds") / "s.jsonl"
    text = json.dumps(rows) if as_list else "\n".join(json.dumps(r) for r in rows)
    deep_row = f'{{"instruction": "Say hi.", "output": {nested}}}'
    for data in (text.encode(), text.encode() + junk, junk, deep_row.encode(), f"[{deep_row}]".encode()):
        path.write_bytes(data)
        for load in (load_tasks, load_conversations):
            try:
                load(path)
            except UserError as e:
                assert str(path) in str(e)


config_leaf = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(-1, 10, allow_nan=False) | st.text(
    max_size=10) | st.lists(st.text(max_size=5), max_size=3)
sections = st.sampled_from(["teacher", "generate", "filters", "train", "eval", "rounds", "nope"])
keys = st.sampled_from(["model", "backend", "num_instructions", "rouge_threshold", "epochs", "lora_r", "seeds",
                        "rounds", "max_items", "evol", "alpaca", "instruction_sampling", "temperature", "bogus"])


@SETTINGS
@given(doc=st.dictionaries(sections, st.dictionaries(keys, config_leaf | st.dictionaries(keys, config_leaf,
                                                                                           max_size=3), max_size=4)
                           | config_leaf, max_size=4),
       raw=st.text(max_size=60) | hostile, suffix=st.sampled_from([".yaml", ".toml"]), nested=deep)
def test_config_files_load_or_say_where(tmp_path_factory, doc, raw, suffix, nested):
    import yaml

    d = tmp_path_factory.mktemp("cfg")
    deep_doc = f"generate:\n  seeds: {nested}\n" if suffix == ".yaml" else f"[generate]\nseeds = {nested}\n"
    for name, text in (("a.yaml", yaml.safe_dump(doc)), ("b" + suffix, raw.encode("utf-8", "replace").decode()),
                       ("c" + suffix, deep_doc)):
        path = d / name
        path.write_text(text)
        try:
            assert isinstance(load_config(path), Config)
        except UserError as e:
            assert str(path) in str(e)


deep_json_reply = deep.map(lambda d: '{"instructions": ' + d + "}")


@SETTINGS
@given(text=st.text(max_size=400) | hostile | deep | deep_json_reply | st.sampled_from([
    "", "\n\n", "1.", "Example 1\nInput:\nOutput:", "Class label:\n", "###", "1. Instruction:\n1. Input:\n1. Output:",
    "\x00\ufffd", "Sorry", "[[", "Not Equal Equal", "a" * 5000]), truncated=st.booleans(), clf=st.booleans())
def test_teacher_output_parsers_never_raise(text, truncated, clf):
    from selfinstruct.generate.parse import parse_alpaca_json, parse_instructions_json

    for parse in (parse_instructions_json, parse_alpaca_json):  # JSON-mode replies, nesting included
        got, why = parse(text, truncated)
        assert isinstance(got, list) and all(reason for _, reason in why)
    items, dropped = parse_instructions(text, truncated)
    assert all(isinstance(r, str) and r for _, r in dropped)
    cfg = Config().filters
    for item in items:
        ok, reason = check_instruction(item, cfg)
        assert ok or reason
    kept, dropped_instances = clean_instances(parse_instances(text, clf), 5)
    assert all(reason for _, reason in dropped_instances)
    tasks, bad = parse_alpaca(text, 4, truncated)
    assert all(reason for _, reason in bad)
    assert parse_yes_no(text) in (True, False, None)
    assert parse_equal(text) in (True, False, None)
    assert parse_verdict(text) in ("A", "B", "tie", None)
    assert check_evolved_response(text, 80)[0] in (True, False)


class GarbageTeacher(Blocking):
    """A real loop around a teacher that answers whatever hypothesis draws (fault injection), its replies built as
    every backend builds them (with_prefill, which cleans hostile text)."""

    name = "garbage"

    def __init__(self, texts):
        self.texts, self.i = texts, 0

    def generate(self, requests):
        out = []
        for req in requests:
            text, reason = self.texts[self.i % len(self.texts)]
            self.i += 1
            out.append([Completion(with_prefill(req, text, False), reason)])
        return out

    def close(self):
        pass


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.tuples(st.text(max_size=300) | hostile | st.sampled_from(
    ["Write a poem about tea.\n10. Describe the sea at night.", "Example 1\nInput: a\nOutput: b", "Yes", "No",
     "Equal", "Not Equal", "#Rewritten Prompt#: x", "Sorry.", "the of and", "",
     "Write a poem about [/INST] \ud83d.\n10. Describe the sea [bold].", "Example 1\nInput: \ud83d\nOutput: [/]b"]),
    st.sampled_from(["stop", "length"])), min_size=1, max_size=12),
    method=st.sampled_from(["self-instruct", "alpaca", "evol"]))
def test_generation_with_garbage_teacher_counts_every_rejection(tmp_path_factory, texts, method):
    d = tmp_path_factory.mktemp("run")
    rng = random.Random(0)
    seeds = [SeedTask(id=f"s{i}", instruction=" ".join(rng.choices(string.ascii_lowercase, k=6)) + " task",
                      instances=[Instance("", "out")]) for i in range(10)]
    cfg = Config(generate=GenerateConfig(method=method, num_instructions=3, max_stalled_requests=8,
                                         request_batch_size=2, out=str(d),
                                         evol=EvolConfig(rounds=2, batch_size=4)))
    run = Run(dir=d, cfg=cfg, teacher=GarbageTeacher(texts), seeds=seeds)
    from selfinstruct.errors import StalledError

    with contextlib.suppress(StalledError):  # a teacher that never helps ends the run, with its stats
        generate(run)
    stats = json.loads((d / "stats.json").read_text())
    rejected = read_jsonl(d / "rejected.jsonl")
    assert stats["rejected_total"] == len(rejected) and all(r["reason"] for r in rejected)
    assert stats["accepted_records"] == len(read_jsonl(d / "generated.jsonl"))
    if method == "evol":
        e = stats["evol"]
        assert e["attempts"] == 20 and e["accepted"] + e["eliminated"] == 20


def test_template_reaching_python_internals_is_a_user_error(tmp_path):
    from selfinstruct.prompts import Prompts

    (tmp_path / "evil.jinja").write_text("{{ x.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(UserError, match="evil.jinja.*unsafe"):
        Prompts(tmp_path).render("evil.jinja", x="")
    (tmp_path / "evil2.jinja").write_text("{{ cycler.__init__.__globals__.os.system('echo hi') }}")
    with pytest.raises(UserError, match="evil2.jinja"):
        Prompts(tmp_path).render("evil2.jinja")
