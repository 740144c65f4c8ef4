"""Next-token loss without materializing fp32 logits for every position of a 256k vocabulary.

Full fp32 logits for an 8k-token row and a 256k vocabulary take about 8 GB. Here logits exist only
for positions that carry a label, one chunk at a time, and each chunk is recomputed in the backward
pass instead of being kept: peak memory is one chunk's logits, whatever the number of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lm.attention import SeqLayout

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor, layout: SeqLayout | None = None) -> torch.Tensor:
    """Targets aligned with the positions that predict them: targets[:, t] = labels[:, t + 1].

    `labels` use Hugging Face's convention (same positions as the inputs, IGNORE_INDEX where no
    loss is taken). In packed rows the last token of a sample never predicts the first token of
    the next one.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be [batch, tokens], got shape {tuple(labels.shape)}")
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if layout is not None and layout.is_packed:
        batch, tokens = labels.shape
        for row, segments in enumerate(layout.segments(batch, tokens)):
            end = 0
            for length in segments[:-1]:
                end += length
                targets[row, end - 1] = IGNORE_INDEX
    return targets


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, over targets != IGNORE_INDEX.

    hidden: [..., d]; weight: [vocab, d] (the output head); targets: [...] aligned with hidden.
    Only labelled positions are gathered, and logits are computed chunk_size rows at a time (in
    fp32 for the softmax).
    """
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden states {tuple(hidden.shape[:-1])}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    count = keep.numel()
    if count == 0:
        # No label in the batch: a zero that still depends on the graph, so backward works.
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss_sum, h, weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, t)
    return total / count
