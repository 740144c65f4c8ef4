"""The Salamandra decoder: a Llama-architecture causal LM in one file.

Pre-norm blocks of RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> SwiGLU,
no biases, untied output head. Parameter names are those of Hugging Face `LlamaForCausalLM`, so a
Hugging Face checkpoint loads with no renaming. The KV caches that incremental decoding passes
in (`DecoderCache`: what the decoder needs of one) and the compiled decoding step are in lm/decode.py.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lm.attention import SeqLayout, cached_attention, causal_attention
from lm.config import LMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 even under bf16: the mean of squares loses too much precision otherwise.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, 1, head_dim] for rotary embeddings, as Hugging Face Llama computes them.

    The frequencies are derived from the config at every call, in fp32, rather than kept in a
    buffer: a buffer would hold garbage after building on the meta device, and `.to(bfloat16)`
    would round it (a phase error of several radians at position 8k).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class DecoderCache(Protocol):
    """What the decoder needs of a KV cache: `lm.decode.KVCache`. `hidden_states` checks room and
    dtype against `keys`, `length` and `max_tokens`, and advances `length`; the attention layers
    only call `update`, which `lm.decode.StaticKVStep` (one compiled decoding step) also has."""

    keys: list[torch.Tensor]
    length: int

    @property
    def max_tokens(self) -> int: ...

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store `layer`'s new keys and values [B, T, Hkv, D]; return the keys and values to attend
        over ([B, Hkv, slots, D]) and which of them each new query may see ([B, T, slots] bool, or
        None for all)."""
        ...


class Attention(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        d, hd = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.n_heads * hd, d, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: SeqLayout,
        cache: DecoderCache | None, layer: int,
    ) -> torch.Tensor:
        batch, tokens, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(batch, tokens, c.n_heads, c.head_dim)
        k = self.k_proj(x).view(batch, tokens, c.n_kv_heads, c.head_dim)
        v = self.v_proj(x).view(batch, tokens, c.n_kv_heads, c.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is None:
            out = causal_attention(q, k, v, layout, c.attention)
        else:
            keys, values, allowed = cache.update(layer, k, v)
            out = cached_attention(q, keys, values, allowed)
        return self.o_proj(out.reshape(batch, tokens, c.n_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, layout, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), rope, layout, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """Everything but the output head; named `model` inside Decoder, as in Hugging Face."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class Decoder(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.model = Trunk(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Recompute each block in the backward pass instead of keeping its activations.
        self.gradient_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialization for training from scratch: every matrix ~ N(0, init_std), norms at 1.

        The two projections that write into the residual stream (attention o_proj and MLP down_proj)
        get init_std / sqrt(2 * n_layers), as in GPT-2 and Megatron (which trained Salamandra): each
        block adds two such terms to the residual, so this keeps its variance from growing with depth.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if scaled else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        layout: SeqLayout | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """Final (normalized) hidden states [B, T, d_model]; the output head is not applied."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None and input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"inputs_embeds must be [batch, tokens, {self.config.d_model}], got {tuple(x.shape)}")
        batch, tokens, _ = x.shape
        layout = layout or SeqLayout()
        offset = 0
        if cache is not None:
            if layout.is_packed:
                raise ValueError("a KV cache works with plain rows, not packed rows")
            if cache.length + tokens > cache.max_tokens:
                raise ValueError(f"KV cache holds {cache.max_tokens} tokens; {cache.length} used + {tokens} new")
            if cache.keys[0].dtype != x.dtype or cache.keys[0].device != x.device:
                raise ValueError(f"KV cache is {cache.keys[0].dtype} on {cache.keys[0].device} but the model runs "
                                 f"{x.dtype} on {x.device}; allocate it with the model's dtype and device")
            offset = cache.length
        if position_ids is None:
            if not layout.is_packed and offset + tokens > self.config.max_seq_len:
                raise ValueError(f"{offset + tokens} positions exceed the model's max_seq_len {self.config.max_seq_len}")
            position_ids = layout.position_ids(batch, tokens, x.device) + offset
        elif position_ids.shape != (batch, tokens):
            raise ValueError(f"position_ids must be [{batch}, {tokens}], got {tuple(position_ids.shape)}")
        rope = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.model.layers):
            # The layer index only picks the cache's slot; without a cache every block gets the same
            # arguments, so a compiled block (lm.compile_blocks) is not recompiled for layer 0.
            layer = i if cache is not None else 0
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, layout, cache, layer, use_reentrant=False)
            else:
                x = block(x, rope, layout, cache, layer)
        if cache is not None:
            cache.length += tokens
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        layout: SeqLayout | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab]. For training on a large vocabulary, prefer `hidden_states` and
        apply `lm_head` only where labels are."""
        return self.lm_head(self.hidden_states(input_ids, inputs_embeds, layout, position_ids, cache))
