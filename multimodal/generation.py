"""KV-cached decoding for VisionLanguageModel: greedy and sampling, stop tokens, batches, streaming.

Several prompts of different lengths decode together. They are left-padded to one width so that
every row's next token is written to the same cache slot; the cache's `valid` mask hides the padding
slots from attention, and explicit position ids start each prompt at 0, so a padded row computes
exactly what the prompt alone would (up to float rounding). Image placeholders are spliced by
`model.embed` in the prefill pass, as in training; later steps only embed the new text token.

Each row stops on its own at a stop token (`<|im_end|>` or EOS by default), which is not returned,
after `max_new_tokens`, or where its prompt and answer fill the decoder's context (max_seq_len);
each answer says which (`finish_reason`). Decoding ends when every row has stopped.

`GenerationConfig(compile=True)` (or `model.generate(..., compile=True)`) runs the decoding steps
after the first as one `torch.compile`d graph, gpt-fast style: the prefill stays eager; each later
step (one new token per row -> next-token logits) runs at fixed shapes over a static cache, inductor
fuses the element-wise work, and freezing folds the weights in as constants (on CPU, packed for
MKL). That step is the decoder's own business: `lm.decode.compiled_step` (and its docstring for
when it compiles; on CPU it measures, per batch size, which weight layout is faster on this CPU and
whether the compiled step beats the eager one, and runs the faster).

The model is anything of the `GenerativeModel` shape (a `VisionLanguageModel`), so this module
does not import multimodal.model, which imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch

from lm import Decoder
from lm.decode import KVCache, compiled_step, static_cache_size
from lm.tokenizer import Tokenizer

__all__ = ["FINISH_REASONS", "GeneratedIds", "GeneratedText", "GenerationConfig", "GenerativeModel", "IncrementalDecoder",
           "TextStream", "generate", "generation_config", "stream"]


class GenerativeModel(Protocol):
    """What generation needs of a model (`multimodal.VisionLanguageModel` is one): its decoder and
    tokenizer, `embed` (token embeddings with the images' tokens spliced in at their placeholders),
    its encoder (the pixels are cast to its dtype) and `modules()` (put in eval mode per step)."""

    decoder: Decoder
    tokenizer: Tokenizer
    encoder: torch.nn.Module

    def embed(self, input_ids: torch.Tensor, pixels: Any) -> torch.Tensor: ...

    def modules(self) -> Iterator[torch.nn.Module]: ...


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick new tokens.

    temperature 0 is greedy (argmax; top_p and seed are then unused). Otherwise logits are divided
    by the temperature and sampled from the smallest set of most likely tokens whose probability
    reaches top_p (nucleus sampling; 1.0 keeps the whole vocabulary). A seed makes sampling
    reproducible, per prompt: each row of a batch draws from its own generator seeded with it, so
    a prompt gets the same answer alone or batched with others; without one the global torch RNG
    is used. stop_ids None means the tokenizer's
    `<|im_end|>` and EOS; an empty tuple never stops early.

    compile=True decodes with a compiled step function (see the module docstring and
    `lm.decode.compiled_step`): the same tokens as eager up to float rounding (identical greedy tokens in the
    tests and benchmarks/decode.py), faster per token, but the first call for a model and shape
    compiles for seconds to a minute. Meant for inference with fixed weights.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.stop_ids is not None:
            object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    def resolved_stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        return (tokenizer.im_end_id, tokenizer.eos_id) if self.stop_ids is None else self.stop_ids


def generation_config(config: GenerationConfig | None = None, **options: Any) -> GenerationConfig:
    """`config` with `options` (GenerationConfig field names) replacing its values; a misspelt option
    is an error rather than silently ignored."""
    names = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown generation options {unknown}; valid: {sorted(names)}")
    base = config or GenerationConfig()
    return GenerationConfig(**{**{n: getattr(base, n) for n in names}, **options})


@contextlib.contextmanager
def _inference(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode and inference_mode for one stretch of work, then every module's own training flag
    back (a frozen encoder may sit in eval while the rest trains). Entered per step rather than
    around a whole stream, so a caller holding a stream iterator is never left in inference mode.
    `modules` is the model's module list, walked once per decode: only modules in training mode
    are switched, so a model already in eval (the usual case) costs one flag read per module, where
    `model.eval()` and the restore wrote every module's flag (milliseconds per decoding step)."""
    training = [module for module in modules if module.training]
    for module in training:
        module.training = False
    try:
        with torch.inference_mode():
            yield
    finally:
        for module in training:
            module.training = True


def _select(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from fp32 logits [B, V]."""
    if config.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    # Stable sort: among equal probabilities the lowest id comes first, as with argmax, so a tiny
    # top_p gives exactly the greedy choice.
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    # A token stays when the more likely ones fall short of top_p; the first always stays.
    sorted_probs = sorted_probs.masked_fill(mass_before >= config.top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice)[:, 0]


def _check_prompts(model: GenerativeModel, prompts: Sequence[Sequence[int]],
                   configs: Sequence[GenerationConfig]) -> list[int]:
    """The most new tokens each prompt may get: its max_new_tokens, or fewer where the prompt and
    its answer would pass the decoder's context (max_seq_len); a prompt that fills it is refused."""
    if len(prompts) == 0:
        raise ValueError("no prompts to generate from: pass at least one list of token ids")
    limit = model.decoder.config.max_seq_len
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty; a prompt needs at least one token (BOS)")
        if len(prompt) >= limit:
            raise ValueError(
                f"prompt {index} has {len(prompt)} tokens, which fills the decoder's context of {limit} tokens "
                "(max_seq_len) and leaves no room for an answer: shorten the prompt (less text, fewer images)"
            )
    return [min(config.max_new_tokens, limit - len(prompt)) for prompt, config in zip(prompts, configs)]


def _select_rows(logits: torch.Tensor, configs: Sequence[GenerationConfig],
                 generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Next token per row, each row with its own settings and random stream: what a row draws
    depends on its own logits and seed only, never on the other rows of the batch."""
    if all(config.temperature == 0 for config in configs):
        return logits.argmax(-1)
    return torch.cat([_select(logits[row:row + 1], config, generator)
                      for row, (config, generator) in enumerate(zip(configs, generators))])


def decode_steps(
    model: GenerativeModel, prompts: Sequence[Sequence[int]], pixels: torch.Tensor | None,
    config: GenerationConfig | Sequence[GenerationConfig], reasons: list[str | None],
) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token, or None for a row that has stopped (the stop token
    itself is never yielded). Model work runs under `_inference`, which is never held over a yield.

    `config`: one for all rows, or one per row (each row its own length limit, sampling settings,
    seed and stop tokens; `compile` must agree). A sampled row draws from its own generator seeded
    with its config's seed, so its answer is the same alone or beside others.

    A row stops at a stop token, after max_new_tokens, or when its prompt and answer fill the
    decoder's context; `reasons` (one entry per prompt, None) receives why, as each row stops:
    "stop", "length" or "context" (see FINISH_REASONS). A caller may set a row's reason itself
    (e.g. "cancelled") between steps: the row then yields nothing more, and decoding ends when
    every row has a reason."""
    configs = [config] * len(prompts) if isinstance(config, GenerationConfig) else list(config)
    if len(configs) != len(prompts):
        raise ValueError(f"{len(configs)} generation configs for {len(prompts)} prompts")
    if len({c.compile for c in configs}) > 1:
        raise ValueError("the rows of one batch must agree on compile")
    budgets = _check_prompts(model, prompts, configs)
    decoder = model.decoder
    weight = decoder.model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    stop_sets = [set(c.resolved_stop_ids(model.tokenizer)) for c in configs]
    generators = [torch.Generator(device=device).manual_seed(c.seed) if c.temperature > 0 and c.seed is not None
                  else None for c in configs]
    compile = configs[0].compile

    batch, width = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    modules = list(model.modules())
    with _inference(modules):
        pad_id = model.tokenizer.pad_id
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + [int(t) for t in p] for p in prompts], device=device)
        # Row r's first real token sits in column width - len(r) and gets position 0; the padding
        # columns get negative numbers, clamped (they are masked out and never attended to).
        position_ids = torch.arange(width, device=device)[None, :] - (width - lengths)[:, None]
        # Rows decode in step; a row whose context ends first is carried along, its outputs unused.
        slots = width + max(budgets)
        if compile:
            slots = static_cache_size(slots)
        cache = KVCache.allocate(decoder.config, batch, slots, device=device, dtype=dtype)
        cache.valid[:, :width] = position_ids >= 0
        position_ids = position_ids.clamp(min=0)
        if pixels is not None:
            pixels = pixels.to(device=device, dtype=next(model.encoder.parameters()).dtype)
        embeds = model.embed(input_ids, pixels)
        hidden = decoder.hidden_states(inputs_embeds=embeds, position_ids=position_ids, cache=cache)
        # Left padding puts every row's last prompt token in the last column; the output head (256k
        # wide for Salamandra) runs on that column only.
        logits = decoder.lm_head(hidden[:, -1]).float()
        tokens = _select_rows(logits, configs, generators)
    # Positions of the token each row decodes next; stepped in place rather than rebuilt per step.
    position_ids = lengths[:, None].clone()
    if compile:
        compiled = compiled_step(decoder)
        # The cache slot of the next token: the same for every row (left padding), a tensor so the
        # compiled graph does not change from step to step.
        slot = torch.tensor([width], device=device)

    for step in range(max(budgets)):
        # One host sync per step: stopping needs to know anyway.
        new: list[int | None] = []
        for row, token in enumerate(tokens.tolist()):
            if reasons[row] is None and token in stop_sets[row]:
                reasons[row] = "stop"
            new.append(token if reasons[row] is None else None)
            if reasons[row] is None and step + 1 == budgets[row]:
                reasons[row] = "length" if budgets[row] == configs[row].max_new_tokens else "context"
        yield new
        if all(reason is not None for reason in reasons):
            return
        with _inference(modules):
            # A stopped row keeps decoding; its outputs are ignored, and a batch is not worth
            # reshaping mid-flight.
            if compile:
                logits = compiled(tokens[:, None], position_ids, slot, cache.valid, cache.keys, cache.values)
                slot += 1
            else:
                hidden = decoder.hidden_states(tokens[:, None], position_ids=position_ids, cache=cache)
                logits = decoder.lm_head(hidden[:, -1]).float()
            tokens = _select_rows(logits, configs, generators)
            position_ids += 1


def generate(
    model: GenerativeModel, prompts: Sequence[Sequence[int]], pixels: torch.Tensor | None = None,
    config: GenerationConfig | Sequence[GenerationConfig] | None = None,
) -> list[GeneratedIds]:
    """New token ids for each prompt (stop token excluded), decoding all prompts in one batch; each
    list also says why it ended (`finish_reason`: "stop", "length" or "context"). `config`: one for
    every prompt, or one per prompt (decode_steps).

    prompts: token ids, each image already expanded to its placeholders (as
    `tokenize_conversation` gives them). pixels: the images of all prompts in prompt order ([N, 3,
    H, W] in the fixed layout, ImageInputs with views and videos in the anyres layout), or None. An answer ends at the end of the decoder's context (max_seq_len) if it gets
    there first. Raises ValueError for no prompts, an empty prompt, or a prompt that alone fills the
    context.
    """
    config = config or GenerationConfig()
    outputs: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    for step_tokens in decode_steps(model, prompts, pixels, config, reasons):
        for row, token in enumerate(step_tokens):
            if token is not None:
                outputs[row].append(token)
    return [GeneratedIds(ids, reason) for ids, reason in zip(outputs, reasons)]


# Why an answer ended: a stop token, max_new_tokens, or the end of the decoder's context.
FINISH_REASONS = ("stop", "length", "context")


class GeneratedIds(list):
    """The new token ids of one prompt (a list of int) and why they ended: `finish_reason` is "stop"
    (a stop token, not included), "length" (max_new_tokens were generated) or "context" (the prompt
    and the answer filled the decoder's max_seq_len)."""

    def __init__(self, ids: Iterable[int] = (), finish_reason: str = "stop") -> None:
        super().__init__(ids)
        self.finish_reason = finish_reason


class GeneratedText(str):
    """A generated answer (a str) with its `finish_reason` (as in `GeneratedIds`) and, for a chat,
    `dropped_messages`: how many of its oldest messages, counted from the first one after the
    leading system messages, were left out to fit the decoder's context (0: none)."""

    finish_reason: str
    dropped_messages: int

    def __new__(cls, text: str, finish_reason: str = "stop", dropped_messages: int = 0) -> GeneratedText:
        self = super().__new__(cls, text)
        self.finish_reason = finish_reason
        self.dropped_messages = dropped_messages
        return self


class IncrementalDecoder:
    """Turns token ids, fed one by one, into text pieces whose concatenation is the decode of all ids.

    A character outside the vocabulary arrives as several byte-fallback tokens (``<0xF0>`` ...), and
    the decoder turns each run of consecutive byte tokens into text as a whole: valid UTF-8 becomes
    its characters, anything else one U+FFFD per byte. So the text of a run can change with every
    byte that joins it (a complete emoji becomes four U+FFFD when a stray byte follows). Text is
    therefore emitted only up to the last token that closes a run: one that is neither a byte token
    nor a special token (special tokens are dropped before decoding, so bytes on both sides of one
    join into a single run). `finish` emits the rest.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        self._run_tokens = {vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in vocab}
        self._run_tokens |= {i for i, token in tokenizer.backend.get_added_tokens_decoder().items() if token.special}

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self.ids[-1] in self._run_tokens:
            return ""
        # Decoding the whole text each time costs microseconds per hundred tokens, negligible next
        # to a decoder step, and needs no assumption about how the pieces of a suffix would join.
        return self._emit(self.tokenizer.decode(self.ids))

    def finish(self) -> str:
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> str:
        # Text before a closed run is final with the byte-fallback decoders Salamandra's tokenizers
        # use; the check guards against a decoder that would rewrite it, by waiting for it to settle.
        if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece


def stream(
    model: GenerativeModel, prompt: Sequence[int], pixels: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
) -> TextStream:
    """Text pieces of one prompt's answer as its tokens arrive; joined, they equal
    `model.tokenizer.decode(generate(model, [prompt], pixels, config)[0])`. Pieces are never empty."""
    return TextStream(model, prompt, pixels, config or GenerationConfig())


class TextStream:
    """An iterator of the text pieces of one answer (see `stream`). Once it is exhausted,
    `finish_reason` says why the answer ended ("stop", "length" or "context"; None before);
    `dropped_messages` is as in `GeneratedText` (set by `VisionLanguageModel.stream_chat`)."""

    def __init__(
        self, model: GenerativeModel, prompt: Sequence[int], pixels: torch.Tensor | None,
        config: GenerationConfig, dropped_messages: int = 0,
    ) -> None:
        self.finish_reason: str | None = None
        self.dropped_messages = dropped_messages
        self._pieces = self._generate(model, prompt, pixels, config)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _generate(
        self, model: GenerativeModel, prompt: Sequence[int], pixels: torch.Tensor | None, config: GenerationConfig,
    ) -> Iterator[str]:
        reasons: list[str | None] = [None]
        text = IncrementalDecoder(model.tokenizer)
        for (token,) in decode_steps(model, [prompt], pixels, config, reasons):
            if token is None:
                break
            piece = text.push(token)
            if piece:
                yield piece
        self.finish_reason = reasons[0]
        rest = text.finish()
        if rest:
            yield rest
