"""Packing without cross-contamination for attention implementations without varlen kernels.

    rows = pack(tokenized_rows, max_length)          # several examples per row, up to max_length
    batch = PackedCollator(pad_id)(rows[:8])          # 4D block-diagonal causal mask + restarting positions

TRL's padding-free packing (`packing_strategy="bfd"`) relies on flash-attention's varlen kernels:
with `sdpa` or `eager` attention in transformers 5 its packed examples attend to each other
(measured: an example's loss changes when its neighbour's tokens change). Here every packed
example gets its own causal block in a 4D boolean mask (sdpa honours it exactly) and positions
that restart at 0, and the first label of each example is masked, so no token is predicted from
its neighbour. The train module uses TRL's packing where flash-attention is available and this
elsewhere when packing is asked for.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100  # the label of a token that is not trained (the one definition; train and evaluate use it)


def pack(rows: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """First-fit decreasing bins of whole examples, each bin at most `max_length` tokens."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    packed = []
    for members in bins:
        ids, labels, lengths = [], [], []
        for i in members:
            ids += rows[i]["input_ids"]
            labels += [IGNORE] + rows[i]["labels"][1:]  # never predict an example's first token
            lengths.append(len(rows[i]["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "seq_lengths": lengths})
    return packed


class PackedCollator:
    """Pads packed rows and builds (batch, 1, L, L) masks: causal within each example, nothing across."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, :n] = torch.tensor(r["input_ids"])
            labels[b, :n] = torch.tensor(r["labels"])
            start = 0
            for length in r["seq_lengths"]:
                end = start + length
                positions[b, start:end] = torch.arange(length)
                mask[b, 0, start:end, start:end] = torch.ones(length, length, dtype=torch.bool).tril()
                start = end
            mask[b, 0, n:, n:] = torch.eye(width - n, dtype=torch.bool)  # padding sees itself: no NaN rows
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
