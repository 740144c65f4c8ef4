"""Causal attention over one sequence layout, with two backends: PyTorch SDPA and xformers.

A `SeqLayout` says how the tokens of a batch are laid out: plain causal rows (one sample per row),
or packed rows (several samples per row, given their lengths). In a packed row a token attends only
to earlier tokens of its own sample and positions restart at 0 for each sample, as Salamandra was
pre-trained (attention reset at document boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqLayout:
    """`seq_lens[r]` lists the sample lengths of row r; None means plain causal rows.

    Tokens after the last sample of a packed row (padding) form one more segment of their own, so
    they never leak into a real sample; their labels are expected to be ignored.
    """

    seq_lens: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def packed(cls, seq_lens: Sequence[Sequence[int]]) -> "SeqLayout":
        rows = tuple(tuple(int(n) for n in row) for row in seq_lens)
        for r, row in enumerate(rows):
            if any(n <= 0 for n in row):
                raise ValueError(f"packed row {r} has a non-positive sample length: {list(row)}")
        return cls(rows)

    @property
    def is_packed(self) -> bool:
        return self.seq_lens is not None

    def segments(self, batch: int, tokens: int) -> list[list[int]]:
        """Per row, the lengths of all segments covering the row (samples, then padding if any)."""
        if self.seq_lens is None:
            return [[tokens] for _ in range(batch)]
        if len(self.seq_lens) != batch:
            raise ValueError(f"layout describes {len(self.seq_lens)} rows but the batch has {batch}")
        rows = []
        for r, row in enumerate(self.seq_lens):
            used = sum(row)
            if used > tokens:
                raise ValueError(f"packed row {r}: sample lengths sum to {used} > row length {tokens}")
            rows.append(list(row) + ([tokens - used] if used < tokens else []))
        return rows

    def position_ids(self, batch: int, tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        """[batch, tokens] positions, restarting at 0 at the start of every segment."""
        if self.seq_lens is None:
            return torch.arange(tokens, device=device).expand(batch, tokens)
        rows = [torch.cat([torch.arange(n) for n in segs]) for segs in self.segments(batch, tokens)]
        return torch.stack(rows).to(device)

    def segment_ids(self, batch: int, tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        rows = [
            torch.repeat_interleave(torch.arange(len(segs)), torch.tensor(segs))
            for segs in self.segments(batch, tokens)
        ]
        return torch.stack(rows).to(device)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "xformers" if device.type == "cuda" and _xformers_ops() is not None else "sdpa"
    if backend == "xformers":
        if device.type != "cuda":
            raise RuntimeError("attention='xformers' needs CUDA tensors; use 'sdpa' or 'auto' on CPU")
        if _xformers_ops() is None:
            raise RuntimeError("attention='xformers' but xformers is not installed (pip install 'salamandra-vision[gpu]')")
    return backend


_XFORMERS: list = []


def _xformers_ops():
    if not _XFORMERS:
        try:
            import xformers.ops as xops
        except ImportError:
            xops = None
        _XFORMERS.append(xops)
    return _XFORMERS[0]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SeqLayout,
    backend: str,
) -> torch.Tensor:
    """q: [B, T, H, D]; k, v: [B, T, Hkv, D] (grouped-query when Hkv < H). Returns [B, T, H, D]."""
    backend = resolve_backend(backend, q.device)
    if backend == "xformers":
        return _xformers_attention(q, k, v, layout)
    batch, tokens = q.shape[:2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = k.shape[1] != q.shape[1]
    if not layout.is_packed:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        seg = layout.segment_ids(batch, tokens, q.device)
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).tril()
        mask = (seg[:, :, None] == seg[:, None, :]) & causal
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
    return out.transpose(1, 2)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
    xops = _xformers_ops()
    batch, tokens, heads, dim = q.shape
    kv_heads = k.shape[2]
    if layout.is_packed:
        # All rows become one long sequence; the block-diagonal mask keeps every segment
        # (sample or trailing padding) to itself, so rows never see each other either.
        lengths = [n for segs in layout.segments(batch, tokens) for n in segs]
        bias = xops.fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lengths)
        q, k, v = (t.reshape(1, batch * tokens, *t.shape[2:]) for t in (q, k, v))
    else:
        bias = xops.LowerTriangularMask()
    if kv_heads != heads:
        # xformers' grouped layout [B, M, G, H/G, D] shares each key/value head across its group
        # without copying it.
        group = heads // kv_heads
        q = q.reshape(*q.shape[:2], kv_heads, group, dim)
        k = k[:, :, :, None].expand(-1, -1, -1, group, -1)
        v = v[:, :, :, None].expand(-1, -1, -1, group, -1)
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    return out.reshape(batch, tokens, heads, dim)


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Attention of new queries over a KV cache. q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D];
    allowed: [B, Tq, Tk] bool (which cached keys each query may see)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed[:, None], enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.transpose(1, 2)
