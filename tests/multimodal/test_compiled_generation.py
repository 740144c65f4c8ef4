"""The compiled decoding path (GenerationConfig(compile=True)) gives exactly the eager path's tokens.

The tests compile with the "aot_eager" backend (graph capture, the static cache and the compiled
step's plumbing, in seconds); the inductor backend with frozen weights, which is what compile=True
runs by default, compiles for tens of seconds even at this size and is checked by the one test
enabled with SALAMANDRA_INDUCTOR_TESTS=1 (and by benchmarks/decode.py, which checks the tokens).
"""

import copy
import pickle

import pytest
import torch
from PIL import Image

from lm import decode
from multimodal.conversation import tokenize_conversation

RED = Image.new("RGB", (32, 32), (220, 30, 30))
BLUE = Image.new("RGB", (40, 32), (30, 30, 220))
QUESTIONS = ["Describe the image.", "Describe la imagen en español, por favor, con detalle.", "Un cercle?"]


@pytest.fixture
def model(vlm):
    # The tiny decoder's own init gives near-uniform logits (one token repeated, argmax decided by
    # rounding); weights of unit-scale activations give varied tokens with clear margins.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in vlm.decoder.named_parameters():
            if param.ndim == 2:
                param.normal_(0.0, param.shape[1] ** -0.5 if "embed" not in name else 1.0)
    return vlm


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(decode, "COMPILE_BACKEND", "aot_eager")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompts_and_pixels(model, count):
    """`count` prompts of different lengths (the first two with an image, the third text only)."""
    prompts, images = [], []
    for index in range(count):
        image = [RED, BLUE, None][index]
        content = ("<image>\n" if image else "") + QUESTIONS[index]
        prompts.append(tokenize_conversation([{"role": "user", "content": content}], model.tokenizer,
                                             model.image_token_id, model.num_image_tokens,
                                             add_generation_prompt=True).input_ids)
        images += [image] if image else []
    return prompts, model.preprocess(images)


def eager_and_compiled(model, count, **options):
    prompts, pixels = prompts_and_pixels(model, count)
    eager = model.generate(prompts, pixels, **options)
    compiled = model.generate(prompts, pixels, compile=True, **options)
    return eager, compiled


@pytest.mark.parametrize("count", [1, 3])
def test_compiled_greedy_tokens_equal_eager(model, aot_eager, count):
    eager, compiled = eager_and_compiled(model, count, max_new_tokens=12, stop_ids=())
    assert compiled == eager
    assert all(len(row) == 12 for row in eager)
    # The comparison means something: the rows differ, and tokens within a row vary.
    assert all(len(set(row)) > 3 for row in eager)
    if count > 1:
        assert len({tuple(row) for row in eager}) == count


def test_compiled_rows_stop_as_eager_rows_do(model, aot_eager):
    prompts, pixels = prompts_and_pixels(model, 3)
    eager = model.generate(prompts, pixels, max_new_tokens=12, stop_ids=())
    # Each row stops at its own third token.
    stops = tuple({row[2] for row in eager})
    stopped = model.generate(prompts, pixels, max_new_tokens=12, stop_ids=stops)
    assert stopped == model.generate(prompts, pixels, max_new_tokens=12, stop_ids=stops, compile=True)
    assert all(len(row) <= 2 for row in stopped)


def test_compiled_step_is_kept_and_rebuilt_for_new_weights(model, aot_eager):
    prompts, pixels = prompts_and_pixels(model, 1)
    first = model.generate(prompts, pixels, max_new_tokens=6, stop_ids=(), compile=True)
    entry = model.decoder.__dict__["_compiled_decode_step"]
    assert model.generate(prompts, pixels, max_new_tokens=6, stop_ids=(), compile=True) == first
    assert model.decoder.__dict__["_compiled_decode_step"] is entry
    assert "_compiled_decode_step" not in model.decoder.state_dict()

    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(-1.0)  # an in-place change: frozen weights would be stale
    changed = model.generate(prompts, pixels, max_new_tokens=6, stop_ids=(), compile=True)
    assert model.decoder.__dict__["_compiled_decode_step"] is not entry
    assert changed == model.generate(prompts, pixels, max_new_tokens=6, stop_ids=())
    assert changed != first

    # Copies and pickles do not carry the compiled code; they compile their own.
    assert copy.deepcopy(model.decoder).__dict__["_compiled_decode_step"] is None
    assert pickle.loads(pickle.dumps(model.decoder)).__dict__["_compiled_decode_step"] is None


def test_inductor_compiled_tokens_equal_eager(model):
    # The real compiler (C++ code through gcc): about 40 s with a cold cache, the suite's priciest
    # test, kept because the aot_eager tests above do not run inductor's weight packing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for count in (1, 3):
            eager, compiled = eager_and_compiled(model, count, max_new_tokens=12, stop_ids=())
            assert compiled == eager
    finally:
        torch.set_num_threads(threads)
