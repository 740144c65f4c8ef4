"""MLP projector: encoder width -> decoder width, one token in, one token out."""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """`depth` linear layers with GELU between them. depth 2 is LLaVA-1.5's and Salamandra vision's
    projector (in -> out -> out); depth 1 is a plain linear map."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLP projector depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)
        self.in_dim, self.out_dim, self.depth = in_dim, out_dim, depth

    def num_output_tokens(self, tokens: int) -> int:
        return tokens

    def config(self) -> dict:
        return {"kind": "mlp", "in_dim": self.in_dim, "out_dim": self.out_dim, "depth": self.depth}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.in_dim:
            raise ValueError(f"projector expects width {self.in_dim}, got features of shape {tuple(features.shape)}")
        return self.layers(features)
