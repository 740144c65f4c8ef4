"""The demo's text-only chats for pre-training the decoder."""

from __future__ import annotations

import json

import webdataset as wds

from multimodal.conversation import IMAGE_MARKER
from multimodal.demo import chats as demo
from multimodal.demo import synthetic
from multimodal.prompts import CAPTION_PROMPTS

CAPTIONS = {
    synthetic.caption_of_content(content, language): (content, language)
    for content in synthetic.all_contents()
    for language in synthetic.LANGUAGES
}


def test_pretraining_chats_answer_in_the_asked_language_from_training_scenes_only():
    chats = demo.pretraining_chats(600, seed=0, described=0.5)
    assert len(chats) == 600
    described, languages = 0, set()
    for user, assistant in chats:
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert IMAGE_MARKER not in user["content"]
        content, language = CAPTIONS[assistant["content"]]
        languages.add(language)
        assert synthetic.split_of(content) == "train"  # no held-out caption reaches the decoder
        *context, prompt = user["content"].split("\n")
        assert prompt in CAPTION_PROMPTS[language]
        if context:
            described += 1
            given, _ = CAPTIONS[context[0]]
            assert given == content  # the description given is this scene's, in any language
    assert languages == set(synthetic.LANGUAGES)
    assert 240 < described < 360  # about half: binomial(600, 0.5) is within 60 of 300 but rarely
    assert demo.pretraining_chats(50, seed=0) == demo.pretraining_chats(50, seed=0)


def test_chat_shard_reads_back(tmp_path):
    chats = demo.pretraining_chats(20, seed=1)
    path = demo.write_chat_shard(tmp_path / "chats-000000.tar", chats)
    samples = list(wds.WebDataset(path, shardshuffle=False))
    assert [json.loads(s["json"])["messages"] for s in samples] == chats
