"""Pixel-shuffle projector: merges factor x factor neighbouring image tokens into one, then an MLP.

Fewer image tokens (tokens / factor^2, each factor^2 times wider) make long multi-image prompts
affordable; the merge itself is a pure rearrangement, so no information is lost before the MLP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from projector.mlp import MLPProjector


def grid_side(tokens: int, factor: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"pixel shuffle needs a square grid of image tokens; got {tokens} tokens "
                         "(drop the class token: drop_cls=True)")
    if side % factor:
        raise ValueError(f"pixel shuffle factor {factor} does not divide the {side}x{side} token grid")
    return side


def merge_tokens(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, s*s, D] -> [N, (s/f)^2, D*f^2]: each output token is one f x f block of the grid, its
    tokens concatenated in row-major order."""
    n, tokens, width = x.shape
    side = grid_side(tokens, factor)
    out_side = side // factor
    x = x.reshape(n, out_side, factor, out_side, factor, width)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, out_side * out_side, factor * factor * width)


def split_tokens(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse of `merge_tokens`."""
    n, tokens, merged_width = x.shape
    out_side = math.isqrt(tokens)
    width = merged_width // (factor * factor)
    x = x.reshape(n, out_side, out_side, factor, factor, width).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, tokens * factor * factor, width)


class PixelShuffleProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, factor: int = 2, depth: int = 2):
        super().__init__()
        if factor < 1:
            raise ValueError(f"pixel shuffle factor must be >= 1, got {factor}")
        self.factor = factor
        self.mlp = MLPProjector(in_dim * factor * factor, out_dim, depth)
        self.in_dim, self.out_dim = in_dim, out_dim

    def num_output_tokens(self, tokens: int) -> int:
        grid_side(tokens, self.factor)
        return tokens // (self.factor * self.factor)

    def config(self) -> dict:
        return {"kind": "pixel_shuffle", "in_dim": self.in_dim, "out_dim": self.out_dim,
                "factor": self.factor, "depth": self.mlp.depth}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(merge_tokens(features, self.factor))
