"""Text for the decoder: the pre-training chats (the stand-in for an instruct model's training), their
shard, and the corpus the demo's tokenizer is trained on."""

from __future__ import annotations

import json
import random
from pathlib import Path

from webdataset import TarWriter

from multimodal.conversation import IMAGE_MARKER, caption_messages
from multimodal.demo import synthetic
from multimodal.prompts import CAPTION_PROMPTS


def pretraining_chats(num: int, seed: int, described: float = 1.0) -> list[list[dict[str, str]]]:
    """`num` text-only chats for pre-training the decoder, from training scenes only: the user asks
    for a description in one language, the assistant answers with the caption in that language.
    In a share `described` of them the user turn first gives the scene's caption in a random
    language, where the image goes in a caption sample: the decoder learns the chat template, to
    answer in the asked language, and to re-express content found in the user turn. Stage 1 then
    only has to make the projected image read like such a description (a real Salamandra instruct
    model brings all three from its own training)."""
    rng = random.Random(f"chats:{seed}")
    chats = []
    for image_seed in synthetic.split_seeds("train", num, seed):
        drawn = synthetic.scene(image_seed)
        language = rng.choice(synthetic.LANGUAGES)
        messages = caption_messages(synthetic.describe(drawn, language), language, rng)
        context = synthetic.describe(drawn, rng.choice(synthetic.LANGUAGES)) if rng.random() < described else ""
        messages[0]["content"] = messages[0]["content"].replace(IMAGE_MARKER, context).lstrip("\n")
        chats.append(messages)
    return chats


def write_chat_shard(path: Path, chats: list[list[dict[str, str]]]) -> str:
    with TarWriter(str(path), encoder=False) as sink:
        for index, messages in enumerate(chats):
            sink.write({"__key__": f"chat-{index:08d}",
                        "json": json.dumps({"messages": messages}, ensure_ascii=False).encode()})
    return str(path)


def tokenizer_corpus(texts: list[str]) -> list[str]:
    """Captions, prompts and the ChatML role names, so every piece of a demo conversation has
    learned pieces (and never falls back to bytes)."""
    rng = random.Random(0)
    chats = []
    for text in texts[:2000]:
        language = synthetic.detect_language(text) or "en"
        chats += [m["content"] for m in caption_messages(text, language, rng)]
    # The demo's languages' prompts only (the project has prompts in all of Salamandra's).
    prompts = [p for language in synthetic.LANGUAGES for p in CAPTION_PROMPTS[language]] * 20
    return texts + chats + prompts + ["user\nassistant\nsystem\n"] * 50
