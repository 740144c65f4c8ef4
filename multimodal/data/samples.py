"""One WebDataset sample (the files of one key) -> one tokenized, model-ready sample.

Three kinds, told apart by the files present (see DESIGN.md "Data format"):
- conversation: a `json` with `conversations` (LLaVA) or `messages` (role/content), any number of
  images (`jpg` / `jpeg` / `png` / `webp`, or `0.jpg`, `1.png`, ... in order);
- caption: an image and a `txt`; the user asks for a description (a prompt drawn from the pool of
  the sample's language) and the caption is the answer. img2dataset writes exactly this (its `json`
  is metadata without a conversation, and usually without a language);
- text: a `txt` without an image, a plain LM sample (or a `json` conversation without images).

Videos (models with a video token, which needs the anyres layout) come in a conversation, as a file
(`mp4` / `mkv` / `webm` / `avi` / `mov`, or `0.mp4`, `1.mkv`, ... in order, beside any images)
read with PyAV up to the layout's frames_upbound, or as one video's frames given as images: a json
with `"video": true` makes the sample's images (`0.jpg`, `1.jpg`, ...) the frames of one video,
sampled the same way. `<video>` (or a {"type": "video"} part) marks where a video goes; without
markers, the videos go at the start of the first user turn, after the images (as chat puts them).

The work is ordered cheapest first: text, JSON and tokenization (which knows the length, since an
image's token count is fixed) run before any image is decoded, so a too-long or malformed sample
costs no image decoding. In the anyres layout (SampleSettings.anyres) an image's token count
depends on its size and on whether it is alone in its sample: the sizes are read from the images'
headers (decode.image_size) between the text checks and the tokenization, so that a sample too long
once its images are counted is still refused before any pixel is decoded. A video given as
images is counted from its frames' headers the same way. A video file's frames are known only by
decoding it: such a sample is first checked with one frame per video (the least a video takes: too
long or nothing to learn is still refused before decoding), then decoded, then tokenized.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from lm.loss import IGNORE_INDEX
from lm.tokenizer import Tokenizer
from multimodal.conversation import (
    IMAGE_MARKER,
    VIDEO_MARKER,
    MarkerMismatch,
    TokenizedConversation,
    caption_messages,
    count_images,
    messages_from_json,
    tokenize_conversation,
    tokenize_text,
    with_image_markers,
)
from multimodal.layouts.anyres import AnyresImages
from multimodal.data.decode import (
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    BAD_CONVERSATION,
    BAD_IMAGE_NAMES,
    BAD_VIDEO_NAMES,
    MISSING_TEXT,
    NO_LABELS,
    NO_VIDEO_TOKEN,
    PLACEHOLDER_MISMATCH,
    TOO_LONG,
    UNKNOWN_LANGUAGE,
    VIDEO_CAPTION,
    VIDEO_MIXED_SIZES,
    VIDEO_NO_FRAMES,
    SkipSample,
    decode_image,
    decode_json,
    decode_text,
    decode_video,
    image_size,
)
from multimodal.layouts.geometry import Size
from multimodal.prompts import CAPTION_PROMPTS
from multimodal.video import uniform_frame_indices

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_NUMBERED_IMAGE = re.compile(r"(\d+)\.(" + "|".join(IMAGE_EXTENSIONS) + r")")
VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "avi", "mov")
_NUMBERED_VIDEO = re.compile(r"(\d+)\.(" + "|".join(VIDEO_EXTENSIONS) + r")")


@dataclass
class TokenizedSample:
    """A sample ready to pack: ids and labels (placeholders expanded), its images in placeholder
    order, and its WebDataset key.

    Fixed layout: `images` holds one [3, H, W] tensor per image (through the encoder's transform)
    and `image_sizes` is None. Anyres layout: `images` holds each image's views, [views, 3, S, S]
    (its base view and tiles when it is alone in the sample, one square view each otherwise), and
    `image_sizes` each image's (height, width), as decoded (a list, empty for a text sample):
    together the sample's piece of a Batch's ImageInputs (packing.make_batch joins them).
    `video_frames` (anyres, models with a video token): each video's frames in video placeholder
    order, [F, 3, S, S] views (the frames' own pixels are not kept)."""

    key: str
    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor]
    image_sizes: list[Size] | None = None
    video_frames: list[torch.Tensor] = field(default_factory=list)

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
    # The anyres layout (layouts.anyres): then `image_transform` and `num_image_tokens` are unused (None).
    anyres: AnyresImages | None = None
    # The model's video placeholder (anyres layout only); None: video samples are skipped (no_video_token).
    video_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.video_token_id is not None:
            if self.anyres is None:
                raise ValueError("videos need the anyres layout (its pooled frames): give anyres with video_token_id")
            if self.video_token_id == self.image_token_id:
                raise ValueError(f"video_token_id and image_token_id are the same token ({self.image_token_id})")
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
    return _ordered_fields(sample, IMAGE_EXTENSIONS, _NUMBERED_IMAGE, BAD_IMAGE_NAMES, "image")


def video_fields(sample: Mapping[str, Any]) -> list[str]:
    """The sample's video file suffixes in placeholder order (`mp4`, or `0.mp4`, `1.mkv`, ...,
    numbered apart from the images); SkipSample if the order is unclear."""
    return _ordered_fields(sample, VIDEO_EXTENSIONS, _NUMBERED_VIDEO, BAD_VIDEO_NAMES, "video")


def _ordered_fields(sample: Mapping[str, Any], extensions: tuple[str, ...], numbered_name: re.Pattern,
                    reason: str, what: str) -> list[str]:
    single = [ext for ext in extensions if ext in sample]
    numbered = []
    for name in sample:
        match = numbered_name.fullmatch(name)
        if match:
            numbered.append((int(match.group(1)), name))
    if single and numbered:
        raise SkipSample(reason, f"both {single[0]!r} and numbered {what}s ({numbered[0][1]!r}, ...)")
    if len(single) > 1:
        raise SkipSample(reason, f"several unnumbered {what}s {single}; number them 0.{extensions[0]}, "
                                 f"1.{extensions[0]}, ...")
    if single:
        return single
    numbered.sort()
    indices = [index for index, _ in numbered]
    if indices != list(range(len(indices))):
        # A gap means a lost image, and every later image would move to the wrong placeholder.
        raise SkipSample(reason, f"numbered {what}s must be 0, 1, 2, ... without gaps; got {indices}")
    return [name for _, name in numbered]


@dataclass(frozen=True)
class SampleMedia:
    """What a raw sample shows, by file suffix, in placeholder order: `images`; `videos`, video
    files; `frames`, the images of a `"video": true` sample, one video's frames (then `images` is
    empty), else None."""

    images: list[str]
    videos: list[str]
    frames: list[str] | None = None

    @property
    def num_videos(self) -> int:
        return len(self.videos) + (self.frames is not None)


def sample_media(images: list[str], videos: list[str], record: Mapping[str, Any] | None) -> SampleMedia:
    """The media of a raw sample with image files `images` and video files `videos` (image_fields,
    video_fields) whose json (if any) is `record`: with `"video": true`, the images are one video's
    frames."""
    if record is None or record.get("video") is not True:
        return SampleMedia(images, videos)
    if videos:
        raise SkipSample(BAD_VIDEO_NAMES, f'"video": true makes the images one video\'s frames, but the sample '
                                          f"also holds video files {videos}")
    return SampleMedia([], [], images)


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


def read_record(sample: Mapping[str, Any]) -> dict[str, Any] | None:
    """The sample's json object, or None without one."""
    return decode_json(sample["json"]) if "json" in sample else None


_UNREAD = object()


def sample_messages(sample: Mapping[str, Any], image_names: list[str], settings: SampleSettings,
                    num_videos: int = 0, record: Any = _UNREAD) -> list[dict[str, str]] | TokenizedConversation:
    """The messages of a raw sample whose images are `image_names` (not yet decoded) and which
    holds `num_videos` videos, their image (and, for a model with a video token, video) markers
    checked against them; a plain text sample is tokenized here already. `record`: the sample's
    json, when read already (read_record)."""
    record = read_record(sample) if record is _UNREAD else record
    is_conversation = record is not None and ("conversations" in record or "messages" in record)

    if is_conversation:
        try:
            messages = messages_from_json(record)
        except ValueError as error:
            raise SkipSample(BAD_CONVERSATION, str(error)) from None
        try:
            if settings.video_token_id is not None:
                # Videos first, so that unmarked images end up before them (as chat puts them).
                messages = with_image_markers(messages, num_videos, VIDEO_MARKER)
            messages = with_image_markers(messages, len(image_names))
        except MarkerMismatch as error:
            raise SkipSample(PLACEHOLDER_MISMATCH, str(error)) from None
        except ValueError as error:
            raise SkipSample(BAD_CONVERSATION, str(error)) from None
    elif "txt" in sample:
        text = decode_text(sample["txt"])
        if num_videos:
            raise SkipSample(VIDEO_CAPTION, "a video needs a json conversation; caption prompts ask about an image")
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
                      counts: int | list[int], video_counts: list[int] | tuple[int, ...] = ()) -> TokenizedConversation:
    """Ids and labels of sample_messages' result, every image marker expanded to `counts` (the
    same for every image, or each image's own) and every video marker to its video's count."""
    if isinstance(messages, TokenizedConversation):
        return messages
    try:
        return tokenize_conversation(messages, settings.tokenizer, settings.image_token_id, counts,
                                     video_token_id=settings.video_token_id, video_token_counts=video_counts)
    except MarkerMismatch as error:  # a caption that spells <video>
        raise SkipSample(PLACEHOLDER_MISMATCH, str(error)) from None
    except ValueError as error:  # text that would break ChatML, or holds the placeholder token
        raise SkipSample(BAD_CONVERSATION, str(error)) from None


def tokenize_sample(sample: Mapping[str, Any], image_names: list[str], settings: SampleSettings,
                    counts: int | list[int] | None = None, record: Any = _UNREAD) -> TokenizedConversation:
    """Ids and labels of a raw sample whose images are `image_names` (not yet decoded), each image
    taking `counts` placeholders (default: the fixed layout's settings.num_image_tokens)."""
    counts = settings.num_image_tokens if counts is None else counts
    return tokenize_messages(sample_messages(sample, image_names, settings, record=record), settings, counts)


def check_tokens(tokens: TokenizedConversation, num_images: int, settings: SampleSettings,
                 counts: list[int] | None = None, video_counts: list[int] | tuple[int, ...] = ()) -> None:
    """What the model relies on, checked on the final ids whatever path made them. `counts`: each
    image's token count (default: settings.num_image_tokens for every image); `video_counts`: each
    video's (models with a video token)."""
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
    if settings.video_token_id is not None:
        videos = tokens.input_ids.count(settings.video_token_id)
        if videos != sum(video_counts):
            raise SkipSample(PLACEHOLDER_MISMATCH, f"{videos} video placeholder tokens for {len(video_counts)} "
                                                   f"videos of {list(video_counts)} tokens")
    elif video_counts:
        raise SkipSample(NO_VIDEO_TOKEN, f"{len(video_counts)} videos for a model without a video token")
    # A batch of samples with nothing to learn has no loss at all (0 / 0).
    if all(label == IGNORE_INDEX for label in tokens.labels):
        raise SkipSample(NO_LABELS, "no assistant turn")


def to_tokenized_sample(sample: Mapping[str, Any], settings: SampleSettings) -> TokenizedSample:
    """A raw WebDataset sample (file suffix -> bytes, plus `__key__`) -> TokenizedSample.

    Raises SkipSample for anything that cannot be trained on.
    """
    image_names, video_names = image_fields(sample), video_fields(sample)
    record = read_record(sample)
    media = sample_media(image_names, video_names, record)
    if media.num_videos:
        if settings.video_token_id is None:
            raise SkipSample(NO_VIDEO_TOKEN, f"{media.num_videos} video(s), but the model has no video token "
                                             "(ModelSpec.video_token)")
        if media.frames is not None and not media.frames:
            raise SkipSample(VIDEO_NO_FRAMES, '"video": true but the sample holds no frame (0.jpg, 1.jpg, ...)')
    if settings.anyres is not None:
        return anyres_sample(sample, media, settings, record)
    tokens = tokenize_sample(sample, media.images, settings, record=record)
    check_tokens(tokens, len(media.images), settings)
    images = [settings.image_transform(settings.decode_image(sample[name])) for name in media.images]
    return TokenizedSample(sample["__key__"], tokens.input_ids, tokens.labels, images)


def anyres_sample(sample: Mapping[str, Any], media: SampleMedia, settings: SampleSettings,
                  record: Mapping[str, Any] | None) -> TokenizedSample:
    """to_tokenized_sample in the anyres layout: text and markers, then the images' sizes from their
    headers (and a video's frames given as images: their sizes and how many are kept), then the ids
    with each image's and video's own count (too long: refused here), then the pixels. A video file
    is decoded after a first check with one frame per video, its views made at once (its frames are
    not kept), and the sample tokenized again with its frame count. `record`: the sample's json."""
    anyres = settings.anyres
    image_names = media.images
    messages = sample_messages(sample, image_names, settings, media.num_videos, record)
    sizes = [settings.image_size(sample[name]) for name in image_names]
    counts = anyres.token_counts(sizes)
    frame_names = None if media.frames is None else video_frame_names(sample, media.frames, settings)
    if frame_names is not None:
        video_counts = [anyres.video_tokens(len(frame_names))]
    else:  # a file's frame count is known once decoded: first the least it can take, one frame
        video_counts = [anyres.video_tokens(1)] * len(media.videos)
    tokens = tokenize_messages(messages, settings, counts, video_counts)
    check_tokens(tokens, len(image_names), settings, counts, video_counts)
    videos: list[torch.Tensor] = []
    if media.videos:
        videos = [anyres.video_views(decode_video(sample[name], anyres.frames_upbound)) for name in media.videos]
        video_counts = [anyres.video_tokens(frames.shape[0]) for frames in videos]
        tokens = tokenize_messages(messages, settings, counts, video_counts)
        check_tokens(tokens, len(image_names), settings, counts, video_counts)
    elif frame_names is not None:
        frames = [settings.decode_image(sample[name]) for name in frame_names]
        if len({frame.size for frame in frames}) > 1:  # an orientation only decoding reveals
            raise SkipSample(VIDEO_MIXED_SIZES, "the frames differ in size once decoded: "
                                                f"{sorted({frame.size for frame in frames})} (width, height)")
        videos = [anyres.video_views(frames)]
        del frames
    images = [settings.decode_image(sample[name]) for name in image_names]
    decoded = [(image.height, image.width) for image in images]
    if decoded != sizes:
        # An orientation only decoding reveals (a PNG's EXIF block after its pixels): the decoded
        # image is what the model sees, so its size decides the counts.
        sizes, counts = decoded, anyres.token_counts(decoded)
        tokens = tokenize_messages(messages, settings, counts, video_counts)
        check_tokens(tokens, len(image_names), settings, counts, video_counts)
    return TokenizedSample(sample["__key__"], tokens.input_ids, tokens.labels, anyres.views(images), sizes, videos)


def video_frame_names(sample: Mapping[str, Any], frames: list[str], settings: SampleSettings) -> list[str]:
    """The frames (image suffixes, in order) of a video given as images that the model sees: every
    frame's header read (the image checks; all of one size, else video_mixed_sizes), then sampled
    uniformly up to the layout's frames_upbound, as a video file's frames are."""
    sizes = [settings.image_size(sample[name]) for name in frames]
    if len(set(sizes)) > 1:
        raise SkipSample(VIDEO_MIXED_SIZES, f"frames of different sizes (height, width): {sorted(set(sizes))}")
    return [frames[i] for i in uniform_frame_indices(len(frames), settings.anyres.frames_upbound)]
