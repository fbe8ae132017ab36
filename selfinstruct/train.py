"""LoRA supervised fine-tuning of the student with TRL + PEFT, loss on assistant tokens only.

    out = run_train(cfg)     # selfinstruct train --data outputs/<run> --student Qwen/Qwen2.5-0.5B

Which tokens are trained (assistant replies only) is masking.py's job; this module loads the data and the
student, runs TRL's SFTTrainer and writes the adapter and metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from rich.console import Console

from selfinstruct.config import Config, TrainConfig
from selfinstruct.configfile import dump_yaml
from selfinstruct.dataset import Conversation, load_training_data
from selfinstruct.errors import UserError
from selfinstruct.masking import build_dataset, prepare_tokenizer
from selfinstruct.packing import IGNORE, PackedCollator, pack
from selfinstruct.records import write_atomic, write_json
from selfinstruct.rundir import Ownership, check

console = Console(stderr=True, soft_wrap=True)


def default_out(data: str) -> Path:
    p = Path(data)
    if p.is_dir():
        return p / "train"
    return Path("outputs") / f"{time.strftime('%Y%m%d-%H%M%S')}-train"


def mix_in(train: list[Conversation], tcfg: TrainConfig) -> tuple[list[Conversation], dict[str, Any]]:
    """Add round(mix_fraction * len(train)) conversations drawn (seeded) from the mix sources."""
    if not tcfg.mix_data or not tcfg.mix_fraction:
        return train, {}
    pool = [c for path in tcfg.mix_data for c in load_training_data(path)[0]]
    k = min(len(pool), round(tcfg.mix_fraction * len(train)))
    drawn = random.Random(tcfg.seed).sample(pool, k)
    return train + drawn, {"sources": tcfg.mix_data, "fraction": tcfg.mix_fraction, "examples": k}


def packing_mode(tcfg: TrainConfig, cuda: bool) -> str:
    """'trl' (TRL's bfd packing on flash-attention), 'mask' (ours, 4D masks on sdpa) or 'off'."""
    from transformers.utils import is_flash_attn_2_available

    if tcfg.packing == "off":
        return "off"
    if cuda and is_flash_attn_2_available():
        return "trl"
    return "mask" if tcfg.packing == "on" else "off"


def lora_config(tcfg: TrainConfig) -> Any:
    from peft import LoraConfig

    if tcfg.use_dora:
        console.print("[yellow]DoRA adapters cannot be served by vLLM: merge them first (train.merge).[/]")
    targets = "all-linear" if tcfg.target_modules == ["all-linear"] else tcfg.target_modules
    return LoraConfig(r=tcfg.lora_r, lora_alpha=tcfg.lora_alpha, lora_dropout=tcfg.lora_dropout,
                      target_modules=targets, use_rslora=tcfg.use_rslora, use_dora=tcfg.use_dora,
                      bias="none", task_type="CAUSAL_LM")


def load_student(cfg: Config, packing: str) -> tuple[Any, Any]:
    import torch

    from selfinstruct.modeling import load_model_and_tokenizer

    tcfg = cfg.train
    kwargs: dict[str, Any] = {}
    if packing == "trl":
        kwargs["attn_implementation"] = "flash_attention_2"
    elif packing == "mask":
        kwargs["attn_implementation"] = "sdpa"  # honours the 4D block-diagonal masks exactly
    if tcfg.qlora:
        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("train.qlora needs a CUDA GPU and bitsandbytes (pip install bitsandbytes)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model, tok = load_model_and_tokenizer(tcfg.student, "auto", "auto", cfg.teacher.trust_remote_code,
                                          "student", **kwargs)
    if tcfg.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    if tcfg.init_adapter:  # continue an earlier adapter (its own LoRA settings) rather than a fresh one
        from peft import PeftModel

        if not (Path(tcfg.init_adapter) / "adapter_config.json").exists():
            raise UserError("train.init_adapter is not a LoRA adapter directory", tcfg.init_adapter)
        model = PeftModel.from_pretrained(model, tcfg.init_adapter, is_trainable=True)
    return model, tok


def last_complete_checkpoint(d: Path) -> Path | None:
    """The newest Trainer checkpoint that was fully written (a process killed while saving leaves one
    without trainer_state.json, which the Trainer writes last); None when there is none."""
    steps = []
    for c in d.glob("checkpoint-*"):
        if c.name.removeprefix("checkpoint-").isdigit() and (c / "trainer_state.json").exists():
            try:  # killed while writing it: cut short
                json.loads((c / "trainer_state.json").read_text(encoding="utf-8"))
            except (ValueError, OSError):
                continue
            steps.append((int(c.name.removeprefix("checkpoint-")), c))
    return max(steps)[1] if steps else None


def padding_fraction(trainer: Any, train_ds: datasets.Dataset) -> float:
    """Share of the token slots in one epoch's batches (as the trainer's own dataloader forms them) that
    hold padding rather than data."""
    real = sum(len(ids) for ids in train_ds["input_ids"])
    slots = sum(batch["input_ids"].numel() for batch in trainer.get_train_dataloader())
    return round(1 - real / slots, 4) if slots else 0.0


@dataclass
class TrainJob:
    """What a training run needs once its inputs are checked and its model is loaded."""

    cfg: Config
    out: Path
    train_convs: list[Conversation]
    eval_convs: list[Conversation]
    mix: dict[str, Any]
    packing: str = "off"
    model: Any = None
    tok: Any = None
    train_ds: Any = None
    eval_ds: Any = None
    dropped: int = 0
    trained_tokens: int = 0
    collator: Any = None
    owner: Ownership | None = None  # the output directory's marker and lock (rundir.py), taken on rank 0


def check_train(cfg: Config) -> TrainJob:
    """The data (read, mixed) and the output directory, checked before any model loads."""
    tcfg = cfg.train
    if tcfg.data is None:
        raise UserError("train needs --data (a generate run directory or a data file)")
    train_convs, eval_convs = load_training_data(tcfg.data)
    train_convs, mix = mix_in(train_convs, tcfg)
    out = Path(tcfg.out) if tcfg.out else default_out(tcfg.data)
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 owns the directory; the others would race its claim
        check(out, "train")  # a user's own directory is never written into
    if (out / "adapter").exists() and not tcfg.resume:
        raise UserError("an adapter is already there: pass --resume or another --out", out)
    return TrainJob(cfg=cfg, out=out, train_convs=train_convs, eval_convs=eval_convs, mix=mix,
                    owner=Ownership(out, "train"))


def prepare_train(job: TrainJob) -> None:
    """Load the student, tokenise (and pack) the data; then, on rank 0, make the output directory."""
    import torch

    tcfg = job.cfg.train
    job.packing = packing_mode(tcfg, torch.cuda.is_available())
    job.model, job.tok = load_student(job.cfg, job.packing)
    prepare_tokenizer(job.tok, tcfg.chat_template)
    job.train_ds, job.dropped = build_dataset(job.tok, job.train_convs, tcfg.max_length)
    if job.train_ds is None:
        raise UserError(f"no training example has a trained token within max_length={tcfg.max_length} "
                        "(empty replies, or prompts longer than max_length)", tcfg.data)
    job.eval_ds = build_dataset(job.tok, job.eval_convs, tcfg.max_length)[0] if job.eval_convs else None
    job.trained_tokens = sum(sum(label != IGNORE for label in r) for r in job.train_ds["labels"])
    if job.packing == "mask":
        job.train_ds = datasets.Dataset.from_list(pack(list(job.train_ds), tcfg.max_length))
        job.collator = PackedCollator(job.tok.pad_token_id)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        job.owner.take()  # the marker, and the lock for the rest of the run (one process at a time)
    own_checkpoints(job, write=rank0)  # every rank checks (a refusal must stop them all); rank 0 writes
    if rank0:  # only now, with data and model known usable, is anything written
        resolved = dataclasses.replace(job.cfg, train=dataclasses.replace(tcfg, out=str(job.out)))
        write_atomic(job.out / "config.yaml", dump_yaml(resolved))


def fingerprint(job: TrainJob) -> str:
    """What a checkpoint must come from to be resumed: the training data (after mixing) and every setting that
    shapes the optimisation (train.out, resume, logging and saving aside)."""
    tcfg = dataclasses.asdict(job.cfg.train)
    for k in ("out", "resume", "data", "logging_steps", "save_steps", "merge"):
        tcfg.pop(k)
    blob = json.dumps({"train": job.train_convs, "eval": job.eval_convs, "config": tcfg}, sort_keys=True,
                      ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def own_checkpoints(job: TrainJob, write: bool) -> None:
    """--resume continues only checkpoints of this very training (fingerprint.json); a fresh start clears any
    left by an earlier one, so a later --resume cannot pick them up."""
    path, ckpt = job.out / "fingerprint.json", job.out / "checkpoints"
    mine = fingerprint(job)
    if job.cfg.train.resume and last_complete_checkpoint(ckpt) is not None:
        theirs = json.loads(path.read_text()).get("fingerprint") if path.exists() else None
        if theirs != mine:
            raise UserError("the checkpoints here come from a training with other data or settings (fingerprint.json "
                            "differs or is missing): resuming them would mix two runs; use another --out, or start "
                            "afresh without --resume", job.out)
    elif ckpt.exists() and write:
        shutil.rmtree(ckpt)
    if write:
        write_json(path, {"fingerprint": mine})


def save_adapter(trainer: Any, tok: Any, out: Path) -> None:
    """The adapter and its tokenizer, written beside and then moved into place, so `out` never holds half of one."""
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def sft_config(job: TrainJob) -> Any:
    import torch
    from trl import SFTConfig

    tcfg, cuda = job.cfg.train, torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(job.out / "checkpoints"),
        num_train_epochs=tcfg.epochs,
        learning_rate=tcfg.learning_rate,
        per_device_train_batch_size=tcfg.batch_size,
        per_device_eval_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.grad_accum,
        warmup_steps=tcfg.warmup_ratio,
        lr_scheduler_type="cosine",
        max_length=tcfg.max_length,
        logging_steps=tcfg.logging_steps,
        save_steps=tcfg.save_steps,
        save_total_limit=2,
        eval_strategy="epoch" if job.eval_ds is not None else "no",
        train_sampling_strategy="group_by_length" if tcfg.group_by_length and job.packing == "off" else "random",
        packing=job.packing == "trl",
        packing_strategy="bfd",
        neftune_noise_alpha=tcfg.neftune_noise_alpha,
        seed=tcfg.seed,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        gradient_checkpointing=cuda,  # memory matters on a GPU; on CPU it only costs time
        disable_tqdm=True,  # RichProgress shows loss and tokens/s instead
        report_to="none",
    )


def fit(job: TrainJob, callbacks: list[Any]) -> tuple[Any, Any, float, float, float | None]:
    """Run the Trainer (from the last complete checkpoint on --resume): (trainer, result, padding waste,
    seconds, eval loss)."""
    from trl import SFTTrainer

    from selfinstruct.progress import RichProgress

    tcfg = job.cfg.train
    job.model.train()
    trainer = SFTTrainer(model=job.model, args=sft_config(job), train_dataset=job.train_ds, eval_dataset=job.eval_ds,
                         processing_class=job.tok, peft_config=None if tcfg.init_adapter else lora_config(tcfg),
                         data_collator=job.collator,
                         callbacks=[RichProgress(job.trained_tokens * tcfg.epochs, console), *callbacks])
    waste = padding_fraction(trainer, job.train_ds)
    resume = last_complete_checkpoint(job.out / "checkpoints") if tcfg.resume else None
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    elapsed = time.monotonic() - started
    eval_loss = trainer.evaluate()["eval_loss"] if job.eval_ds is not None else None
    return trainer, result, waste, elapsed, eval_loss


def write_outputs(job: TrainJob, trainer: Any, result: Any, waste: float, elapsed: float,
                  eval_loss: float | None) -> None:
    """On rank 0: the adapter (with the tokenizer), metrics.json, loss.png, and the merged model if asked."""
    from selfinstruct.progress import plot_losses

    if not trainer.is_world_process_zero():
        return
    tcfg, out = job.cfg.train, job.out
    save_adapter(trainer, job.tok, out / "adapter")
    write_json(out / "metrics.json", {
        "student": tcfg.student,
        "train_examples": len(job.train_convs) - job.dropped,
        "eval_examples": 0 if job.eval_ds is None else len(job.eval_ds),
        "dropped_examples": job.dropped,
        "mixed_in": job.mix,
        "packing": job.packing,
        "padding_fraction": waste,
        "trained_tokens_per_epoch": int(job.trained_tokens),
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "global_step": result.global_step,
        "train_seconds": round(elapsed, 2),
        "world_size": trainer.args.world_size,
        "log_history": trainer.state.log_history,
    })
    plot_losses(trainer.state.log_history, out / "loss.png")
    console.print(f"adapter: {out / 'adapter'}  train loss {result.training_loss:.4f}"
                  + (f"  eval loss {eval_loss:.4f}" if eval_loss is not None else ""))
    if tcfg.merge:
        from selfinstruct.merge import merge_adapter

        merge_adapter(out / "adapter", out / "merged")


def run_train(cfg: Config, callbacks: list[Any] | None = None) -> Path:
    """Train a LoRA adapter; writes <out>/adapter (adapter + tokenizer), metrics.json, loss.png,
    config.yaml (and <out>/merged with train.merge). Runs unchanged under torchrun / accelerate
    launch; only rank 0 writes. `callbacks` are extra Trainer callbacks. Returns <out>."""
    job = check_train(cfg)
    try:
        prepare_train(job)
        write_outputs(job, *fit(job, callbacks or []))
    finally:
        job.owner.release()
    return job.out
