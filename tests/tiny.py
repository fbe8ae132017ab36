"""Tiny models built at test time: a BPE tokenizer trained here, random-init Llama configs, and a
teacher fine-tuned for a few seconds on well-formed answers to our real prompt templates (so what
it generates in the tests is real model output, not canned strings)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from selfinstruct.evaluate import T_JUDGE
from selfinstruct.generate.evol import T_EQUAL, T_OPS, T_RESPONSE
from selfinstruct.generate.self_instruct import T_CLASSIFY, T_INPUT_FIRST, T_INSTRUCTIONS, T_OUTPUT_FIRST
from selfinstruct.prompts import Prompts
from selfinstruct.seeds import load_tasks

ROOT = Path(__file__).resolve().parent.parent
# The tiny teachers learn the prompts of tests/data/prompts (short instance and Alpaca prompts: they train in seconds),
# and the tests that use them run with generate.prompts_dir set to it; every other prompt is ours.
TEST_PROMPTS = ROOT / "tests" / "data" / "prompts"
render = Prompts(TEST_PROMPTS).render

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>",
           "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "[INST]", "[/INST]"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

VERBS = ["Write", "Describe", "Explain", "Compose", "Suggest", "Create", "Draft", "Outline"]
ADJS = ["short", "funny", "detailed", "simple", "formal", "friendly", "clear", "creative", "brief", "vivid"]
NOUNS = ["poem", "story", "email", "letter", "summary", "guide", "speech", "review", "plan", "song"]
TOPICS = ["the ocean", "a rainy day", "city life", "a mountain trip", "healthy food", "old friends",
          "a lost dog", "winter mornings", "space travel", "a busy market", "a small garden",
          "learning music", "a new job", "the first snow", "a quiet library", "a long train ride",
          "a summer festival", "a broken clock", "the night sky", "a family dinner"]


def synthetic_task(rng: random.Random) -> tuple[str, str, str]:
    """(instruction, input, output) from a small grammar: varied enough to pass ROUGE dedup."""
    v, a, n, t = rng.choice(VERBS), rng.choice(ADJS), rng.choice(NOUNS), rng.choice(TOPICS)
    output = f"Here is a {a} {n} about {t}. It talks about {rng.choice(TOPICS)} and {rng.choice(TOPICS)}."
    return f"{v} a {a} {n} about {t}.", rng.choice(TOPICS), output


def corpus() -> list[str]:
    rng = random.Random(0)
    texts = []
    for task in load_tasks(ROOT / "seeds") + load_tasks(ROOT / "heldout"):
        texts.append(task.instruction)
        texts += [i.input + "\n" + i.output for i in task.instances]
    texts += [" ".join(synthetic_task(rng)) for _ in range(500)]
    for name in (T_INSTRUCTIONS, T_CLASSIFY, T_INPUT_FIRST, T_OUTPUT_FIRST, *T_OPS.values(), T_EQUAL, T_JUDGE):
        texts.append((ROOT / "prompts" / name).read_text())
    return texts


def build_tokenizer(vocab_size: int = 1200) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<s>")
    fast.chat_template = CHATML
    return fast


def build_model(tok: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, path: Path) -> Path:
    # As many chat models ship: `transformers serve` samples only when the model's generation config says so and
    # otherwise decodes greedily whatever temperature a request sends (transformers 5.19); greedy, the tiny
    # Self-Instruct teacher wrote "Create a simple plan about a busy market." 300 times in one served run.
    model.generation_config.do_sample = True
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def teacher_examples(n_each: int = 120, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, ideal answer) pairs for the four Self-Instruct prompts."""
    rng = random.Random(seed)
    seeds = load_tasks(ROOT / "seeds")
    out = []
    for _ in range(n_each):
        demos = [s.instruction for s in rng.sample(seeds, 8)]
        new = [synthetic_task(rng)[0] for _ in range(3)]
        answer = f"9. {new[0]}\n10. {new[1]}\n11. {new[2]}"  # a chat reply starts with the item number (prefill)
        out.append((render(T_INSTRUCTIONS, instructions=demos), answer))
        task = rng.choice(seeds)
        out.append((render(T_CLASSIFY, instruction=task.instruction), "Yes" if task.is_classification else "No"))
        instr, inp, outp = synthetic_task(rng)
        out.append((render(T_CLASSIFY, instruction=instr), "No"))
        instr2, inp2, outp2 = synthetic_task(rng)
        answer = f"Example 1\nInput: {inp}\nOutput: {outp}\nExample 2\nInput: {inp2}\nOutput: {outp2}"
        out.append((render(T_INPUT_FIRST, instruction=instr), answer))
        clf = [s for s in seeds if s.is_classification]
        c = rng.choice(clf)
        answer = "\n".join(f"Class label: {i.output}\nInput: {i.input}" for i in c.instances)
        out.append((render(T_OUTPUT_FIRST, instruction=c.instruction), answer))
    return out


def alpaca_examples(n: int = 160, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, ideal answer) pairs for the tests' Alpaca prompt: the list continued from item 4."""
    rng = random.Random(seed)
    seeds = load_tasks(ROOT / "seeds")
    out = []
    for _ in range(n):
        demos = [{"instruction": t.instruction, "input": t.instances[0].input or "<noinput>",
                  "output": t.instances[0].output} for t in rng.sample(seeds, 3)]
        items = []
        for j, (instruction, inp, output) in enumerate(synthetic_task(rng) for _ in range(3)):
            head = f"{j + 4}. Instruction: "  # the first one's head is the reply's prefilled start
            items.append(f"{head}{instruction}\n{j + 4}. Input:\n{inp if j % 2 else '<noinput>'}\n"
                         f"{j + 4}. Output:\n{output}")
        out.append((render("alpaca/prompt.jinja", num_tasks=20, demos=demos), "\n###\n".join(items)))
    return out


CONSTRAINTS = ["Use at least three sentences.", "Keep it under fifty words.", "Mention two colours.",
               "Explain each step first.", "End with a question.", "Include one number."]


def evol_examples(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, ideal answer) pairs for the Evol-Instruct prompts, with a share of the failures the
    elimination rules exist for: prompt labels copied into the rewrite, "Equal" judgements,
    apologies and stop-word-only responses."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parent = synthetic_task(rng)[0]
        if rng.random() < 0.5:
            parent += " " + rng.choice(CONSTRAINTS)
        op = rng.choice(list(T_OPS))
        new, _, answer = synthetic_task(rng)
        evolved = f"{new} {rng.choice(CONSTRAINTS)}" if op != "breadth" else new
        if rng.random() < 0.1:
            evolved = f"{evolved} That is the rewritten prompt."  # copies the prompt's words: rule 4
        out.append((render(T_OPS[op], instruction=parent), evolved))
        out.append((render(T_EQUAL, first=parent, second=evolved), "Equal" if rng.random() < 0.2 else "Not Equal"))
        u = rng.random()
        reply = "Sorry, I cannot do that." if u < 0.1 else "The, and of the." if u < 0.2 else answer
        out.append((render(T_RESPONSE, instruction=evolved), reply))
    return out


def judge_examples(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, verdict) pairs for the pairwise judge prompt: the longer response wins (a tie when
    equally long), so the tiny judge's verdicts are parseable and depend on the responses."""
    rng = random.Random(seed)
    heldout = load_tasks(ROOT / "heldout")
    out = []
    for _ in range(n):
        task = rng.choice(heldout)
        a, b = (synthetic_task(rng)[2][: rng.randrange(5, 60)] for _ in range(2))
        if rng.random() < 0.1:
            b = a
        verdict = "[[C]]" if len(a) == len(b) else "[[A]]" if len(a) > len(b) else "[[B]]"
        out.append((render(T_JUDGE, instruction=task.instruction, answer_a=a, answer_b=b), verdict))
    return out


def finetune(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, pairs: list[tuple[str, str]],
             steps: int = 300, batch: int = 16, lr: float = 3e-3, seed: int = 0) -> float:
    """Full fine-tuning on chat-formatted (prompt, answer) pairs, loss on the answer; returns last loss."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    rows = []
    for prompt, answer in pairs:
        p = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        chunk = rng.sample(rows, batch)
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in chunk])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        # No attention mask: the padding is on the right and attention is causal, so no real token sees a pad
        # and pads carry no loss. The same loss and gradients (to 1e-7) in 0.73x the time: without a mask
        # the CPU's fused attention takes its causal path instead of the masked one.
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())
