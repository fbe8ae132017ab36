import copy
import json
from pathlib import Path

import pytest
import torch
import trl
from conftest import cli
from safetensors.torch import load_file

from selfinstruct.config import Config
from selfinstruct.errors import UserError
from selfinstruct.masking import IGNORE, build_dataset, prepare_tokenizer, tokenize_conversation
from selfinstruct.train import run_train

TEMPLATES = Path(trl.__file__).parent / "chat_templates"
CONV = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris is the capital."}]
MULTI = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
# template -> (file, eos token, end-of-turn token, trained after each reply, trained after the last one)
FAMILIES = {
    "chatml": (None, "<|im_end|>", "<|im_end|>", "<|im_end|>\n", ""),
    "qwen2_5": ("qwen2_5.jinja", "<|im_end|>", "<|im_end|>", "<|im_end|>\n", ""),
    "llama3": ("llama3.jinja", "<|eot_id|>", "<|eot_id|>", "<|eot_id|>", ""),
    "gemma": ("gemma.jinja", "<eos>", "<end_of_turn>", "<end_of_turn>\n", ""),
    # Phi-3 closes a turn with <|end|> and the whole conversation with the EOS
    "phi3": ("phi3.jinja", "<|endoftext|>", "<|end|>", "<|end|>\n", "<|endoftext|>"),
    "mistral": ("mistral", "</s>", "</s>", "</s>", ""),
}
# TRL ships no Mistral template; this is Mistral-7B-Instruct-v0.1's, the [INST] family.
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


def family_tokenizer(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    file, eos, _, _, _ = FAMILIES[name]
    if file == "mistral":
        tok.chat_template = MISTRAL
    elif file:
        tok.chat_template = (TEMPLATES / file).read_text()
    tok.eos_token = eos
    tok.bos_token = {"llama3": "<|begin_of_text|>", "gemma": "<bos>", "mistral": "<s>"}.get(name, tok.bos_token)
    return tok


def trained_text(tok, row):
    return tok.decode([i for i, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_single_turn(tokenizer, family):
    tok = family_tokenizer(tokenizer, family)
    row = tokenize_conversation(tok, CONV)
    _, _, eot, after, last = FAMILIES[family]
    assert trained_text(tok, row) == "Paris is the capital." + after + last
    assert tok.convert_tokens_to_ids(eot) in [lab for lab in row["labels"] if lab != IGNORE]
    first = next(i for i, lab in enumerate(row["labels"]) if lab != IGNORE)
    assert tok.decode(row["input_ids"][:first]).endswith(tok.apply_chat_template(
        CONV[:1], tokenize=False, add_generation_prompt=True)[-8:])  # everything before is the prompt
    assert all(lab == IGNORE for lab in row["labels"][:first])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_multi_turn_train_only_assistant_turns(tokenizer, family):
    tok = family_tokenizer(tokenizer, family)
    row = tokenize_conversation(tok, MULTI)
    _, _, _, after, last = FAMILIES[family]
    assert trained_text(tok, row) == "Hello! How can I help?" + after + "Blue." + after + last
    assert "Name a colour" not in trained_text(tok, row)


def test_default_template_for_students_without_one(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    tok.eos_token = "</s>"
    prepare_tokenizer(tok, None)
    row = tokenize_conversation(tok, CONV)
    assert trained_text(tok, row) == "Paris is the capital.</s>"
    assert "### Instruction:\nCapital of France?\n\n### Response:\n" in tok.decode(row["input_ids"])


def test_template_that_hides_the_reply_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(UserError, match="cannot be located"):
        tokenize_conversation(tok, CONV)


def test_nothing_to_train_within_max_length(tokenizer):
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    ds, dropped = build_dataset(tokenizer, [long, CONV], max_length=64)
    assert dropped == 1 and len(ds) == 1
    assert build_dataset(tokenizer, [long], max_length=64) == (None, 1)


def test_train_writes_an_adapter_that_changed(random_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"}
                                for i in range(24)]))
    cfg = Config()
    cfg.train.data, cfg.train.student, cfg.train.out = str(data), str(random_model_dir), str(tmp_path / "t")
    cfg.train.epochs, cfg.train.batch_size, cfg.train.logging_steps = 1, 8, 1
    out = run_train(cfg)
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(torch.count_nonzero(w) for w in lora_b)  # B starts at zero; training moved it
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["train_examples"] == 24
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(random_model_dir), out / "adapter")
    assert model.peft_config["default"].r == 16


def test_preview_json(random_model_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CONV}) + "\n")
    r = cli("train", "--data", data, "--student", random_model_dir, "--preview", "1", "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    trained = "".join(t["token"] for t in shown[0] if t["trained"])
    assert trained == "Paris is the capital.<|im_end|>\n"
    assert not (tmp_path / "train").exists()


def small_cfg(data, student, out, **train):
    cfg = Config()
    cfg.train.data, cfg.train.student, cfg.train.out = str(data), str(student), str(out)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.logging_steps = 1, 4, 1
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def alpaca_file(path, n, prefix="Say the number"):
    path.write_text(json.dumps([{"instruction": f"{prefix} {i}.", "input": "", "output": f"{i}"} for i in range(n)]))
    return path


def test_lora_options_mixing_packing_and_loss_plot(random_model_dir, tmp_path):
    data = alpaca_file(tmp_path / "a.json", 16)
    general = alpaca_file(tmp_path / "general.json", 40, prefix="Repeat the word")
    cfg = small_cfg(data, random_model_dir, tmp_path / "t", use_rslora=True, use_dora=True, mix_data=[str(general)],
                    mix_fraction=0.5, packing="on", max_length=64, neftune_noise_alpha=5.0)
    out = run_train(cfg)
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["use_rslora"] and adapter_cfg["use_dora"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mixed_in"] == {"sources": [str(general)], "fraction": 0.5, "examples": 8}
    assert metrics["train_examples"] == 24 and metrics["packing"] == "mask"
    assert metrics["global_step"] < 24 / 4  # packed rows hold several examples each
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


class StopAt:
    """Fault injection around the real trainer: stop as if interrupted after `step` steps."""

    def __init__(self, step):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= step:
                    control.should_training_stop = True

        self.callback = _Stop()


class StepCounter:
    """Instrumentation around the real trainer: the global step after every optimizer step this process ran."""

    def __init__(self):
        from transformers import TrainerCallback

        seen = self.seen = []

        class _Count(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                seen.append(state.global_step)

        self.callback = _Count()


def test_resume_reaches_the_same_final_step(random_model_dir, tmp_path):
    data = alpaca_file(tmp_path / "a.json", 32)
    full = run_train(small_cfg(data, random_model_dir, tmp_path / "full", epochs=2, save_steps=3))
    total = json.loads((full / "metrics.json").read_text())["global_step"]
    assert total == 16
    out = tmp_path / "interrupted"
    run_train(small_cfg(data, random_model_dir, out, epochs=2, save_steps=3), callbacks=[StopAt(6).callback])
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 6
    assert (out / "checkpoints" / "checkpoint-6").exists()
    steps = StepCounter()
    resumed = run_train(small_cfg(data, random_model_dir, out, epochs=2, save_steps=3, resume=True),
                        callbacks=[steps.callback])
    assert json.loads((resumed / "metrics.json").read_text())["global_step"] == total
    # It started at the checkpoint: this process ran only the 10 remaining optimizer steps, the first being 7.
    assert steps.seen == list(range(7, total + 1))
    fresh = StepCounter()
    run_train(small_cfg(data, random_model_dir, tmp_path / "again", epochs=2, save_steps=3, resume=True),
              callbacks=[fresh.callback])
    assert fresh.seen == list(range(1, total + 1))  # no checkpoint there: --resume starts from step 1


def test_resume_takes_only_its_own_checkpoints_and_the_adapter_is_swapped_whole(random_model_dir, tmp_path,
                                                                                 monkeypatch):
    """Checkpoints of another training (other data) in the same --out are refused on --resume (exit 2, nothing
    written); a fresh start does not replace an adapter, and clears old checkpoints. A save that fails half-way
    leaves the earlier adapter whole."""
    from selfinstruct.errors import UserError

    a, b = alpaca_file(tmp_path / "a.json", 16), alpaca_file(tmp_path / "b.json", 16, prefix="Spell the number")
    out = tmp_path / "t"
    run_train(small_cfg(a, random_model_dir, out, save_steps=2), callbacks=[StopAt(2).callback])
    assert (out / "checkpoints" / "checkpoint-2").exists()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="other data or settings"):
        run_train(small_cfg(b, random_model_dir, out, save_steps=2, resume=True))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(UserError, match="an adapter is already there"):  # a fresh start never replaces one unasked
        run_train(small_cfg(b, random_model_dir, out, save_steps=2))
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    def broken_save(self, *a, **k):  # fault injection: the tokenizer's save fails after the weights were written
        raise OSError(28, "No space left on device (injected)")

    import transformers

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", broken_save)
    with pytest.raises(OSError):
        run_train(small_cfg(a, random_model_dir, out, save_steps=2, resume=True))  # its own checkpoints: resumed
    monkeypatch.undo()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter  # the old adapter, whole
    assert not (out / "adapter.tmp").exists() or not (out / "adapter.tmp" / "tokenizer_config.json").exists()
    run_train(small_cfg(a, random_model_dir, out, save_steps=2, resume=True))
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != adapter
    # A training cut short before its adapter was saved: a fresh start clears the old checkpoints.
    import shutil

    shutil.rmtree(out / "adapter")
    run_train(small_cfg(b, random_model_dir, out, save_steps=2), callbacks=[StopAt(2).callback])
    shutil.rmtree(out / "adapter")
    run_train(small_cfg(b, random_model_dir, out, save_steps=2, resume=True))  # b's checkpoints now: accepted


def test_merge_gives_the_adapter_model(random_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run_train(small_cfg(alpaca_file(tmp_path / "a.json", 8), random_model_dir, tmp_path / "t", epochs=3,
                              learning_rate=5e-3))
    r = cli("merge", out / "adapter", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(random_model_dir), out / "adapter").eval()
    ids = torch.tensor([[5, 17, 33, 90, 2]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(random_model_dir)(ids).logits
        assert not torch.allclose(merged(ids).logits, base, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()
    r = cli("merge", tmp_path, "--out", tmp_path / "m2")
    assert r.returncode == 2 and "not a LoRA adapter directory" in r.stderr


TRACED = """
import os, sys
from selfinstruct import records, train
from peft import PeftModel

def traced(fn):
    def wrapper(*args, **kw):
        target = args[1] if fn.__name__ == "save_pretrained" else args[0]
        with open({log!r}, "a") as fh:
            fh.write(os.environ.get("RANK", "0") + " " + str(target) + "\\n")
        return fn(*args, **kw)
    wrapper.__name__ = fn.__name__
    return wrapper

records.write_atomic = train.write_atomic = traced(records.write_atomic)
PeftModel.save_pretrained = traced(PeftModel.save_pretrained)
from selfinstruct.cli import main
sys.exit(main())
"""


def test_torchrun_two_processes_write_one_adapter(random_model_dir, tmp_path):
    import subprocess
    import sys

    data = alpaca_file(tmp_path / "a.json", 16)
    log = tmp_path / "writes.log"
    # Instrumentation around the real command: every file write of ours (and every save_pretrained) is
    # logged with the rank that made it, so a second writer would show up.
    (tmp_path / "traced.py").write_text(TRACED.format(log=str(log)))
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port", str(__import__("serve").free_port()),
                        str(tmp_path / "traced.py"), "train", "--data", str(data), "--student", str(random_model_dir),
                        "--out", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    writes = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert {rank for rank, _ in writes} == {"0"}, writes  # rank 1 wrote nothing
    written = {Path(path).name for _, path in writes}
    assert {"metrics.json", "config.yaml", "adapter.tmp"} <= written  # the adapter is written beside, then moved
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").exists()


def test_qlora_without_cuda_is_refused_clearly(random_model_dir, tmp_path):
    """Runs on any machine: the CLI is started with no GPU visible."""
    data = alpaca_file(tmp_path / "a.json", 4)
    cfg = tmp_path / "q.yaml"
    cfg.write_text("train:\n  qlora: true\n")
    r = cli("train", "--data", data, "--student", random_model_dir, "--out", tmp_path / "t", "--config", cfg,
            env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "train.qlora needs a CUDA GPU and bitsandbytes" in r.stderr
    assert not (tmp_path / "t").exists()


def test_init_adapter_continues_training(random_model_dir, tmp_path):
    """rounds.train_from: previous -- the second run starts from the first run's adapter weights."""
    data = alpaca_file(tmp_path / "a.json", 16)
    first = run_train(small_cfg(data, random_model_dir, tmp_path / "first", epochs=2, learning_rate=1e-2))
    cont = run_train(small_cfg(data, random_model_dir, tmp_path / "cont", epochs=1, learning_rate=1e-2,
                               init_adapter=str(first / "adapter"), lora_r=4))  # r comes from the adapter
    fresh = run_train(small_cfg(data, random_model_dir, tmp_path / "fresh", epochs=1, learning_rate=1e-2))
    loss = {k: json.loads((d / "metrics.json").read_text())["log_history"][0]["loss"]
            for k, d in (("cont", cont), ("fresh", fresh), ("first", first))}
    assert loss["cont"] < loss["fresh"] == pytest.approx(loss["first"])  # it starts where the first run ended
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(cont / "adapter").r == 16
    with pytest.raises(UserError, match="not a LoRA adapter"):
        run_train(small_cfg(data, random_model_dir, tmp_path / "bad", init_adapter=str(tmp_path)))


def test_train_merge_option_writes_the_merged_model(random_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run_train(small_cfg(alpaca_file(tmp_path / "a.json", 8), random_model_dir, tmp_path / "t", epochs=2,
                              learning_rate=5e-3, merge=True))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(random_model_dir), out / "adapter").eval()
    ids = torch.tensor([[5, 17, 33, 90, 2]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())  # a plain model, servable without LoRA support
