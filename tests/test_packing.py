import torch

from selfinstruct.packing import IGNORE, PackedCollator, pack


def row(ids, trained_from):
    return {"input_ids": ids, "labels": [IGNORE] * trained_from + ids[trained_from:]}


def test_pack_fills_bins_and_keeps_every_example():
    rows = [row(list(range(n)), 1) for n in (7, 5, 4, 3, 2, 9)]
    packed = pack(rows, max_length=10)
    assert all(len(p["input_ids"]) <= 10 for p in packed)
    assert sorted(n for p in packed for n in p["seq_lengths"]) == [2, 3, 4, 5, 7, 9]
    assert [p["seq_lengths"] for p in packed] == [[9], [7, 3], [5, 4], [2]]  # first-fit decreasing
    for p in packed:  # the first label of every packed example is masked
        start = 0
        for n in p["seq_lengths"]:
            assert p["labels"][start] == IGNORE
            start += n


def test_collator_mask_is_block_diagonal_causal():
    batch = PackedCollator(pad_id=0)([{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, 6, 7, IGNORE, 9],
                                       "seq_lengths": [3, 2]}, {"input_ids": [1, 2], "labels": [IGNORE, 2],
                                                                "seq_lengths": [2]}])
    m = batch["attention_mask"][0, 0]
    assert m[4].tolist() == [False, False, False, True, True]  # token 5 sees only its own example
    assert m[1].tolist() == [True, True, False, False, False]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert batch["labels"][1].tolist() == [IGNORE, 2, IGNORE, IGNORE, IGNORE]


def test_packed_examples_do_not_attend_to_each_other(tokenizer, random_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(random_model_dir, attn_implementation="sdpa").eval()
    b = tokenizer("Paris is the capital of France.")["input_ids"]

    def loss_of_b(a):
        rows = [{"input_ids": a + b, "labels": [IGNORE] * len(a) + [IGNORE] + b[1:], "seq_lengths": [len(a), len(b)]}]
        with torch.no_grad():
            return model(**PackedCollator(tokenizer.pad_token_id)(rows)).loss.item()

    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss.item()
    first = loss_of_b(tokenizer("The cat sat on the mat and looked around.")["input_ids"])
    second = loss_of_b(tokenizer("Completely different words, and more of them, appear here!")["input_ids"])
    assert abs(first - second) < 1e-5 and abs(first - alone) < 1e-5
