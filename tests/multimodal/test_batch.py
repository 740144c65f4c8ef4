"""Batch: `to` moves the tensors and keeps every other field; `real_tokens` is the one count of
non-padding tokens (training's tokens/s and padding waste, packing.padding_waste, the benchmarks)."""

import dataclasses

import torch

from lm.attention import SeqLayout
from multimodal.batch import Batch


def full_batch() -> Batch:
    return Batch(input_ids=torch.arange(12).view(2, 6), labels=torch.full((2, 6), -100), pixels=torch.zeros(1, 3, 4, 4),
                 layout=SeqLayout.packed([[4, 1], [3]]), num_samples=3, skipped={"too_long": 1},
                 sources={"a": 2, "b": 1}, keys=[["x", "y"], ["z"]], position={"epoch": 0})


def test_to_moves_the_tensors_and_keeps_every_other_field():
    batch = full_batch()
    moved = batch.to("meta")
    for f in dataclasses.fields(Batch):
        before, after = getattr(batch, f.name), getattr(moved, f.name)
        if isinstance(before, torch.Tensor):
            assert after.device.type == "meta" and after.shape == before.shape and after.dtype == before.dtype, f.name
        else:
            assert after == before, f.name
    assert moved.skipped is not batch.skipped and moved.sources is not batch.sources
    assert Batch(torch.zeros(1, 2, dtype=torch.long)).to("meta").labels is None


def test_real_tokens_counts_sample_lengths_of_packed_rows_and_every_position_of_plain_rows():
    assert full_batch().real_tokens() == 8
    assert Batch(torch.zeros(2, 5, dtype=torch.long)).real_tokens() == 10
