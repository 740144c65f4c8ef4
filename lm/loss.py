"""Next-token loss without materializing fp32 logits for every position of a 256k vocabulary.

Full fp32 logits for an 8k-token row and a 256k vocabulary take about 8 GB, and autograd keeps
three tensors of that size (logits, log-probabilities, their gradient). Here logits exist only for
positions that carry a label, one chunk at a time, and the gradients for the hidden states and the
output head are computed in the same pass, in place in the chunk's logits: peak memory is one
chunk's fp32 logits (plus the head's gradient, which any backward pass makes), whatever the number
of tokens, and the head's matrix products are not repeated in the backward pass.

The chunk is sized in bytes, not rows (`default_chunk_size`): a fixed row count makes the chunk
four times larger at a 256k vocabulary than at 64k, and its cost per logit depends on the dtype. In
fp32 the head's gradient is twice its bf16 size (2 GB at 256k x 2048), and 1024-row chunks (1 GB
of logits) brought the peak for 4096 tokens to 3.0 GB, 0.26 of full logits' 11.7 GB; 512-row
chunks give 2.5 GB (0.22). In bf16, 320-row chunks (0.5 GB with the gradient's bf16 copy) sit
next to a 1 GB head gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lm.attention import SeqLayout, host_to_device

IGNORE_INDEX = -100
# What one chunk's buffers may take by default (see default_chunk_size). Matrix products of a few
# hundred rows against a 256k-wide head still run at full speed on CPU and GPU.
CHUNK_BYTES = 512 * 2**20


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
        sample_ends = []
        for row, segments in enumerate(layout.segments(batch, tokens)):
            end = row * tokens
            for length in segments[:-1]:
                end += length
                sample_ends.append(end - 1)
        if sample_ends:
            # One scatter from a host-built index, not one small write per sample.
            targets.view(-1).index_fill_(0, host_to_device(torch.tensor(sample_ends), labels.device), IGNORE_INDEX)
    return targets


def count_labelled(targets: torch.Tensor) -> Callable[[], int]:
    """A function that returns the number of labelled targets, for `chunked_cross_entropy`.

    Call this before the model's forward pass is queued and the returned function after it: on
    CUDA the count is copied to pinned host memory while the GPU works through the forward pass,
    so reading it does not drain the GPU's queue (a `.nonzero()` or `.item()` next to the loss
    waits for the whole forward pass and leaves the GPU idle while the next kernels are launched).
    """
    count = (targets != IGNORE_INDEX).sum()
    if count.device.type != "cuda":
        return lambda: int(count)
    host = torch.empty((), dtype=count.dtype, pin_memory=True)
    host.copy_(count, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> int:
        copied.synchronize()
        return int(host)

    return read


def default_chunk_size(vocab_size: int, dtype: torch.dtype, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk whose buffers take at most about `budget_bytes`: the chunk's fp32 logits (4
    bytes per logit; the softmax and its gradient are made in place in them), plus, when the
    hidden states and head are narrower than fp32 (bf16), the gradient's copy in their dtype.
    A multiple of 64 rows when there is room for one (256k vocabulary: 512 rows in fp32, 320 in
    bf16); never less than one row."""
    itemsize = dtype.itemsize
    per_row = vocab_size * (4 + (itemsize if itemsize < 4 else 0))
    rows = max(1, budget_bytes // per_row)
    return rows // 64 * 64 if rows >= 64 else rows


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # fp32 for the softmax; under bf16 the product itself is bf16, as an unfused head's would be.
    return (hidden @ weight.t()).float()


def _loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = _chunk_logits(hidden[start:start + chunk_size], weight)
        target_logits = logits.gather(1, targets[start:start + chunk_size, None])
        total = total + (torch.logsumexp(logits, 1, keepdim=True) - target_logits).sum()
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T (every row labelled), gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        count = hidden.shape[0]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        minus_one = torch.full((min(chunk_size, count), 1), -1.0, device=hidden.device)
        for start in range(0, count, chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            logits = _chunk_logits(h, weight)
            target_logits = logits.gather(1, t[:, None])
            # log-sum-exp and softmax in place in the chunk's logits: no second chunk-sized buffer.
            top = logits.amax(1, keepdim=True)
            sums = logits.sub_(top).exp_().sum(1, keepdim=True)
            total = total + (top + sums.log() - target_logits).sum()
            # d(mean loss)/d(logits) = (softmax - one_hot(target)) / count
            grad_logits = logits.div_(sums)
            grad_logits.scatter_add_(1, t[:, None], minus_one[:h.shape[0]])
            grad_logits = grad_logits.mul_(1.0 / count).to(weight.dtype)
            del logits
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start:start + chunk_size])
            if need_weight:
                if grad_weight is None:
                    grad_weight = grad_logits.t() @ h
                else:
                    grad_weight.addmm_(grad_logits.t(), h)
            del grad_logits  # before the next chunk's logits exist, not after
        ctx.grads = (grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("chunked_cross_entropy's gradients were already used: its graph can be "
                               "backpropagated once (no retain_graph)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # In place: these buffers were made for this one backward pass.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None,
    num_labelled: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, over targets != IGNORE_INDEX.

    hidden: [..., d]; weight: [vocab, d] (the output head); targets: [...] aligned with hidden.
    Only labelled positions are gathered, and logits are computed chunk_size rows at a time (in
    fp32 for the softmax); None sizes the chunks by memory (`default_chunk_size`). `num_labelled`,
    the number of labelled targets when the caller knows it (see `count_labelled`), spares a
    host-device synchronisation on CUDA; without it the labelled positions are found with
    `.nonzero()`.

    With gradients enabled, the gradients are computed in this call and kept until backward (which
    may run once); hidden states need not be kept for the head's backward pass.
    """
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden states {tuple(hidden.shape[:-1])}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None: sized by memory), got {chunk_size}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labelled = targets.reshape(-1) != IGNORE_INDEX
    if num_labelled is None:
        keep = labelled.nonzero().squeeze(1)
    else:
        keep = torch.nonzero_static(labelled, size=num_labelled).squeeze(1)
    count = keep.numel()
    if count == 0:
        # No label in the batch: a zero that still depends on the graph, so backward works.
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # What autocast would do to the head's matrix product, done once and outside the chunks
        # (autograd turns the gradients back into the parameters' dtype).
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    hidden, targets = hidden.index_select(0, keep), targets.reshape(-1).index_select(0, keep)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], weight.dtype)
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
        return _loss_sum(hidden, weight, targets, chunk_size) / count
