"""Projectors: encoder width -> decoder width. `build(kind, in_dim, out_dim, **options)`.

Every projector has `forward([N, T, in_dim]) -> [N, T', out_dim]`, `num_output_tokens(T) -> T'` and
`config() -> dict`, with `build(**projector.config())` rebuilding the same architecture.
"""

from __future__ import annotations

from torch import nn

from projector.mlp import MLPProjector
from projector.pixel_shuffle import PixelShuffleProjector, merge_tokens, split_tokens

KINDS = ("mlp", "linear", "pixel_shuffle")


def build(kind: str, in_dim: int, out_dim: int, **options) -> nn.Module:
    """`mlp` (option `depth`, default 2), `linear` (an MLP of depth 1), `pixel_shuffle` (options
    `factor`, default 2, and `depth` of the MLP after the merge)."""
    try:
        if kind == "mlp":
            return MLPProjector(in_dim, out_dim, **options)
        if kind == "linear":
            return MLPProjector(in_dim, out_dim, depth=1, **options)
        if kind == "pixel_shuffle":
            return PixelShuffleProjector(in_dim, out_dim, **options)
    except TypeError as error:
        raise ValueError(f"bad options {options} for projector kind {kind!r}: {error}") from None
    raise ValueError(f"unknown projector kind {kind!r}; choose one of {KINDS}")


__all__ = ["KINDS", "MLPProjector", "PixelShuffleProjector", "build", "merge_tokens", "split_tokens"]
