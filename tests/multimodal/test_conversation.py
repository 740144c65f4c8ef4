"""Conversations -> ids and labels, checked against transformers' own chat template rendering."""

import random

import pytest
import transformers

from lm.loss import IGNORE_INDEX
from multimodal.conversation import (
    caption_messages,
    messages_from_json,
    tokenize_conversation,
    tokenize_text,
)
from multimodal.prompts import CAPTION_PROMPTS, caption_prompt

IMAGE_ID, IMAGE_TOKENS = 6, 4


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tokenizer.save(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


def collapse_images(ids: list[int]) -> list[int]:
    """Undo the placeholder expansion: each run of IMAGE_TOKENS image ids back to one."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == IMAGE_ID:
            assert ids[i : i + IMAGE_TOKENS] == [IMAGE_ID] * IMAGE_TOKENS
            i += IMAGE_TOKENS
            out.append(IMAGE_ID)
        else:
            out.append(ids[i])
            i += 1
    return out


def learned_text(tokenizer, tokenized) -> list[str]:
    """The labelled runs, decoded with special tokens kept."""
    runs, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tokenizer.decode(current, skip_special_tokens=False))
    return runs


def test_caption_sample_golden(tokenizer, hf_tokenizer):
    messages = caption_messages("Un cercle vermell.", "ca")
    assert messages[0]["content"] == "<image>\nDescriu la imatge."
    tokenized = tokenize_conversation(messages, tokenizer, IMAGE_ID, IMAGE_TOKENS)
    assert tokenized.num_images == 1
    assert tokenized.input_ids.count(IMAGE_ID) == IMAGE_TOKENS
    as_text = [{**m, "content": m["content"].replace("<image>", "<|reserved_token_1|>")} for m in messages]
    expected = hf_tokenizer.apply_chat_template(as_text, tokenize=True, return_dict=False)
    if expected[0] != tokenizer.bos_id:
        expected = [tokenizer.bos_id, *expected]
    assert collapse_images(tokenized.input_ids) == expected
    assert learned_text(tokenizer, tokenized) == ["Un cercle vermell.<|im_end|>"]
    assert len(tokenized.labels) == len(tokenized.input_ids)


def test_two_turn_conversation_golden(tokenizer, hf_tokenizer):
    record = {"conversations": [
        {"from": "system", "value": "Respon en català."},
        {"from": "human", "value": "<image>\nQuè mostra aquesta imatge?"},
        {"from": "gpt", "value": "Un cercle vermell."},
        {"from": "human", "value": "I el fons?"},
        {"from": "gpt", "value": "Un fons blau."},
    ]}
    messages = messages_from_json(record)
    tokenized = tokenize_conversation(messages, tokenizer, IMAGE_ID, IMAGE_TOKENS)
    as_text = [{**m, "content": m["content"].replace("<image>", "<|reserved_token_1|>")} for m in messages]
    expected = hf_tokenizer.apply_chat_template(as_text, tokenize=True, return_dict=False)
    if expected[0] != tokenizer.bos_id:
        expected = [tokenizer.bos_id, *expected]
    assert collapse_images(tokenized.input_ids) == expected
    assert learned_text(tokenizer, tokenized) == ["Un cercle vermell.<|im_end|>", "Un fons blau.<|im_end|>"]


def test_generation_prompt_is_a_prefix_of_the_training_sample(tokenizer):
    messages = caption_messages("Un círculo rojo.", "es")
    full = tokenize_conversation(messages, tokenizer, IMAGE_ID, IMAGE_TOKENS)
    prompt = tokenize_conversation(messages[:1], tokenizer, IMAGE_ID, IMAGE_TOKENS, add_generation_prompt=True)
    assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert all(label == IGNORE_INDEX for label in prompt.labels)
    first_learned = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert first_learned == len(prompt.input_ids)


def test_messages_format_and_multimodal_parts():
    record = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]},
        {"role": "assistant", "content": "A star."},
    ]}
    assert messages_from_json(record) == [
        {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A star."}]


@pytest.mark.parametrize("record, match", [
    ({"text": "x"}, "neither 'conversations' nor 'messages'"),
    ({"conversations": []}, "empty"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user"}]}, "lacks"),
    ({"messages": [{"role": "user", "content": 3}]}, "not text"),
])
def test_bad_conversations_are_refused(record, match):
    with pytest.raises(ValueError, match=match):
        messages_from_json(record)


def test_placeholder_text_in_a_message_is_refused(tokenizer):
    messages = [{"role": "user", "content": "look <|reserved_token_1|>"}, {"role": "assistant", "content": "no"}]
    with pytest.raises(ValueError, match="contains the image placeholder token"):
        tokenize_conversation(messages, tokenizer, IMAGE_ID, IMAGE_TOKENS)


def test_text_only_sample_learns_everything_but_bos(tokenizer):
    tokenized = tokenize_text("Un cercle vermell.", tokenizer)
    assert tokenized.input_ids[0] == tokenizer.bos_id and tokenized.input_ids[-1] == tokenizer.eos_id
    assert tokenized.labels == [IGNORE_INDEX, *tokenized.input_ids[1:]]


def test_caption_prompts_cover_the_demo_languages():
    assert caption_prompt("ca") == "Descriu la imatge."
    rng = random.Random(0)
    assert {caption_prompt("es", rng) for _ in range(200)} == set(CAPTION_PROMPTS["es"])
    with pytest.raises(ValueError, match="no caption prompts for language 'xx'"):
        caption_prompt("xx")
