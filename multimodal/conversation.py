"""Conversations -> token ids and labels: ChatML, image placeholder expansion, loss masking.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`;
`<image>` in a content marks where an image goes. Tokens carry a label only inside assistant turns
(the answer and its closing `<|im_end|>`), so the model learns to answer and to stop, never to
write prompts. Each `<image>` becomes `num_image_tokens` copies of the image placeholder token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from lm.loss import IGNORE_INDEX
from lm.tokenizer import Tokenizer, format_chatml
from multimodal.prompts import caption_prompt

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"  # a video, in models with a video token (the anyres layout)
# LLaVA's `conversations` speak of "human" and "gpt".
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    num_images: int


def messages_from_json(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """Messages from a LLaVA-style `conversations` list ({"from", "value"}) or a `messages` list
    ({"role", "content"}; content may also be a list of {"type": "text" | "image"} parts)."""
    if "conversations" in record:
        turns, role_key, content_key = record["conversations"], "from", "value"
    elif "messages" in record:
        turns, role_key, content_key = record["messages"], "role", "content"
    else:
        raise ValueError(f"json has neither 'conversations' nor 'messages' (keys: {sorted(record)})")
    if not isinstance(turns, list) or not turns:
        raise ValueError("the conversation is empty or not a list")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
            raise ValueError(f"turn {index} lacks {role_key!r} or {content_key!r}")
        role = ROLE_NAMES.get(turn[role_key])
        if role is None:
            raise ValueError(f"turn {index} has unknown role {turn[role_key]!r}")
        content = turn[content_key]
        if isinstance(content, list):  # multimodal parts, in order
            markers = {"image": IMAGE_MARKER, "video": VIDEO_MARKER}
            content = "".join(markers.get(part.get("type"), str(part.get("text", ""))) for part in content)
        if not isinstance(content, str):
            raise ValueError(f"turn {index} content is a {type(content).__name__}, not text")
        messages.append({"role": role, "content": content})
    return messages


def caption_messages(caption: str, language: str, rng: random.Random | None = None) -> list[dict[str, str]]:
    """A caption sample as a conversation: the user shows the image and asks; the caption answers."""
    return [
        {"role": "user", "content": f"{IMAGE_MARKER}\n{caption_prompt(language, rng)}"},
        {"role": "assistant", "content": caption},
    ]


def count_images(messages: Sequence[Mapping[str, str]], marker: str = IMAGE_MARKER) -> int:
    """The `<image>` markers of `messages` (or other markers: VIDEO_MARKER)."""
    return sum(m["content"].count(marker) for m in messages)


class MarkerMismatch(ValueError):
    """The `<image>` markers of a conversation do not match its images."""


def with_image_markers(messages: Sequence[Mapping[str, str]], num_images: int,
                       marker: str = IMAGE_MARKER) -> list[dict[str, str]]:
    """Check the `<image>` markers against the images. A conversation that has images but no marker
    at all gets them at the start of its first user turn (LLaVA's convention). Training data and
    inference both go through here, so the model sees images where it learned to.

    Raises MarkerMismatch when the counts differ, ValueError when there is no user turn."""
    messages = [dict(m) for m in messages]
    markers = count_images(messages, marker)
    what = marker.strip("<>")
    if markers == 0 and num_images > 0:
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"{num_images} {what}s but no user turn to put them in")
        messages[first_user]["content"] = f"{marker}\n" * num_images + messages[first_user]["content"]
    elif markers != num_images:
        raise MarkerMismatch(f"the messages hold {markers} {marker} markers but {num_images} {what}s were given")
    return messages


def tokenize_conversation(
    messages: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
    add_generation_prompt: bool = False,
    video_token_id: int | None = None,
    video_token_counts: Sequence[int] = (),
) -> TokenizedConversation:
    """BOS + ChatML ids, labels on assistant answers, `<image>` expanded to image placeholders:
    `num_image_tokens` for every image, or (a sequence) each image's own count, in order; and
    `<video>` to `video_token_id` placeholders, each video's count in `video_token_counts`.

    The whole text is encoded at once (so ids equal what the tokenizer gives for the full prompt,
    as at inference), and labels follow from the character offsets of the tokens.
    """
    image_token = tokenizer.id_to_token(image_token_id)
    video_token = None if video_token_id is None else tokenizer.id_to_token(video_token_id)
    for index, message in enumerate(messages):
        # The markers aside: a converted model's placeholder may be the marker itself ("<image>").
        content = str(message.get("content", "")).replace(IMAGE_MARKER, "").replace(VIDEO_MARKER, "")
        for what, token in (("image", image_token), ("video", video_token)):
            if token is not None and token in content:
                raise ValueError(f"message {index} contains the {what} placeholder token {token!r} as text")
    videos = count_images(messages, VIDEO_MARKER) if video_token is not None else 0
    if len(video_token_counts) != videos:
        raise MarkerMismatch(f"the messages hold {videos} {VIDEO_MARKER} markers but {len(video_token_counts)} "
                             "videos were given")
    with_images = [{**m, "content": m["content"].replace(IMAGE_MARKER, image_token)} for m in messages]
    if video_token is not None:
        with_images = [{**m, "content": m["content"].replace(VIDEO_MARKER, video_token)} for m in with_images]
    text = format_chatml(with_images, add_generation_prompt=add_generation_prompt)

    # Character spans of what is learned: each assistant content and its <|im_end|>.
    spans, cursor = [], 0
    for message in with_images:
        header = f"<|im_start|>{message['role']}\n"
        start = cursor + len(header)
        end = start + len(message["content"]) + len("<|im_end|>")
        if message["role"] == "assistant":
            spans.append((start, end))
        cursor = end + 1  # the newline after <|im_end|>

    expected = count_images(messages)
    counts = [num_image_tokens] * expected if isinstance(num_image_tokens, int) else list(num_image_tokens)
    if len(counts) != expected:
        raise MarkerMismatch(f"the messages hold {expected} {IMAGE_MARKER} markers but {len(counts)} images were given")
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    input_ids, labels, images, video = [tokenizer.bos_id], [IGNORE_INDEX], 0, 0
    for token_id, (start, stop) in zip(encoding.ids, encoding.offsets):
        if video_token is not None and token_id == video_token_id:
            input_ids += [video_token_id] * video_token_counts[video]
            labels += [IGNORE_INDEX] * video_token_counts[video]
            video += 1
            continue
        if token_id == image_token_id:
            if images < len(counts):
                input_ids += [image_token_id] * counts[images]
                labels += [IGNORE_INDEX] * counts[images]
            images += 1
            continue
        learned = any(stop > a and start < b for a, b in spans)
        input_ids.append(token_id)
        labels.append(token_id if learned else IGNORE_INDEX)
    if images != expected:
        raise ValueError(f"{expected} {IMAGE_MARKER} markers became {images} image tokens")
    return TokenizedConversation(input_ids, labels, images)


def tokenize_text(text: str, tokenizer: Tokenizer) -> TokenizedConversation:
    """A plain-text LM sample: BOS + text + EOS, every token after BOS learned."""
    ids = tokenizer.encode(text)
    return TokenizedConversation([tokenizer.bos_id, *ids, tokenizer.eos_id], [IGNORE_INDEX, *ids, tokenizer.eos_id], 0)
