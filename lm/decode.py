"""KV caches and the compiled decoding step (static cache).

Decoding one token at a time reuses the keys and values of every earlier token, kept in a cache:

- `KVCache`: per layer, preallocated to `max_tokens` slots. `Decoder.hidden_states(..., cache=)`
  writes the new tokens after the `length` cached ones and advances `length`; `valid` hides slots
  that hold no real token (the padding of left-padded prompts of different lengths).
- `StaticKVStep`: one decoding step (one new token per row) over a `KVCache`'s tensors at fixed
  shapes, for a compiled step: the slot written is a tensor and attention covers every slot, so the
  graph is the same from one step to the next. Passed to the blocks in place of the KVCache.
- `static_step(decoder, ...)`: one such step, next-token logits, eagerly.
- `compiled_step(decoder)`: `static_step` as one `torch.compile`d graph, gpt-fast style: inductor
  fuses the element-wise work and freezing folds the weights in as constants (on CPU, packed for
  MKL); kept on the decoder and rebuilt when its weights change. `COMPILE_BACKEND` names the
  backend, `static_cache_size` the cache length that lets prompts of similar lengths share a graph.

A caller (multimodal.generation) runs the prefill eagerly over a KVCache of `static_cache_size`
slots, then each later step as `compiled_step(decoder)(tokens, position_ids, slot, cache.valid,
cache.keys, cache.values)`, stepping `slot` itself; or every step eagerly with `hidden_states`.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lm.attention import SeqLayout
from lm.config import LMConfig
from lm.model import Decoder, rotary_cos_sin

__all__ = [
    "CACHE_BUCKET", "COMPILE_BACKEND", "KVCache", "StaticKVStep", "compiled_step", "static_cache_size", "static_step",
]

# Static caches are this many slots long or a multiple of it, so that prompts of somewhat different
# lengths share one compiled step (the step attends over every slot, the unused ones masked).
CACHE_BUCKET = 64
# torch.compile backend of the compiled step, read when a decoder's step is built; tests may set
# "aot_eager" (same graph capture and static cache, no inductor code generation, so no freezing
# either) to compile in seconds.
COMPILE_BACKEND = "inductor"


@dataclass
class KVCache:
    """Keys and values of earlier tokens, per layer, preallocated to `max_tokens`.

    `valid[b, j]` says whether slot j of row b holds a real token; callers that left-pad prompts
    of different lengths set the padding slots to False before the first forward pass.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor
    length: int = 0
    # (length, new_tokens, mask) of the step in progress: every layer of a step needs the same mask.
    _step_mask: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def allocate(
        cls, config: LMConfig, batch: int, max_tokens: int,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> "KVCache":
        shape = (batch, max_tokens, config.n_kv_heads, config.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
            valid=torch.ones(batch, max_tokens, dtype=torch.bool, device=device),
        )

    @property
    def max_tokens(self) -> int:
        return self.valid.shape[1]

    def attention_mask(self, new_tokens: int) -> torch.Tensor:
        """[B, new_tokens, length + new_tokens]: causal over the cache, padding slots hidden.
        A query always sees itself, so padding queries never produce NaN."""
        end = self.length + new_tokens
        keys = torch.arange(end, device=self.valid.device)
        queries = torch.arange(self.length, end, device=self.valid.device)
        causal = keys[None, :] <= queries[:, None]
        itself = keys[None, :] == queries[:, None]
        return (self.valid[:, None, :end] & causal) | itself

    def step_mask(self, new_tokens: int) -> torch.Tensor | None:
        """`attention_mask(new_tokens)` for the step in progress, built once for all layers; None when
        it hides nothing (one new token, no padding slot), so attention can run without a mask."""
        if self._step_mask is None or self._step_mask[:2] != (self.length, new_tokens):
            end = self.length + new_tokens
            if new_tokens == 1 and bool(self.valid[:, :end].all()):
                mask = None
            else:
                mask = self.attention_mask(new_tokens)
            self._step_mask = (self.length, new_tokens, mask)
        return self._step_mask[2]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new tokens' keys and values [B, T, Hkv, D] of `layer` after the `length` cached
        ones; return the keys and values to attend over and the step's mask (see `step_mask`)."""
        start, end = self.length, self.length + k.shape[1]
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end], self.step_mask(k.shape[1])


@dataclass
class StaticKVStep:
    """One decoding step (one new token per row) over a `KVCache`'s tensors at fixed shapes, for a
    compiled step function: the graph must not change from one step to the next, so the slot the
    new keys and values go to is a tensor (`slot`, shape [1]) rather than `KVCache.length`, and
    attention covers all `max_tokens` slots, those not yet written hidden by `mask` [B, 1, max_tokens]
    (`KVCache.valid` and slot index <= `slot`). Passed to the blocks in place of a KVCache; it
    does not advance anything: the caller steps `slot`.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    slot: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of_tensors(
        cls, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor, slot: torch.Tensor
    ) -> "StaticKVStep":
        """The step writing slot `slot` of a KVCache's `keys`, `values` and `valid`."""
        slots = torch.arange(valid.shape[1], device=valid.device)
        return cls(keys, values, slot, (valid & (slots <= slot))[:, None, :])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # In-place index copies, which the compiler keeps in place (no copy of the cache per step).
        self.keys[layer].index_copy_(1, self.slot, k)
        self.values[layer].index_copy_(1, self.slot, v)
        return self.keys[layer], self.values[layer], self.mask


def static_cache_size(tokens: int) -> int:
    """Slots of a static cache holding `tokens` (prompt width + new tokens): rounded up to a
    multiple of CACHE_BUCKET, so that calls of somewhat different lengths reuse a compiled step."""
    return -(-tokens // CACHE_BUCKET) * CACHE_BUCKET


def static_step(
    decoder: Decoder, tokens: torch.Tensor, position_ids: torch.Tensor, slot: torch.Tensor,
    valid: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
) -> torch.Tensor:
    """One decoding step at fixed shapes: next-token logits [B, V] (fp32) for `tokens` [B, 1] at
    `position_ids` [B, 1], their keys and values written to cache slot `slot` ([1]); the blocks of
    `Decoder.hidden_states` with a `StaticKVStep` in place of the KVCache, no checks (they were done
    by the prefill over the same cache), and the output head."""
    config = decoder.config
    x = decoder.embed(tokens)
    rope = rotary_cos_sin(position_ids, config.head_dim, config.rope_theta, x.dtype)
    step = StaticKVStep.of_tensors(keys, values, valid, slot)
    layout = SeqLayout()
    for i, block in enumerate(decoder.model.layers):
        x = block(x, rope, layout, step, i)
    return decoder.lm_head(decoder.model.norm(x)[:, -1]).float()


class _CompiledStep:
    """A compiled step and the weights it was built for, kept on the decoder; copies and pickles of
    the decoder get None instead (the compiled code neither copies nor pickles), and compile anew."""

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.function = self.compile()
        # For one-row steps on CPU, built on first use: the column-major copy and its own step.
        self.column_major: tuple[Decoder, Callable[..., torch.Tensor]] | None = None

    @staticmethod
    def compile() -> Callable[..., torch.Tensor]:
        # A copy of the code object: torch.compile keeps its compiled graphs on the code object,
        # and graphs with frozen weights must never serve another decoder or other weights. One
        # per decoder (and one for its column-major copy): a code object that sees the parameters
        # of several modules stops treating them as constants, and freezing no longer applies.
        function = types.FunctionType(static_step.__code__.replace(), static_step.__globals__, "static_step")
        return torch.compile(function, dynamic=False, backend=COMPILE_BACKEND)

    def __reduce__(self) -> tuple:
        return type(None), ()

    def __deepcopy__(self, memo: dict) -> None:
        return None


def _column_major(decoder: Decoder) -> Decoder:
    """A copy of `decoder` with the same parameters except the nn.Linear weights, copied in
    column-major order (the same values; `weight.t()` contiguous). On CPU a one-row product runs
    about 1.2x faster over a column-major matrix (x @ W.t() reads W.t() contiguously) than over the
    row-major one or MKL's packed copy, and at batch 1 the products are most of a step."""
    shared = {id(tensor): tensor for tensor in [*decoder.parameters(), *decoder.buffers()]}
    copied = copy.deepcopy(decoder, shared)
    with torch.inference_mode(False), torch.no_grad():
        for module in copied.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(module.weight.t().contiguous().t(), requires_grad=False)
    return copied


def compiled_step(decoder: Decoder) -> Callable[..., torch.Tensor]:
    """`static_step` for `decoder`, compiled with `torch.compile` (COMPILE_BACKEND, dynamic=False,
    freezing on) and kept on the decoder, so later calls reuse it. The function returned takes
    `static_step`'s arguments after `decoder`.

    It compiles on first use, and again (seconds to a minute on CPU, as the first time) when a call
    brings a new batch size, a new static cache length (see `static_cache_size`), dtype or device;
    past torch._dynamo's cache_size_limit (8 by default) of such variants, torch runs the step
    eagerly. For several rows, freezing makes the weights constants of the graph (on CPU, copies
    packed for MKL); for one row on CPU the step runs on column-major copies of the weights
    (`_column_major`) instead; either copy takes the decoder's linear weight memory once more. So
    the whole thing is built anew, with a fresh code object and thus its own compile cache, when
    any parameter was replaced or changed in place since (its storage or version counter differs),
    or COMPILE_BACKEND changed: a model trained or reloaded between calls never decodes with old
    weights.
    """
    key = (COMPILE_BACKEND, tuple((p.data_ptr(), p._version) for p in decoder.parameters()))
    entry = decoder.__dict__.get("_compiled_decode_step")
    if entry is None or entry.key != key:
        entry = _CompiledStep(key)
        # In __dict__, not as a submodule: state_dict, parameters() and repr do not see it.
        decoder.__dict__["_compiled_decode_step"] = entry

    def step(tokens: torch.Tensor, *args: Any) -> torch.Tensor:
        target, function, options = decoder, entry.function, {"freezing": True}
        if tokens.shape[0] == 1 and tokens.device.type == "cpu":
            if entry.column_major is None:
                entry.column_major = (_column_major(decoder), entry.compile())
            # Column-major weights as they are, not packed for MKL: no freezing (it would pack
            # them; its packing passes cannot be switched off per graph once set up in a
            # process), the weights stay inputs of the graph. And the graph's wrapper code in
            # C++, not Python: a one-row step launches over a hundred small kernels, and Python's
            # per-launch cost was ~8% of the step (it doubles the compile time).
            (target, function), options = entry.column_major, {"freezing": False, "cpp_wrapper": True}
        # Read when a graph compiles, which can be any call (a new shape); patched per call rather
        # than set globally, so other compiled code in the process is not affected.
        with torch._inductor.config.patch(options):
            return function(target, tokens, *args)

    return step
