"""The `vllm` backend on a real engine (vLLM's CPU build, as CI installs it) and a real instruct model
(SmolLM2-135M-Instruct): chat and completion prompts, n > 1, seeds, stop strings, finish reasons,
structured output, and a LoRA adapter made by `selfinstruct train`. One engine serves the whole module
(starting one is the cost); teachers of the same base model share it, as they do in a run."""

import dataclasses
import json
import os

import pytest

from selfinstruct.config import EngineConfig, Sampling, TeacherConfig
from selfinstruct.generators import Request
from selfinstruct.generators.vllm import _ENGINE, VLLMGenerator, shutdown_engines

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def base_cfg(smollm2_dir):
    return TeacherConfig(backend="vllm", model=str(smollm2_dir), cache=None,
                         engine=EngineConfig(max_model_len=2048, enable_lora=True))


@pytest.fixture(scope="module")
def chat(base_cfg):
    teacher = VLLMGenerator(base_cfg)
    yield teacher
    shutdown_engines()


def test_chat_samples_and_seeds(chat):
    req = Request("Give three tips for staying healthy.", Sampling(temperature=1.0, max_tokens=24, n=2, seed=7))
    first = chat.generate([req])[0]
    assert len(first) == 2 and all(c.text.strip() for c in first)
    assert first[0].text != first[1].text  # n samples of one request differ
    again = chat.generate([req])[0]
    assert [c.text for c in again] == [c.text for c in first]  # same seed, same text
    other = chat.generate([dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, seed=8))])[0]
    assert [c.text for c in other] != [c.text for c in first]
    assert chat.stats["tokens_out"] > 0 and chat.stats["tokens_in"] > 0


def test_cpu_engine_runs_in_this_process(chat):
    """On CPU the engine is this process (generators.vllm.in_process): no EngineCore or worker process."""
    import psutil

    assert not [p.name() for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::")]
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ  # processes started later keep vLLM's default


def test_cpu_worker_thread_warning_is_dropped(chat):
    """In process, vLLM's CPU worker has replaced torch.set_num_threads with a no-op that warns on every call;
    the warning is dropped (generators.vllm.in_process), the no-op stays vLLM's."""
    import logging

    import torch

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # a logger's filters run before its handlers: a dropped record never gets here
    worker_log = logging.getLogger("vllm.v1.worker.cpu_worker")
    worker_log.addHandler(handler)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(before + 1)
    finally:
        worker_log.removeHandler(handler)
    assert torch.get_num_threads() == before  # still vLLM's no-op: this test is about the message only
    assert not seen


def test_greedy_answer_is_sensible(chat):
    out = chat.generate([Request("What is the capital of France? Answer in one word.",
                                 Sampling(temperature=0.0, max_tokens=16))])[0][0]
    assert "paris" in out.text.lower()


def test_completion_prompt_and_stop_string(base_cfg, chat):
    plain = VLLMGenerator(dataclasses.replace(base_cfg, prompt_format="completion"))
    assert plain.llm is chat.llm and not plain.chat  # the same engine serves both formats
    prompt = "Fruits:\n1. Apples\n2. Bananas\n3."
    out = plain.generate([Request(prompt, Sampling(temperature=0.0, max_tokens=64, stop=["\n"]))])[0][0]
    assert out.finish_reason == "stop" and out.text.strip() and "\n" not in out.text
    unstopped = plain.generate([Request(prompt, Sampling(temperature=0.0, max_tokens=64))])[0][0]
    assert unstopped.text.startswith(out.text) and "\n" in unstopped.text  # the stop string cut it there


def test_max_tokens_gives_length(chat):
    before = chat.stats["tokens_out"]
    out = chat.generate([Request("Write a long story about a dragon who learns to cook.",
                                 Sampling(temperature=0.0, max_tokens=5))])[0][0]
    assert out.finish_reason == "length" and chat.stats["tokens_out"] - before == 5
    done = chat.generate([Request("Say only the word yes.", Sampling(temperature=0.0, max_tokens=64))])[0][0]
    assert done.finish_reason == "stop"


def test_structured_output_follows_the_schema(chat):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "capital"], "additionalProperties": False}
    outs = chat.generate([Request(f"Name a European city as JSON. ({i})", Sampling(temperature=1.0, max_tokens=40,
                                                                                  seed=i), json_schema=schema)
                          for i in range(4)])
    for o in outs:
        data = json.loads(o[0].text)
        assert set(data) == {"city", "capital"} and data["city"] in {"Paris", "London", "Rome"}
        assert isinstance(data["capital"], bool)


def test_lora_adapter_from_selfinstruct_train(base_cfg, chat, smollm2_adapter):
    adapter = smollm2_adapter
    student = VLLMGenerator(dataclasses.replace(base_cfg, lora_path=str(adapter)))
    assert student.llm is chat.llm and _ENGINE["lora"]  # no second engine for the student
    assert student.name.startswith(f"{base_cfg.model}+") and student.lora.lora_path == str(adapter)
    req = Request("Name a fruit.", Sampling(temperature=0.0, max_tokens=12, seed=3))
    tuned, base = student.generate([req])[0][0].text, chat.generate([req])[0][0].text
    assert tuned != base
    assert "banana" in tuned.lower()  # what it was trained to say


def test_prefilled_reply_is_continued(chat):
    """The chat model writes examples at once when its reply starts with the format (SmolLM2, unprefilled,
    restates the task first)."""
    from selfinstruct.prompts import render

    prompt = render("self_instruct/instances_input_first.jinja", instruction="Convert the word to upper case.")
    req = Request(prompt, Sampling(temperature=0.0, max_tokens=40), prefill="Example 1\nInput:")
    text = chat.generate([req])[0][0].text
    assert text.startswith("Example 1\nInput:") and "Output:" in text


def test_choice_is_enforced(chat):
    from selfinstruct.prompts import render

    assert chat.enforces_choices
    reqs = [Request(render("self_instruct/is_classification.jinja", instruction=task),
                    Sampling(temperature=0.0, max_tokens=4), choices=("Yes", "No"))
            for task in ("Tell whether the email is spam or not spam.", "Write a poem about a lighthouse.")]
    assert all(o[0].text in ("Yes", "No") for o in chat.generate(reqs))
    equal = chat.generate([Request("Are these the same? 'Name a fruit.' and 'Name a fruit.'",
                                   Sampling(temperature=1.0, max_tokens=6, seed=1), choices=("Equal", "Not Equal"))])
    assert equal[0][0].text in ("Equal", "Not Equal")


@pytest.mark.parametrize("method", ["self-instruct", "alpaca", "evol"])
def test_recipe_reaches_its_target_on_the_engine(chat, smollm2_dir, tmp_path, method):
    """Each recipe on SmolLM2 through the module's engine (a run in this process reuses it): the target is
    reached without a stall and every record passes the filters (conftest.run_recipe_on_smollm2). The
    self-instruct run is also judged (quality.scorers [ifd, judge]): the teacher's own engine answers the audit
    questions as enforced choices, every accepted record carries them, and stats.json holds the audit."""
    from conftest import run_recipe_on_smollm2

    judged = method == "self-instruct"
    records, stats = run_recipe_on_smollm2(smollm2_dir, method, "vllm", tmp_path / "run",
                                           {"quality.scorers": ["ifd", "judge"]} if judged else None)
    assert _ENGINE["llm"] is chat.llm  # no second engine
    if method == "self-instruct":
        assert {r["scores"]["classification_mode"] for r in records} == {"choice"}
        for r in records:
            j = r["scores"]["judge"]
            assert j["mode"] == "choice" and j["unparsed"] == 0 and j["score"] in range(1, 6)
        audit = stats["quality"]["accepted"]["judge"]["audit"]
        assert audit["records"] == len(records) and audit["valid task"]["n"] == len(records)
        assert stats["requests"]["instances"] >= stats["accepted_instructions"]
    if method == "evol":
        assert {r["scores"]["equality_mode"] for r in records} == {"choice"}


def test_json_lists_follow_their_schema(chat, tmp_path):
    """generate.list_format json on the engine: every instruction-list reply is JSON of the schema."""
    from selfinstruct.generate.parse import MAX_INSTRUCTION_CHARS, instructions_schema, parse_instructions_json

    reqs = [Request(f"Come up with a series of tasks:\n1. Name a river.\n2. Add two numbers.\n\nContinue the series "
                    f'with up to 5 new tasks. Answer with a JSON object only: {{"instructions": ["a new task"]}} ({i})',
                    Sampling(temperature=0.7, max_tokens=600, seed=i), json_schema=instructions_schema(5))
            for i in range(3)]
    for o in chat.generate(reqs):
        items, dropped = parse_instructions_json(o[0].text, o[0].finish_reason == "length")
        assert 1 <= len(items) <= 5 and not [r for _, r in dropped if r == "invalid_json"], o[0].text
        assert all(len(i) <= MAX_INSTRUCTION_CHARS for i in items)


def test_judge_verdicts_are_choices(chat, tmp_path):
    from selfinstruct.config import Config, EvalConfig
    from selfinstruct.evaluate import compare

    items = [{"id": f"h{i}", "prompt": q, "reference": "x"} for i, q in
             enumerate(["What is the capital of France?", "Name a primary colour."])]
    w = compare(Config(eval=EvalConfig()), chat, items, ["Paris.", "Red."], ["Bananas.", "Trains."], "vs_base",
                tmp_path / "j.jsonl")
    assert w["unparsed_verdicts"] == 0 and w["verdict_mode"] == "choice" and w["n"] == 2


def test_cpu_lora_ops_compute_what_vllms_compute(chat, monkeypatch):
    """generators.cpu_lora's grouped ops against vLLM's own (a fresh copy of its module: the engine's start put
    ours in place): one adapter, several, the base model's -1, 4-d weights, every op's options."""
    import importlib.util

    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    from selfinstruct.generators import cpu_lora

    assert lora_ops.bgmv_expand is cpu_lora.bgmv_expand  # the module's engine has LoRA: installed at its start
    spec = importlib.util.spec_from_file_location("vllm_lora_ops_original", lora_ops.__file__)
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)
    g = torch.Generator().manual_seed(0)
    for indices in ([0] * 7, [1, 0, 1, 1, -1, 0, 2], [-1] * 7, [2]):
        idx = torch.tensor(indices)
        rows = len(indices)
        x = torch.randn(rows, 24, generator=g)
        for weights in (torch.randn(3, 16, 24, generator=g), torch.randn(3, 1, 16, 24, generator=g)):
            for name, args in (("bgmv_shrink", (0.5,)), ("bgmv_expand", (True,)), ("bgmv_expand", (False,)),
                               ("bgmv_expand_slice", (4, 16, True)), ("bgmv_expand_slice", (4, 16, False))):
                width = 24 if name == "bgmv_expand_slice" else 16
                start = torch.randn(rows if rows > 1 else 3, width, generator=g)
                want, got = start.clone(), start.clone()
                getattr(original, name)(x, weights, want, idx, *args)
                getattr(cpu_lora, name)(x, weights, got, idx, *args)
                torch.testing.assert_close(got, want, msg=f"{name}{args} at {indices}")
    assert cpu_lora.install() == "already"
    monkeypatch.setattr(lora_ops, "bgmv_expand", lambda inputs, weights: None)  # a vLLM whose op changed
    assert cpu_lora.install().startswith("not installed: vLLM's bgmv_expand is not")
