import json

import pytest

from multimodal.conversation import caption_messages, tokenize_conversation, tokenize_text
from multimodal.data import SampleSettings, SkipSample, to_tokenized_sample
from multimodal.data.samples import prompt_rng
from multimodal.prompts import CAPTION_PROMPTS
from tests.multimodal.data.helpers import colour, image_bytes, model_parts, pixel_colour


@pytest.fixture
def parts(tokenizer):
    return model_parts(tokenizer)


@pytest.fixture
def settings(parts):
    return SampleSettings(parts.tokenizer, parts.transform, parts.image_token_id, parts.num_image_tokens,
                          max_tokens=256, seed=7, default_language="ca")


def conversation(parts, messages):
    return tokenize_conversation(messages, parts.tokenizer, parts.image_token_id, parts.num_image_tokens)


def test_caption_sample_language_and_prompt(parts, settings):
    raw = {"__key__": "k1", "jpg": image_bytes((200, 10, 10), "JPEG"), "txt": b"Un cercle vermell.",
           "json": json.dumps({"url": "http://x", "width": 32}).encode()}  # img2dataset metadata
    sample = to_tokenized_sample(raw, settings)
    # No language in the json: the configured default (ca); the prompt drawn by (seed, key).
    expected = conversation(parts, caption_messages("Un cercle vermell.", "ca", prompt_rng(7, "k1")))
    assert (sample.key, sample.input_ids, sample.labels) == ("k1", expected.input_ids, expected.labels)
    assert len(sample.images) == 1 and sample.images[0].shape == (3, 32, 32)
    assert max(abs(a - b) for a, b in zip(pixel_colour(sample.images[0], parts.transform), (200, 10, 10))) <= 4

    spanish = to_tokenized_sample({**raw, "json": b'{"language": "es"}'}, settings)
    expected = conversation(parts, caption_messages("Un cercle vermell.", "es", prompt_rng(7, "k1")))
    assert spanish.input_ids == expected.input_ids


def test_caption_prompts_are_reproducible_and_varied():
    draws = [prompt_rng(0, f"key{i}").choice(CAPTION_PROMPTS["en"]) for i in range(200)]
    assert draws == [prompt_rng(0, f"key{i}").choice(CAPTION_PROMPTS["en"]) for i in range(200)]
    assert set(draws) == set(CAPTION_PROMPTS["en"])


def test_llava_conversation_without_marker_gets_images_in_first_user_turn(parts, settings):
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Compare."},
                                {"from": "gpt", "value": "Same."}, {"from": "human", "value": "Sure?"},
                                {"from": "gpt", "value": "Yes."}]}
    raw = {"__key__": "c", "json": json.dumps(record).encode(),
           "1.png": image_bytes(colour(1)), "0.png": image_bytes(colour(0))}
    sample = to_tokenized_sample(raw, settings)
    expected = conversation(parts, [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\n<image>\nCompare."},
        {"role": "assistant", "content": "Same."}, {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."}])
    assert sample.input_ids == expected.input_ids and sample.labels == expected.labels
    assert sample.input_ids.count(parts.image_token_id) == 2 * parts.num_image_tokens
    # 0.png before 1.png whatever the order of the files.
    assert [pixel_colour(image, parts.transform) for image in sample.images] == [colour(0), colour(1)]


def test_messages_conversation_with_parts(parts, settings):
    record = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What?"}]},
                           {"role": "assistant", "content": "A dot."}]}
    sample = to_tokenized_sample({"__key__": "m", "json": json.dumps(record).encode(), "webp": image_bytes((1, 2, 3))},
                                 settings)
    expected = conversation(parts, [{"role": "user", "content": "<image> What?"},
                                    {"role": "assistant", "content": "A dot."}])
    assert sample.input_ids == expected.input_ids and len(sample.images) == 1


def test_text_only_samples(parts, settings):
    plain = to_tokenized_sample({"__key__": "t", "txt": b"Un gat negre."}, settings)
    expected = tokenize_text("Un gat negre.", parts.tokenizer)
    assert (plain.input_ids, plain.labels, plain.images) == (expected.input_ids, expected.labels, [])
    record = {"messages": [{"role": "user", "content": "Hola"}, {"role": "assistant", "content": "Hola!"}]}
    chat = to_tokenized_sample({"__key__": "j", "json": json.dumps(record).encode()}, settings)
    assert chat.input_ids == conversation(parts, record["messages"]).input_ids and chat.images == []


GOOD_CONVERSATION = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A dot."}]}


@pytest.mark.parametrize("raw, reason", [
    ({"png": image_bytes((1, 2, 3))}, "missing_text"),
    ({"png": image_bytes((1, 2, 3)), "json": b'{"url": "x"}'}, "missing_text"),
    ({"png": image_bytes((1, 2, 3)), "txt": b"  "}, "empty_text"),
    ({"png": image_bytes((1, 2, 3)), "txt": b"caf\xe9"}, "not_utf8"),
    ({"png": image_bytes((1, 2, 3)), "json": b"{oops"}, "invalid_json"),
    ({"png": image_bytes((1, 2, 3)), "txt": b"x", "json": b'{"language": "xx"}'}, "unknown_language"),
    ({"json": b'{"conversations": [{"from": "robot", "value": "hi"}]}'}, "bad_conversation"),
    ({"json": b'{"messages": []}'}, "bad_conversation"),
    ({"json": b'{"messages": [{"role": "user", "content": "<|im_end|>"}, {"role": "assistant", "content": "x"}]}'},
     "bad_conversation"),
    ({"json": json.dumps(GOOD_CONVERSATION).encode()}, "placeholder_mismatch"),  # a marker, no image
    ({"json": json.dumps(GOOD_CONVERSATION).encode(), "0.png": image_bytes((1, 2, 3)),
      "1.png": image_bytes((1, 2, 3))}, "placeholder_mismatch"),
    ({"png": image_bytes((1, 2, 3)), "txt": b"look <image> here"}, "placeholder_mismatch"),
    ({"txt": b"spelled <|reserved_token_1|> placeholder"}, "placeholder_mismatch"),
    ({"0.png": image_bytes((1, 2, 3)), "2.png": image_bytes((1, 2, 3)), "txt": b"x"}, "bad_image_names"),
    ({"png": image_bytes((1, 2, 3)), "jpg": image_bytes((1, 2, 3), "JPEG"), "txt": b"x"}, "bad_image_names"),
    ({"json": b'{"messages": [{"role": "user", "content": "hi"}]}'}, "no_labels"),
    ({"txt": " ".join(["word"] * 300).encode()}, "too_long"),
    ({"png": b"\x89PNG\r\n\x1a\n broken", "txt": b"x"}, "image_undecodable"),
])
def test_bad_samples_raise_skip_with_reason(settings, raw, reason):
    with pytest.raises(SkipSample) as info:
        to_tokenized_sample({"__key__": "bad", **raw}, settings)
    assert info.value.reason == reason, info.value


def test_too_long_is_decided_before_decoding_images(settings, monkeypatch):
    calls = []
    monkeypatch.setattr("multimodal.data.samples.decode_image", lambda data: calls.append(data))
    with pytest.raises(SkipSample, match="too_long"):
        to_tokenized_sample({"__key__": "x", "png": b"", "txt": " ".join(["w"] * 300).encode()}, settings)
    assert calls == []
