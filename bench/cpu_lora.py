"""LoRA generation on vLLM's CPU build: vLLM's own LoRA ops against generators.cpu_lora's, same engine, same run.

    VLLM_CPU_KVCACHE_SPACE=1 python bench/cpu_lora.py MODEL [--prompts 16] [--max-tokens 128] [--rank 8]

MODEL is a model directory (made for SmolLM2-135M-Instruct). A LoRA adapter of --rank on every linear
projection is made with PEFT (random weights: the cost does not depend on them) and one engine starts in
this process with LoRA support. The same chat prompts (about 340 tokens each, seeded sampling, a fixed number
of new tokens) are generated three times: without the adapter (the reference: the base model's cost),
through the adapter on vLLM's ops, through the adapter on ours. Prints the three wall times, the ratio
vLLM's / ours, and how many of the texts the two LoRA runs share (a reduction in another order may flip a
near-tie token, after which a sampled text goes its own way).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_adapter(model: str, rank: int, out: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(base, cfg).save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    adapter = tempfile.mkdtemp(prefix="cpu-lora-bench-")
    make_adapter(args.model, args.rank, adapter)

    from vllm import SamplingParams
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.lora.request import LoRARequest

    from selfinstruct.config import EngineConfig, TeacherConfig
    from selfinstruct.generators import cpu_lora
    from selfinstruct.generators.vllm import engine

    names = list(cpu_lora.SIGNATURES)
    vllms = {n: getattr(lora_ops, n) for n in names}  # before the engine's start installs ours
    llm = engine(TeacherConfig(backend="vllm", model=args.model, cache=None,
                               engine=EngineConfig(max_model_len=1024, enable_lora=True, max_lora_rank=args.rank)))
    ours = {n: getattr(lora_ops, n) for n in names}
    assert ours["bgmv_expand"] is cpu_lora.bgmv_expand, "the engine's start did not install the grouped ops"

    def use(ops: dict) -> None:
        for module in (lora_ops, punica_cpu):
            for n, op in ops.items():
                setattr(module, n, op)

    text = "Rewrite the given prompt into a more complex version that a famous AI system would find harder. "
    prompts = [[{"role": "user", "content": text * 12 + f"#Given Prompt#: task number {i}"}]
               for i in range(args.prompts)]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=1, ignore_eos=True)
    lora = LoRARequest("bench", 1, adapter)
    llm.chat(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False, lora_request=lora)  # warm-up, loads it

    def timed(req: LoRARequest | None) -> tuple[float, list[str]]:
        llm.reset_prefix_cache()  # each run prefills its prompts itself
        started = time.perf_counter()
        outs = llm.chat(prompts, sp, use_tqdm=False, lora_request=req)
        return time.perf_counter() - started, [o.outputs[0].text for o in outs]

    base_s, _ = timed(None)
    use(vllms)
    vllm_s, vllm_texts = timed(lora)
    use(ours)
    ours_s, our_texts = timed(lora)
    tokens = args.prompts * args.max_tokens
    print(f"{args.prompts} prompts x {args.max_tokens} new tokens, rank {args.rank}")
    print(f"without adapter        {base_s:7.1f} s")
    print(f"adapter, vLLM's ops    {vllm_s:7.1f} s   {tokens / vllm_s:6.1f} tok/s")
    print(f"adapter, cpu_lora ops  {ours_s:7.1f} s   {tokens / ours_s:6.1f} tok/s")
    print(f"ratio vLLM's / ours: {vllm_s / ours_s:.2f}x; LoRA cost over the base model: "
          f"vLLM's {vllm_s / base_s:.2f}x, ours {ours_s / base_s:.2f}x")
    print(f"identical texts: {sum(a == b for a, b in zip(vllm_texts, our_texts, strict=True))} of {len(our_texts)}")


if __name__ == "__main__":
    main()
