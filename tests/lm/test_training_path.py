"""The training step's fast paths compute what the plain ones do.

- the loss with a known label count (no `.nonzero()`, so no host-device synchronisation on CUDA)
  equals the loss that finds the labelled positions itself, values and gradients;
- the fused loss (gradients made in the forward pass) equals autograd through full logits, in fp32,
  in bf16 and under autocast;
- per-sample attention on CPU equals the block-diagonal mask, values and gradients;
- the vectorised next_token_targets equals a per-sample loop.
"""

import pytest
import torch
import torch.nn.functional as F

from lm import SeqLayout
from lm.attention import _attention_per_segment
from lm.loss import IGNORE_INDEX, chunked_cross_entropy, count_labelled, next_token_targets
from tests.numerics import assert_close_scaled


def problem(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 20, 16, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(50, 16, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (3, 20), generator=generator)
    targets[torch.rand(3, 20, generator=generator) < 0.4] = IGNORE_INDEX
    return hidden, weight, targets


def full_logits_loss(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_known_label_count_equals_nonzero_path(chunk_size):
    hidden, weight, targets = problem()
    count = count_labelled(targets)()
    assert count == int((targets != IGNORE_INDEX).sum())
    found = chunked_cross_entropy(hidden, weight, targets, chunk_size)
    found_grads = torch.autograd.grad(found, (hidden, weight))
    given = chunked_cross_entropy(hidden, weight, targets, chunk_size, num_labelled=count)
    given_grads = torch.autograd.grad(given, (hidden, weight))
    assert torch.equal(found, given)
    for a, b in zip(found_grads, given_grads):
        assert torch.equal(a, b)


def test_bf16_gradients_equal_autograd_through_full_logits():
    hidden, weight, targets = problem(torch.bfloat16)
    full = full_logits_loss(hidden, weight, targets)
    full_grads = torch.autograd.grad(full, (hidden, weight))
    ours = chunked_cross_entropy(hidden, weight, targets, chunk_size=7)
    our_grads = torch.autograd.grad(ours, (hidden, weight))
    assert_close_scaled(ours, full, rel=5e-6, msg="loss")
    for name, a, b in zip(("hidden", "weight"), our_grads, full_grads):
        assert a.dtype == torch.bfloat16
        # Both round fp32 gradients of the logits to bf16 before the products; ours also rounds
        # the head gradient's running sum once per chunk (~6 chunks here), each time by at most
        # half a bf16 ulp (2^-9) of the running sum: within 2e-2 of the largest entry (seen: 6e-3).
        assert_close_scaled(a, b, rel=2e-2, msg=name)


def test_autocast_equals_autocast_reference_and_gives_fp32_gradients():
    hidden, weight, targets = problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = full_logits_loss(hidden, weight, targets)
        ours = chunked_cross_entropy(hidden, weight, targets, chunk_size=7)
    full_grads = torch.autograd.grad(full, (hidden, weight))
    our_grads = torch.autograd.grad(ours, (hidden, weight))
    assert_close_scaled(ours, full, rel=5e-6, msg="loss")
    for name, a, b in zip(("hidden", "weight"), our_grads, full_grads):
        assert a.dtype == torch.float32
        assert_close_scaled(a, b, rel=2e-2, msg=name)  # bf16 products on both sides, as above


def test_loss_without_gradients_and_scaled_backward():
    hidden, weight, targets = problem()
    with torch.no_grad():
        plain = chunked_cross_entropy(hidden, weight, targets, chunk_size=7)
    full = full_logits_loss(hidden, weight, targets)
    assert_close_scaled(plain, full, rel=5e-6)
    # A scaled loss (gradient accumulation) scales the gradients; only the hidden states train here.
    frozen = weight.detach()
    full_grad, = torch.autograd.grad(0.25 * full_logits_loss(hidden, frozen, targets), hidden)
    our_grad, = torch.autograd.grad(0.25 * chunked_cross_entropy(hidden, frozen, targets, chunk_size=7), hidden)
    assert_close_scaled(our_grad, full_grad, rel=1e-5)


def test_second_backward_is_refused():
    hidden, weight, targets = problem()
    loss = chunked_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def reference_targets(labels, layout):
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    for row, segments in enumerate(layout.segments(*labels.shape)):
        end = 0
        for length in segments[:-1]:
            end += length
            targets[row, end - 1] = IGNORE_INDEX
    return targets


@pytest.mark.parametrize("seq_lens", [[[3, 2, 1], [6]], [[2, 2], [1, 1, 1]], [[5], [4]]])
def test_next_token_targets_equal_a_per_sample_loop(seq_lens):
    labels = torch.randint(0, 100, (2, 6))
    layout = SeqLayout.packed(seq_lens)
    assert torch.equal(next_token_targets(labels, layout), reference_targets(labels, layout))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_per_sample_attention_equals_block_diagonal_mask(kv_heads):
    torch.manual_seed(0)
    layout = SeqLayout.packed([[5, 11, 8], [20], [1, 2, 3]])  # rows 1 and 3 end in padding
    batch, tokens, heads, dim = 3, 24, 4, 8
    q = torch.randn(batch, tokens, heads, dim, requires_grad=True)
    k = torch.randn(batch, tokens, kv_heads, dim, requires_grad=True)
    v = torch.randn(batch, tokens, kv_heads, dim, requires_grad=True)
    seg = layout.segment_ids(batch, tokens)
    mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(tokens, tokens, dtype=torch.bool).tril()
    masked = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask[:, None], enable_gqa=kv_heads != heads
    ).transpose(1, 2)
    ours = _attention_per_segment(q, k, v, layout)
    weights = torch.linspace(-1, 1, ours.numel()).reshape(ours.shape)
    masked_grads = torch.autograd.grad((masked * weights).sum(), (q, k, v))
    our_grads = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    assert_close_scaled(ours, masked, rel=1e-5, msg="output")
    for name, a, b in zip("qkv", our_grads, masked_grads):
        assert_close_scaled(a, b, rel=1e-5, msg=name)
