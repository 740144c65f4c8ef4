"""MLP projector: encoder width -> decoder width, one token in, one token out."""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """`depth` linear layers with GELU between them. depth 2 is LLaVA-1.5's and Salamandra vision's
    projector (in -> out -> out); depth 1 is a plain linear map.

    `positions` > 0 adds a learned embedding per image-token slot (initialised with std
    `position_std`) to the output, so the decoder knows which grid cell each token comes from even
    when the tower's features no longer say so. A pretrained CLIP/SigLIP keeps that in its
    features, and the Hugging Face LLaVA layout has no place for such an embedding, so it is off
    by default."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, positions: int = 0, position_std: float = 0.02):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLP projector depth must be >= 1, got {depth}")
        if positions < 0:
            raise ValueError(f"positions must be >= 0 (0: no position embedding), got {positions}")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)
        self.in_dim, self.out_dim, self.depth, self.positions = in_dim, out_dim, depth, positions
        self.position_embedding = (nn.Parameter(torch.randn(positions, out_dim) * position_std)
                                   if positions else None)

    def num_output_tokens(self, tokens: int) -> int:
        return tokens

    def config(self) -> dict:
        config = {"kind": "mlp", "in_dim": self.in_dim, "out_dim": self.out_dim, "depth": self.depth}
        return {**config, "positions": self.positions} if self.positions else config

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.in_dim:
            raise ValueError(f"projector expects width {self.in_dim}, got features of shape {tuple(features.shape)}")
        out = self.layers(features)
        if self.position_embedding is not None:
            if out.shape[-2] != self.positions:
                raise ValueError(f"projector has position embeddings for {self.positions} tokens, got {out.shape[-2]}")
            out = out + self.position_embedding
        return out
