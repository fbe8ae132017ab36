"""Training throughput: `selfinstruct train` vs a plain TRL SFTTrainer with its default settings.

    python bench/train.py [--alpaca ../shared/data/alpaca_data.json] [--rows 1000]

Both train the same LoRA (r=16, all linear layers) on the same length-skewed data (Alpaca records of
10-500 tokens), with the same learning rate, batch size, epochs, max_length and seed, on a small
random-init Llama-style model (4 layers x 256, CPU; on a GPU also a 0.5B-class model in bf16).
Everything else is each side's default: ours groups examples by length (on CPU; packs on GPU with
flash-attention), TRL samples at random and uses gradient checkpointing. Prints trained (response)
tokens per second for both, the ratio (goal >= 1.5x), the padding share of the batches, and the
eval loss of both adapters, computed the same way on the same held-out rows (goal: within 2%).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DEFAULT_ALPACA = ROOT.parent / "shared" / "data" / "alpaca_data.json"


def build_student(texts: list[str], path: Path, size: str) -> Path:
    from tiny import CHATML, SPECIAL
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    shape = {"small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4),
             "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2)}[size]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), max_position_embeddings=2048,
                                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, **shape))
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def skewed_rows(path: Path, n: int, tok, seed: int = 0) -> list[dict]:
    from selfinstruct.records import user_turn

    rows = json.loads(path.read_text())
    random.Random(seed).shuffle(rows)
    out = []
    for r in rows:
        conv = [{"role": "user", "content": user_turn(r["instruction"], r["input"])},
                {"role": "assistant", "content": r["output"]}]
        length = len(tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"])
        if 10 <= length <= 500:
            out.append({"messages": conv})
        if len(out) == n:
            return out
    return out


def eval_loss(student: Path, adapter: Path, convs: list[list[dict]], tok) -> float:
    """Mean loss on trained tokens, our masking, for any adapter: the same yardstick for both sides."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from selfinstruct.masking import IGNORE, tokenize_conversation

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), str(adapter)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for conv in convs:
            row = tokenize_conversation(tok, conv, 512)
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != IGNORE).sum())
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item()
            total, count = total + loss * n, count + n
    return total / count


def plain_trl(student: Path, rows: list[dict], out: Path, args: argparse.Namespace, lora) -> tuple[float, float]:
    from trl import SFTConfig, SFTTrainer

    data = __import__("datasets").Dataset.from_list(
        [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])
    cfg = SFTConfig(output_dir=str(out), num_train_epochs=1, learning_rate=args.lr, per_device_train_batch_size=8,
                    max_length=512, seed=0, use_cpu=not torch.cuda.is_available(), report_to="none",
                    save_strategy="no", bf16=torch.cuda.is_available())
    trainer = SFTTrainer(model=str(student), args=cfg, train_dataset=data, peft_config=lora)
    real = sum(len(x) for x in trainer.train_dataset["input_ids"])
    slots = sum(b["input_ids"].numel() for b in trainer.get_train_dataloader())
    start = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - start
    trainer.model.save_pretrained(str(out / "adapter"))
    return secs, 1 - real / slots


def run(size: str, args: argparse.Namespace, work: Path) -> None:
    from transformers import AutoTokenizer

    from selfinstruct.config import Config
    from selfinstruct.train import lora_config, run_train

    texts = [r["instruction"] + " " + r["output"] for r in json.loads(args.alpaca.read_text())[:20000]]
    student = build_student(texts, work / f"student-{size}", size)
    tok = AutoTokenizer.from_pretrained(student)
    rows = skewed_rows(args.alpaca, args.rows + args.eval_rows, tok)
    train_rows, eval_rows = rows[: args.rows], rows[args.rows:]
    data = work / f"train-{size}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    cfg = Config()
    cfg.train.data, cfg.train.student, cfg.train.out = str(data), str(student), str(work / f"ours-{size}")
    cfg.train.epochs, cfg.train.batch_size, cfg.train.learning_rate = 1.0, 8, args.lr
    cfg.train.max_length, cfg.train.logging_steps, cfg.train.save_steps = 512, 50, 10**6
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = run_train(cfg)
    ours = json.loads((out / "metrics.json").read_text())
    ours_mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trl_secs, trl_waste = plain_trl(student, train_rows, work / f"trl-{size}", args, lora_config(cfg.train))
    trl_mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    tokens = ours["trained_tokens_per_epoch"]
    l_ours = eval_loss(student, out / "adapter", [r["messages"] for r in eval_rows], tok)
    l_trl = eval_loss(student, work / f"trl-{size}" / "adapter", [r["messages"] for r in eval_rows], tok)
    print(f"[{size}] {len(train_rows)} rows, {tokens:,} trained tokens, one epoch, device "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"  plain TRL:         {trl_secs:7.1f} s  {tokens / trl_secs:8,.0f} trained tok/s  padding "
          f"{100 * trl_waste:4.1f}%  eval loss {l_trl:.4f}" + (f"  peak GPU {trl_mem:.1f} GiB" if trl_mem else ""))
    print(f"  selfinstruct train: {ours['train_seconds']:6.1f} s  {tokens / ours['train_seconds']:8,.0f} trained "
          f"tok/s  padding {100 * ours['padding_fraction']:4.1f}%  eval loss {l_ours:.4f}"
          + (f"  peak GPU {ours_mem:.1f} GiB" if ours_mem else ""))
    print(f"  ratio {trl_secs / ours['train_seconds']:.2f}x (goal >= 1.5x); eval loss differs by "
          f"{100 * abs(l_ours - l_trl) / l_trl:.1f}% (goal <= 2%)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpaca", type=Path, default=DEFAULT_ALPACA)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--eval-rows", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-4)
    args = ap.parse_args()
    if not args.alpaca.exists():
        sys.exit(f"{args.alpaca} not found: pass --alpaca PATH to alpaca_data.json")
    with tempfile.TemporaryDirectory() as tmp:
        run("small", args, Path(tmp))
        if torch.cuda.is_available():
            run("0.5b", args, Path(tmp))


if __name__ == "__main__":
    main()
