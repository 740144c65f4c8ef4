import pytest
import torch
from torch import nn

import projector
from projector import merge_tokens, split_tokens


@pytest.mark.parametrize("kind, options, tokens, expected_tokens", [
    ("mlp", {}, 49, 49),
    ("mlp", {"depth": 3}, 10, 10),
    ("linear", {}, 50, 50),
    ("pixel_shuffle", {"factor": 2}, 64, 16),
    ("pixel_shuffle", {"factor": 3, "depth": 1}, 729, 81),
])
def test_shapes_and_token_counts(kind, options, tokens, expected_tokens):
    module = projector.build(kind, 24, 40, **options)
    out = module(torch.randn(3, tokens, 24))
    assert out.shape == (3, expected_tokens, 40)
    assert module.num_output_tokens(tokens) == expected_tokens
    rebuilt = projector.build(**module.config())
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in module.parameters()]


def test_mlp_is_llava_two_layer_gelu():
    module = projector.build("mlp", 1152, 64)
    linear1, act, linear2 = module.layers
    assert isinstance(act, nn.GELU) and act.approximate == "none"
    assert (linear1.in_features, linear1.out_features, linear2.out_features) == (1152, 64, 64)
    x = torch.randn(2, 5, 1152)
    expected = linear2(torch.nn.functional.gelu(linear1(x)))
    torch.testing.assert_close(module(x), expected, atol=0, rtol=0)
    linear = projector.build("linear", 8, 4)
    assert len(linear.layers) == 1


def test_merge_tokens_groups_spatial_neighbours_brute_force():
    n, side, width, factor = 2, 6, 5, 3
    x = torch.randn(n, side * side, width)
    merged = merge_tokens(x, factor)
    out_side = side // factor
    for b in range(n):
        for i in range(out_side):
            for j in range(out_side):
                block = [x[b, (i * factor + di) * side + (j * factor + dj)]
                         for di in range(factor) for dj in range(factor)]
                assert torch.equal(merged[b, i * out_side + j], torch.cat(block))


@pytest.mark.parametrize("side, factor", [(4, 2), (27, 3), (8, 4), (5, 1)])
def test_pixel_shuffle_is_invertible(side, factor):
    x = torch.randn(2, side * side, 7)
    merged = merge_tokens(x, factor)
    assert torch.equal(split_tokens(merged, factor), x)
    assert torch.equal(merged.flatten().sort().values, x.flatten().sort().values)


def test_errors():
    with pytest.raises(ValueError, match="square grid of image tokens; got 50"):
        projector.build("pixel_shuffle", 8, 8).num_output_tokens(50)
    with pytest.raises(ValueError, match="factor 2 does not divide the 27x27"):
        projector.build("pixel_shuffle", 8, 8)(torch.randn(1, 729, 8))
    with pytest.raises(ValueError, match="unknown projector kind 'qformer'"):
        projector.build("qformer", 8, 8)
    with pytest.raises(ValueError, match="bad options"):
        projector.build("mlp", 8, 8, factor=2)
    with pytest.raises(ValueError, match="expects width 8"):
        projector.build("mlp", 8, 8)(torch.randn(1, 4, 9))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        projector.build("mlp", 8, 8, depth=0)


def test_mlp_position_embedding_marks_each_token_slot():
    module = projector.build("mlp", 6, 4, positions=5)
    x = torch.randn(3, 5, 6)
    expected = module.layers(x) + module.position_embedding[None]
    torch.testing.assert_close(module(x), expected, atol=0, rtol=0)
    # The same feature vector in two slots projects to two different tokens.
    same = torch.randn(1, 1, 6).expand(1, 5, 6)
    out = module(same)
    assert not torch.allclose(out[0, 0], out[0, 1])
    assert projector.build(**module.config()).position_embedding.shape == (5, 4)
    assert "positions" not in projector.build("mlp", 6, 4).config()  # saved configs stay as before
    with pytest.raises(ValueError, match="position embeddings for 5 tokens, got 7"):
        module(torch.randn(1, 7, 6))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        projector.build("mlp", 6, 4, positions=-1)
