import pytest
import torch
import torch.nn.functional as F

from lm import SeqLayout
from lm.loss import CHUNK_BYTES, IGNORE_INDEX, chunked_cross_entropy, default_chunk_size, next_token_targets
from tests.numerics import assert_close_scaled


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000, None])
def test_chunked_loss_and_gradients_equal_full_logits(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(3, 20, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 20))
    targets[torch.rand(3, 20) < 0.4] = IGNORE_INDEX

    full = F.cross_entropy((hidden @ weight.t()).reshape(-1, 50), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    full_grads = torch.autograd.grad(full, (hidden, weight))
    ours = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    our_grads = torch.autograd.grad(ours, (hidden, weight))
    # Scalar loss: relative error. Gradients: relative to each gradient's largest entry.
    assert_close_scaled(ours, full, rel=5e-6, msg="loss")
    for name, a, b in zip(("hidden", "weight"), our_grads, full_grads):
        assert_close_scaled(a, b, rel=1e-5, msg=name)


def test_default_chunks_are_sized_by_bytes_per_dtype():
    # 256k vocabulary: fp32 logits are 4 bytes per logit; in bf16 the gradient's bf16 copy adds 2.
    assert default_chunk_size(256_000, torch.float32) == 512
    assert default_chunk_size(256_000, torch.bfloat16) == 320
    for vocab in (50, 32_000, 256_000, 10**9):
        for dtype, per_logit in ((torch.float32, 4), (torch.bfloat16, 6), (torch.float16, 6)):
            rows = default_chunk_size(vocab, dtype)
            assert rows >= 1 and (rows == 1 or rows * vocab * per_logit <= CHUNK_BYTES)
            # The largest multiple of 64 rows that fits (or the largest row count, below 64).
            assert (rows + (64 if rows >= 64 else 1)) * vocab * per_logit > CHUNK_BYTES or rows == 1


def test_bf16_hidden_gives_fp32_loss():
    hidden = torch.randn(10, 8, dtype=torch.bfloat16)
    weight = torch.randn(30, 8, dtype=torch.bfloat16)
    targets = torch.randint(0, 30, (10,))
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=3)
    expected = F.cross_entropy((hidden @ weight.t()).float(), targets)
    assert loss.dtype == torch.float32
    # Both sides round the same bf16 products (per chunk or whole, bit-identical here under
    # every ATen/oneDNN ISA level), then sum in fp32 in other orders: a relative tolerance.
    assert_close_scaled(loss, expected, rel=5e-6)


def test_no_labels_gives_zero_that_backpropagates():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    loss = chunked_cross_entropy(hidden, weight, torch.full((2, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def test_next_token_targets_shift_and_never_cross_packed_samples():
    labels = torch.tensor([[10, 11, 12, 20, 21, 30, IGNORE_INDEX, IGNORE_INDEX]])
    plain = next_token_targets(labels)
    assert plain.tolist() == [[11, 12, 20, 21, 30, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    packed = next_token_targets(labels, SeqLayout.packed([[3, 2, 1]]))
    # 12 must not predict 20, 21 must not predict 30: they belong to different samples.
    assert packed.tolist() == [[11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_misaligned_targets_are_refused():
    with pytest.raises(ValueError, match=r"targets \(1, 4\) do not match hidden states \(1, 5\)"):
        chunked_cross_entropy(torch.randn(1, 5, 8), torch.randn(30, 8), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \[batch, tokens\]"):
        next_token_targets(torch.zeros(5, dtype=torch.long))
