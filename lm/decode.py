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
  MKL); kept on the decoder and rebuilt when its weights change. On CPU, which step runs for a
  batch size is measured on first use (`step_plans`): the weight layout whose products are faster
  on this CPU, and the eager step where the compiled one is not faster. `COMPILE_BACKEND` names the
  backend, `static_cache_size` the cache length that lets prompts of similar lengths share a graph.

A caller (multimodal.generation) runs the prefill eagerly over a KVCache of `static_cache_size`
slots, then each later step as `compiled_step(decoder)(tokens, position_ids, slot, cache.valid,
cache.keys, cache.values)`, stepping `slot` itself; or every step eagerly with `hidden_states`.
"""

from __future__ import annotations

import copy
import statistics
import time
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lm.attention import SeqLayout
from lm.config import LMConfig
from lm.model import Decoder, rotary_cos_sin

__all__ = [
    "CACHE_BUCKET", "COMPILE_BACKEND", "KVCache", "StaticKVStep", "compiled_step", "static_cache_size", "static_step",
    "step_plans",
]

# Static caches are this many slots long or a multiple of it, so that prompts of somewhat different
# lengths share one compiled step (the step attends over every slot, the unused ones masked).
CACHE_BUCKET = 64
# torch.compile backend of the compiled step, read when a decoder's step is built; tests may set
# "aot_eager" (same graph capture and static cache, no inductor code generation, so no freezing
# either) to compile in seconds.
COMPILE_BACKEND = "inductor"
# Timed runs of each candidate when a step plan is chosen (alternating; the median decides).
PLAN_REPEATS = 3


@dataclass
class KVCache:
    """Keys and values of earlier tokens, per layer, preallocated to `max_tokens`, head-major:
    [batch, kv_heads, max_tokens, head_dim], so that attention reads each head's keys and values
    as one contiguous block (token-major, [batch, max_tokens, kv_heads, head_dim], made a decoding
    step's attention at 8 rows about 1.5x slower on CPU).

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
        shape = (batch, config.n_kv_heads, max_tokens, config.head_dim)
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
        ones; return the keys and values to attend over ([B, Hkv, length + T, D]) and the step's
        mask (see `step_mask`)."""
        start, end = self.length, self.length + k.shape[1]
        self.keys[layer][:, :, start:end] = k.transpose(1, 2)
        self.values[layer][:, :, start:end] = v.transpose(1, 2)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], self.step_mask(k.shape[1])


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
        self.keys[layer].index_copy_(2, self.slot, k.transpose(1, 2))
        self.values[layer].index_copy_(2, self.slot, v.transpose(1, 2))
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
        # Built on first use: the column-major copy and its own step; the step whose batch dimension
        # is dynamic (its own code object and graphs).
        self.column_major: tuple[Decoder, Callable[..., torch.Tensor]] | None = None
        self.onednn: Callable[..., torch.Tensor] | None = None
        # (batch, cache slots, dtype, device) -> a plan (see step_plans), chosen by _choose_plan.
        self.plans: dict[tuple, str] = {}
        # batch -> the fp32 weight layout measured fastest (_faster_layout): it depends on the batch
        # and the linear shapes only, not on the cache length of a plan's shape.
        self.layouts: dict[int, str] = {}

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
    eagerly. Freezing makes the weights constants of the graph (on CPU, copies packed for MKL, or
    for oneDNN when the graph's batch dimension is dynamic); the other CPU layout is column-major
    copies of the weights (`_column_major`), always used for one row; each copy takes the
    decoder's linear weight memory once more. On CPU the first call at each shape also chooses
    what runs (`_choose_plan`, a second or two besides the compilation): the layout whose products
    are fastest on this CPU, and the uncompiled step where the compiled one is not faster;
    `step_plans(decoder)` says what was chosen. So
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
        valid, keys = args[2], args[3]
        shape = (tokens.shape[0], valid.shape[1], keys[0].dtype, tokens.device)
        plan = entry.plans.get(shape)
        if plan is None:
            plan = entry.plans[shape] = _choose_plan(decoder, entry, tokens, args)
        return _run_plan(decoder, entry, plan, tokens, args)

    return step


def step_plans(decoder: Decoder) -> dict[tuple, str]:
    """What `compiled_step(decoder)` runs for each (batch, cache slots, dtype, device) it has met:
    "frozen" (compiled, weights frozen in; on CPU packed for MKL in fp32, for oneDNN in bf16),
    "onednn" (compiled, frozen with the batch dimension dynamic, which makes inductor pack fp32
    weights for oneDNN instead of MKL), "column_major" (compiled over column-major copies of the
    weights) or "eager" (`static_step` uncompiled, where that was faster)."""
    entry = decoder.__dict__.get("_compiled_decode_step")
    return dict(entry.plans) if entry is not None else {}


def _run_plan(decoder: Decoder, entry: _CompiledStep, plan: str, tokens: torch.Tensor, args: tuple) -> torch.Tensor:
    if plan == "eager":
        return static_step(decoder, tokens, *args)
    target, function, options = decoder, entry.function, {"freezing": True}
    if plan == "column_major":
        if entry.column_major is None:
            entry.column_major = (_column_major(decoder), entry.compile())
        # Column-major weights as they are, not packed for MKL: no freezing (it would pack them;
        # its packing passes cannot be switched off per graph once set up in a process), the
        # weights stay inputs of the graph. And the graph's wrapper code in C++, not Python: a
        # one-row step launches over a hundred small kernels, and Python's per-launch cost was ~8%
        # of the step (it doubles the compile time).
        (target, function), options = entry.column_major, {"freezing": False, "cpp_wrapper": True}
    elif plan == "onednn":
        if entry.onednn is None:
            entry.onednn = entry.compile()
        # Freezing packs fp32 weights for MKL when the batch size is a constant of the graph and for
        # oneDNN when it is symbolic: at a few rows oneDNN's products were up to 1.8x faster on an
        # AVX-512 EPYC. The packing is tuned for the batch size of the first call. C++ wrapper code,
        # as for column-major weights: Python's kernel launches were ~6% of an 8-row step.
        function, options = entry.onednn, {"freezing": True, "cpp_wrapper": True}
        for tensor in (tokens, args[0], args[2], *args[3], *args[4]):
            torch._dynamo.mark_dynamic(tensor, 0)
    # Read when a graph compiles, which can be any call (a new shape); patched per call rather
    # than set globally, so other compiled code in the process is not affected.
    with torch._inductor.config.patch(options):
        return function(target, tokens, *args)


def _choose_plan(decoder: Decoder, entry: _CompiledStep, tokens: torch.Tensor, args: tuple) -> str:
    """The step to run at this shape, on its first call. On CUDA: the frozen graph. On CPU: the
    weight layout whose products are fastest here (one row: column-major; several rows in fp32:
    measured, `_faster_layout`), compiled, then timed against the eager step, and the faster of the
    two. What is faster differs between CPUs (AVX2 or AVX-512, MKL's and oneDNN's code paths for
    the vendor) and batch sizes. The runs compute this step's logits and write its keys and values to the same
    slot each time, so they leave the cache as one run would."""
    batch = tokens.shape[0]
    if tokens.device.type != "cpu":
        return "frozen"
    if batch == 1:
        layout = "column_major"
    elif args[3][0].dtype == torch.float32 and torch._C.has_mkl and torch._C._has_mkldnn:
        if batch not in entry.layouts:
            entry.layouts[batch] = _faster_layout(decoder, batch)
        layout = entry.layouts[batch]
    else:
        layout = "frozen"
    runs = {layout: lambda: _run_plan(decoder, entry, layout, tokens, args),
            "eager": lambda: static_step(decoder, tokens, *args)}
    for run in runs.values():
        run()  # the compiled step compiles here
    seconds = _median_seconds(runs, PLAN_REPEATS)
    return min(seconds, key=seconds.get)


def _faster_layout(decoder: Decoder, batch: int) -> str:
    """"frozen" (MKL's packed copy, which freezing makes of fp32 weights), "onednn" (oneDNN's
    packed copy, see _run_plan) or "column_major": the layout whose products of `batch` rows are
    fastest on this CPU, summed over the decoder's linear shapes as often as a step runs each. At 8
    rows on an AVX-512 EPYC oneDNN's product for a 16k-wide head took 2.5 ms, MKL's packed one 4.6
    and a plain one 6.1; with AVX2 only, 3.5, 4.7 and 6.0: no CPU-independent rule says which
    wins. Each weight is timed on at most 2^24 of its elements (the time scaled up), so the copies
    stay small."""
    counts: Counter = Counter()
    weights: dict[tuple[int, int], torch.Tensor] = {}
    for module in decoder.modules():
        if isinstance(module, torch.nn.Linear):
            counts[tuple(module.weight.shape)] += 1
            weights.setdefault(tuple(module.weight.shape), module.weight.detach())
    totals = {"frozen": 0.0, "onednn": 0.0, "column_major": 0.0}
    for (rows, width), weight in weights.items():
        part = weight[:max(1, min(rows, 2**24 // width))]
        x = torch.randn(batch, width, dtype=weight.dtype)
        mkl = torch.ops.mkl._mkl_reorder_linear_weight(part, batch)
        onednn = torch.ops.mkldnn._reorder_linear_weight(part, batch)
        column = part.t().contiguous().t()
        runs = {"frozen": lambda: torch.ops.mkl._mkl_linear(x, mkl, part, None, batch),
                "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], ""),
                "column_major": lambda: torch.nn.functional.linear(x, column)}
        for run in runs.values():
            run()
        for name, seconds in _median_seconds(runs, 5, calls=3).items():
            totals[name] += counts[(rows, width)] * seconds * rows / part.shape[0]
    return min(totals, key=totals.get)


def _median_seconds(runs: dict[str, Callable[[], object]], repeats: int, calls: int = 1) -> dict[str, float]:
    """Median wall time of `calls` calls of each run; the runs alternate, so that a slow stretch of
    a shared machine hits each alike."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}
