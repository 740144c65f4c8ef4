"""compiled_step chooses, per batch size on CPU, what runs: the weight layout whose products are
faster, and the uncompiled step where the compiled one is not faster. Every plan gives the eager
path's logits. Compiled with "aot_eager" (graph capture without inductor's code generation)."""

import pytest
import torch

from lm import Decoder, LMConfig, decode
from lm.decode import KVCache, compiled_step, static_step, step_plans


@pytest.fixture
def decoder():
    torch.manual_seed(0)
    model = Decoder(LMConfig.from_name("tiny", attention="sdpa")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0.0, param.shape[1] ** -0.5 if "embed" not in name else 1.0)
    return model


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setattr(decode, "COMPILE_BACKEND", "aot_eager")


def step_inputs(decoder, batch, width=5, slots=64):
    """A cache prefilled with `width` tokens per row, and the next step's arguments."""
    generator = torch.Generator().manual_seed(batch)
    cache = KVCache.allocate(decoder.config, batch, slots)
    prompt = torch.randint(0, decoder.config.vocab_size, (batch, width), generator=generator)
    decoder.hidden_states(prompt, cache=cache)
    tokens = torch.randint(0, decoder.config.vocab_size, (batch, 1), generator=generator)
    positions = torch.full((batch, 1), width)
    return cache, tokens, (positions, torch.tensor([width]), cache.valid, cache.keys, cache.values)


def timings(monkeypatch, faster):
    """_median_seconds made to report `faster` (a plan name) as the fastest candidate."""
    def fake(runs, repeats, calls=1):
        return {name: (0.5 if name == faster else 1.0) for name in runs}
    monkeypatch.setattr(decode, "_median_seconds", fake)


@pytest.mark.parametrize("batch, faster, expected", [
    (1, "column_major", "column_major"), (1, "eager", "eager"),
    (3, "frozen", "frozen"), (3, "onednn", "onednn"), (3, "column_major", "column_major"), (3, "eager", "eager"),
])
def test_the_faster_plan_runs_and_gives_the_eager_logits(decoder, monkeypatch, batch, faster, expected):
    timings(monkeypatch, faster)
    with torch.inference_mode():
        cache, tokens, args = step_inputs(decoder, batch)
        reference = static_step(decoder, tokens, *args)
        logits = compiled_step(decoder)(tokens, *args)
        again = compiled_step(decoder)(tokens, *args)  # chosen once per shape, then reused
    assert step_plans(decoder) == {(batch, 64, torch.float32, torch.device("cpu")): expected}
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, reference, rtol=1e-5, atol=1e-5)
    # Choosing ran the step several times; the cache holds what one run writes.
    with torch.inference_mode():
        once, _, once_args = step_inputs(decoder, batch)
        static_step(decoder, tokens, *once_args)
    for ours, theirs in zip(cache.keys + cache.values, once.keys + once.values):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_measured_choice_is_a_known_plan_per_shape(decoder):
    with torch.inference_mode():
        for batch in (1, 2):
            _, tokens, args = step_inputs(decoder, batch)
            compiled_step(decoder)(tokens, *args)
    plans = step_plans(decoder)
    assert set(plans) == {(b, 64, torch.float32, torch.device("cpu")) for b in (1, 2)}
    assert plans[(1, 64, torch.float32, torch.device("cpu"))] in {"column_major", "eager"}
    assert plans[(2, 64, torch.float32, torch.device("cpu"))] in {"frozen", "onednn", "column_major", "eager"}


@pytest.mark.skipif(not torch._C.has_mkl, reason="MKL's packed products are what freezing makes of fp32 weights")
def test_faster_layout_is_measured(decoder, monkeypatch):
    assert decode._faster_layout(decoder, 4) in {"frozen", "onednn", "column_major"}
    for layout in ("frozen", "onednn", "column_major"):
        timings(monkeypatch, layout)
        assert decode._faster_layout(decoder, 4) == layout
