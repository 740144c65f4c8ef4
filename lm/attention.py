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
        return host_to_device(torch.stack(rows), device)

    def segment_ids(self, batch: int, tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        rows = [
            torch.repeat_interleave(torch.arange(len(segs)), torch.tensor(segs))
            for segs in self.segments(batch, tokens)
        ]
        return host_to_device(torch.stack(rows), device)


def host_to_device(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """`tensor`, built on the host from layout numbers, on `device` without a host-device
    synchronisation: a plain copy from pageable memory makes the host wait until the GPU has run
    everything queued before it; a non-blocking copy from pinned memory does not."""
    if device is not None and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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


# Opaque to torch.compile (a no-op in eager mode): a packed SeqLayout carries its sample lengths as
# Python numbers, so a graph traced through attention would be recompiled for every new packing;
# compiled decoder blocks (lm.compile_blocks) run around it instead.
@torch.compiler.disable(recursive=True)
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
    if layout.is_packed and q.device.type == "cpu" and q.shape[1] >= PER_SEGMENT_MIN_TOKENS:
        return _attention_per_segment(q, k, v, layout)
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


# Below this row length one masked call beats a call per sample on CPU: measured on the demo's
# 256-token rows of ~40-token samples, the masked call made a training step 8% faster, while on the
# train_step benchmark's 1,024-token rows the per-sample calls win (the mask's work grows as T²).
PER_SEGMENT_MIN_TOKENS = 512


def _attention_per_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
    """Packed rows on CPU: plain causal attention over each segment (sample or trailing padding) on
    its own, the same numbers as the block-diagonal mask. SDPA's CPU kernel computes every block
    that an arbitrary mask covers, the whole row; per segment it computes only the causal half of
    each sample's own block. All rows are cut with one split, whose backward is one concatenation
    (a slice's backward writes a full-size zero tensor per slice); few, large copies also matter
    on a busy CPU, where every small parallel operation waits for its slowest thread."""
    batch, tokens, heads, dim = q.shape
    lengths = [n for segments in layout.segments(batch, tokens) for n in segments]
    gqa = k.shape[2] != heads
    outs = [
        F.scaled_dot_product_attention(
            q_seg.transpose(0, 1)[None], k_seg.transpose(0, 1)[None], v_seg.transpose(0, 1)[None],
            is_causal=True, enable_gqa=gqa,
        )[0].transpose(0, 1)
        for q_seg, k_seg, v_seg in zip(*(t.reshape(batch * tokens, *t.shape[2:]).split(lengths) for t in (q, k, v)))
    ]
    return torch.cat(outs).view(batch, tokens, heads, dim)


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None
) -> torch.Tensor:
    """Attention of new queries over a KV cache. q: [B, Tq, H, D]; k, v: [B, Hkv, Tk, D] (the
    cache's head-major layout); allowed: [B, Tq, Tk] bool (which cached keys each query may see),
    or None for all keys."""
    batch, tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    if tokens == 1 and kv_heads != heads:
        # One new token (a decoding step): the query heads that share a key/value head become that
        # head's queries, so each cached key and value is read once per group instead of once per
        # query head (the grouped-query path), about 1.5x faster on CPU. One query row has no
        # causal structure, and the mask of that row broadcasts over the group.
        q = q.reshape(batch, kv_heads, heads // kv_heads, dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if allowed is None else allowed[:, None])
        return out.reshape(batch, 1, heads, dim)
    q = q.transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if allowed is None else allowed[:, None], enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.transpose(1, 2)
