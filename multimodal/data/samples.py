"""One WebDataset sample (the files of one key) -> one tokenized, model-ready sample.

Three kinds, told apart by the files present (see DESIGN.md "Data format"):
- conversation: a `json` with `conversations` (LLaVA) or `messages` (role/content), any number of
  images (`jpg` / `jpeg` / `png` / `webp`, or `0.jpg`, `1.png`, ... in order);
- caption: an image and a `txt`; the user asks for a description (a prompt drawn from the pool of
  the sample's language) and the caption is the answer. img2dataset writes exactly this (its `json`
  is metadata without a conversation, and usually without a language);
- text: a `txt` without an image, a plain LM sample (or a `json` conversation without images).

The work is ordered cheapest first: text, JSON and tokenization (which knows the length, since an
image's token count is fixed) run before any image is decoded, so a too-long or malformed sample
costs no image decoding. In the anyres layout (SampleSettings.anyres) an image's token count
depends on its size and on whether it is alone in its sample: the sizes are read from the images'
headers (decode.image_size) between the text checks and the tokenization, so that a sample too long
once its images are counted is still refused before any pixel is decoded.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lm.loss import IGNORE_INDEX
from lm.tokenizer import Tokenizer
from multimodal.conversation import (
    IMAGE_MARKER,
    MarkerMismatch,
    TokenizedConversation,
    caption_messages,
    count_images,
    messages_from_json,
    tokenize_conversation,
    tokenize_text,
    with_image_markers,
)
from multimodal.data.anyres import AnyresImages
from multimodal.data.decode import (
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    BAD_CONVERSATION,
    BAD_IMAGE_NAMES,
    MISSING_TEXT,
    NO_LABELS,
    PLACEHOLDER_MISMATCH,
    TOO_LONG,
    UNKNOWN_LANGUAGE,
    SkipSample,
    decode_image,
    decode_json,
    decode_text,
    image_size,
)
from multimodal.layouts.geometry import Size
from multimodal.prompts import CAPTION_PROMPTS

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_NUMBERED_IMAGE = re.compile(r"(\d+)\.(" + "|".join(IMAGE_EXTENSIONS) + r")")


@dataclass
class TokenizedSample:
    """A sample ready to pack: ids and labels (placeholders expanded), its images in placeholder
    order, and its WebDataset key.

    Fixed layout: `images` holds one [3, H, W] tensor per image (through the encoder's transform)
    and `image_sizes` is None. Anyres layout: `images` holds each image's views, [views, 3, S, S]
    (its base view and tiles when it is alone in the sample, one square view each otherwise), and
    `image_sizes` each image's (height, width), as decoded (a list, empty for a text sample):
    together the sample's piece of a Batch's ImageInputs (packing.make_batch joins them)."""

    key: str
    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor]
    image_sizes: list[Size] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class SampleSettings:
    """What turning a raw sample into tokens needs; frozen and picklable, for DataLoader workers."""

    tokenizer: Tokenizer
    image_transform: Callable[[Image.Image], torch.Tensor] | None
    image_token_id: int
    num_image_tokens: int | None
    max_tokens: int
    seed: int = 0
    default_language: str = "en"
    # Image limits, checked on each image's header before it is decoded (see decode.decode_image).
    max_image_pixels: int = MAX_IMAGE_PIXELS
    min_image_side: int = MIN_IMAGE_SIDE
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    # JPEGs are decoded at reduced scale (libjpeg's draft mode), never below this side. None: the
    # transform's own image_size (an encoders.transforms.ImageTransform has one); 0: full decode.
    # The anyres layout always decodes in full (a tile grid follows the image's own size).
    decode_size: int | None = None
    # The anyres layout (data.anyres): then `image_transform` and `num_image_tokens` are unused (None).
    anyres: AnyresImages | None = None

    def __post_init__(self) -> None:
        if self.anyres is None:
            if self.num_image_tokens is None or self.image_transform is None:
                raise ValueError("the fixed layout needs num_image_tokens and image_transform (or give anyres)")
            return
        if self.num_image_tokens is not None:
            raise ValueError("an anyres layout counts each image's tokens from its size: num_image_tokens must be None")
        if self.decode_size:
            raise ValueError(f"decode_size {self.decode_size}: the anyres layout decodes images in full (its tiles "
                             "and token counts follow each image's own size); leave decode_size None or 0")

    def draft_size(self) -> int | None:
        """The side JPEG draft decoding must keep, or None for a full decode."""
        if self.anyres is not None:
            return None
        if self.decode_size is not None:
            return self.decode_size or None
        size = getattr(self.image_transform, "image_size", None)
        return size if isinstance(size, int) and size > 0 else None

    def decode_image(self, data: bytes) -> Image.Image:
        return decode_image(data, draft_size=self.draft_size(), max_pixels=self.max_image_pixels,
                            min_side=self.min_image_side, max_aspect_ratio=self.max_aspect_ratio)

    def image_size(self, data: bytes) -> Size:
        """(height, width) of the image decode_image gives (full decode), from its header alone."""
        return image_size(data, max_pixels=self.max_image_pixels, min_side=self.min_image_side,
                          max_aspect_ratio=self.max_aspect_ratio)


def image_fields(sample: Mapping[str, Any]) -> list[str]:
    """The sample's image file suffixes in placeholder order; SkipSample if the order is unclear."""
    single = [ext for ext in IMAGE_EXTENSIONS if ext in sample]
    numbered = []
    for name in sample:
        match = _NUMBERED_IMAGE.fullmatch(name)
        if match:
            numbered.append((int(match.group(1)), name))
    if single and numbered:
        raise SkipSample(BAD_IMAGE_NAMES, f"both {single[0]!r} and numbered images ({numbered[0][1]!r}, ...)")
    if len(single) > 1:
        raise SkipSample(BAD_IMAGE_NAMES, f"several unnumbered images {single}; number them 0.jpg, 1.jpg, ...")
    if single:
        return single
    numbered.sort()
    indices = [index for index, _ in numbered]
    if indices != list(range(len(indices))):
        # A gap means a lost image, and every later image would move to the wrong placeholder.
        raise SkipSample(BAD_IMAGE_NAMES, f"numbered images must be 0, 1, 2, ... without gaps; got {indices}")
    return [name for _, name in numbered]


def caption_language(record: Mapping[str, Any] | None, default_language: str) -> str:
    """The language of a caption: the sample json's "language" when present, else the default."""
    language = record.get("language") if record else None
    if language is None:
        return default_language
    if not isinstance(language, str) or language not in CAPTION_PROMPTS:
        raise SkipSample(UNKNOWN_LANGUAGE, f"{language!r}; caption prompts exist for {sorted(CAPTION_PROMPTS)}")
    return language


def prompt_rng(seed: int, key: str) -> random.Random:
    """The RNG that picks a caption's prompt: the same (seed, key) gives the same prompt in every
    run, worker and epoch (a str seed is hashed with SHA-512, not Python's per-process hash)."""
    return random.Random(f"caption-prompt:{seed}:{key}")


def sample_messages(sample: Mapping[str, Any], image_names: list[str],
                    settings: SampleSettings) -> list[dict[str, str]] | TokenizedConversation:
    """The messages of a raw sample whose images are `image_names` (not yet decoded), their image
    markers checked against the images; a plain text sample is tokenized here already."""
    record = decode_json(sample["json"]) if "json" in sample else None
    is_conversation = record is not None and ("conversations" in record or "messages" in record)

    if is_conversation:
        try:
            messages = messages_from_json(record)
        except ValueError as error:
            raise SkipSample(BAD_CONVERSATION, str(error)) from None
        try:
            messages = with_image_markers(messages, len(image_names))
        except MarkerMismatch as error:
            raise SkipSample(PLACEHOLDER_MISMATCH, str(error)) from None
        except ValueError as error:
            raise SkipSample(BAD_CONVERSATION, str(error)) from None
    elif "txt" in sample:
        text = decode_text(sample["txt"])
        if not image_names:
            return tokenize_text(text, settings.tokenizer)
        if len(image_names) != 1:
            raise SkipSample(PLACEHOLDER_MISMATCH, f"a caption is for one image, the sample has {len(image_names)}")
        language = caption_language(record, settings.default_language)
        messages = caption_messages(text, language, prompt_rng(settings.seed, sample["__key__"]))
        if count_images(messages) != 1:  # the caption itself contains "<image>"
            raise SkipSample(PLACEHOLDER_MISMATCH, f"the caption contains {IMAGE_MARKER}")
    else:
        raise SkipSample(MISSING_TEXT, "no txt and no json conversation")
    return messages


def tokenize_messages(messages: list[dict[str, str]] | TokenizedConversation, settings: SampleSettings,
                      counts: int | list[int]) -> TokenizedConversation:
    """Ids and labels of sample_messages' result, every image marker expanded to `counts` (the
    same for every image, or each image's own)."""
    if isinstance(messages, TokenizedConversation):
        return messages
    try:
        return tokenize_conversation(messages, settings.tokenizer, settings.image_token_id, counts)
    except ValueError as error:  # text that would break ChatML, or holds the placeholder token
        raise SkipSample(BAD_CONVERSATION, str(error)) from None


def tokenize_sample(sample: Mapping[str, Any], image_names: list[str], settings: SampleSettings,
                    counts: int | list[int] | None = None) -> TokenizedConversation:
    """Ids and labels of a raw sample whose images are `image_names` (not yet decoded), each image
    taking `counts` placeholders (default: the fixed layout's settings.num_image_tokens)."""
    counts = settings.num_image_tokens if counts is None else counts
    return tokenize_messages(sample_messages(sample, image_names, settings), settings, counts)


def check_tokens(tokens: TokenizedConversation, num_images: int, settings: SampleSettings,
                 counts: list[int] | None = None) -> None:
    """What the model relies on, checked on the final ids whatever path made them. `counts`: each
    image's token count (default: settings.num_image_tokens for every image)."""
    if len(tokens.input_ids) > settings.max_tokens:
        raise SkipSample(TOO_LONG, f"{len(tokens.input_ids)} tokens > max_tokens {settings.max_tokens}")
    # Plain text can spell the placeholder token (the tokenizer maps its text to the id); an image
    # placeholder without its image would make the model's forward pass fail on the whole batch.
    placeholders = tokens.input_ids.count(settings.image_token_id)
    if counts is None:
        if placeholders != num_images * settings.num_image_tokens:
            raise SkipSample(PLACEHOLDER_MISMATCH, f"{placeholders} placeholder tokens for {num_images} images "
                                                   f"of {settings.num_image_tokens}")
    elif len(counts) != num_images or placeholders != sum(counts):
        raise SkipSample(PLACEHOLDER_MISMATCH,
                         f"{placeholders} placeholder tokens for {num_images} images of {counts} tokens")
    # A batch of samples with nothing to learn has no loss at all (0 / 0).
    if all(label == IGNORE_INDEX for label in tokens.labels):
        raise SkipSample(NO_LABELS, "no assistant turn")


def to_tokenized_sample(sample: Mapping[str, Any], settings: SampleSettings) -> TokenizedSample:
    """A raw WebDataset sample (file suffix -> bytes, plus `__key__`) -> TokenizedSample.

    Raises SkipSample for anything that cannot be trained on.
    """
    image_names = image_fields(sample)
    if settings.anyres is not None:
        return anyres_sample(sample, image_names, settings)
    tokens = tokenize_sample(sample, image_names, settings)
    check_tokens(tokens, len(image_names), settings)
    images = [settings.image_transform(settings.decode_image(sample[name])) for name in image_names]
    return TokenizedSample(sample["__key__"], tokens.input_ids, tokens.labels, images)


def anyres_sample(sample: Mapping[str, Any], image_names: list[str], settings: SampleSettings) -> TokenizedSample:
    """to_tokenized_sample in the anyres layout: text and markers, then the images' sizes from their
    headers, then the ids with each image's own count (too long: refused here), then the pixels."""
    anyres = settings.anyres
    messages = sample_messages(sample, image_names, settings)
    sizes = [settings.image_size(sample[name]) for name in image_names]
    counts = anyres.token_counts(sizes)
    tokens = tokenize_messages(messages, settings, counts)
    check_tokens(tokens, len(image_names), settings, counts)
    images = [settings.decode_image(sample[name]) for name in image_names]
    decoded = [(image.height, image.width) for image in images]
    if decoded != sizes:
        # An orientation only decoding reveals (a PNG's EXIF block after its pixels): the decoded
        # image is what the model sees, so its size decides the counts.
        sizes, counts = decoded, anyres.token_counts(decoded)
        tokens = tokenize_messages(messages, settings, counts)
        check_tokens(tokens, len(image_names), settings, counts)
    return TokenizedSample(sample["__key__"], tokens.input_ids, tokens.labels, anyres.views(images), sizes)
