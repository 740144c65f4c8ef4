"""Bytes -> Python values: text, JSON, RGB images; or a SkipSample that says why not.

Everything a shard holds is untrusted: a file can be truncated, mis-encoded or not what its
extension claims. Each decoder here either returns a clean value or raises `SkipSample` with a
short machine-readable reason, which the pipeline counts and logs; nothing else escapes for bad
input. The full matrix of bad inputs (and limits such as a stricter pixel budget) belongs here.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from multimodal import video

# Why a sample (or a shard) was skipped. The pipeline counts skips under these names, the training
# loop logs them, so they are part of the interface: add new ones, do not rename.
SHARD_ERROR = "shard_error"                # the shard could not be opened or its tar stream broke off
SPLIT_SAMPLE = "split_sample"              # a key's files are not contiguous in the tar
DUPLICATE_FILE = "duplicate_file"          # the same file name twice in one sample
MISSING_TEXT = "missing_text"              # neither txt nor a json conversation
EMPTY_TEXT = "empty_text"                  # txt with nothing but whitespace
NOT_UTF8 = "not_utf8"                      # txt or json that is not UTF-8
INVALID_JSON = "invalid_json"              # json that does not parse, or is not an object
BAD_CONVERSATION = "bad_conversation"      # malformed turns, unknown roles, text that breaks ChatML
UNKNOWN_LANGUAGE = "unknown_language"      # a caption in a language with no prompt pool
BAD_IMAGE_NAMES = "bad_image_names"        # images that cannot be put in order (0.jpg, 2.jpg; jpg + png)
PLACEHOLDER_MISMATCH = "placeholder_mismatch"  # <image> (<video>) markers do not match the images (videos)
NO_LABELS = "no_labels"                    # nothing to learn (no assistant turn)
TOO_LONG = "too_long"                      # more tokens than max_tokens
IMAGE_UNDECODABLE = "image_undecodable"    # truncated, corrupt or unknown image bytes
IMAGE_TOO_LARGE = "image_too_large"        # more pixels than max_pixels, refused from the header (bomb)
IMAGE_TOO_SMALL = "image_too_small"        # a side under min_side pixels (1x1 trackers, broken thumbnails)
IMAGE_EXTREME_ASPECT = "image_extreme_aspect"  # long side over max_aspect_ratio x the short one
# Videos (models with a video token; see samples.py for the two ways a sample holds one). The first
# three are multimodal.video's VideoError reasons, for a video file or for frames given as images.
VIDEO_UNDECODABLE = video.UNDECODABLE      # "video_undecodable": a video file PyAV cannot decode
VIDEO_NO_FRAMES = video.NO_FRAMES          # "video_no_frames": no video frame (sound only; "video": true, no image)
VIDEO_MIXED_SIZES = video.MIXED_SIZES      # "video_mixed_sizes": a video's frames differ in size
BAD_VIDEO_NAMES = "bad_video_names"        # video files that cannot be put in order (0.mp4, 2.mp4; mp4 + mkv),
                                           # or video files beside frames given as images ("video": true)
NO_VIDEO_TOKEN = "no_video_token"          # a video sample for a model without a video token
VIDEO_CAPTION = "video_caption"            # a video with a txt caption and no conversation (caption
                                           # prompts ask about an image)
UNEXPECTED_ERROR = "unexpected_error"      # a bug or an input nobody foresaw; logged with the exception


class SkipSample(Exception):
    """Raised for input that cannot become a training sample; `reason` is one of the names above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_text(data: bytes) -> str:
    """UTF-8 text, stripped; raises SkipSample for bytes that are not UTF-8 or hold no text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SkipSample(NOT_UTF8, str(error)) from None
    text = text.strip()
    if not text:
        raise SkipSample(EMPTY_TEXT)
    return text


def decode_json(data: bytes) -> dict[str, Any]:
    """A JSON object; raises SkipSample for bytes that are not UTF-8, not JSON, or not an object."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SkipSample(NOT_UTF8, f"json: {error}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise SkipSample(INVALID_JSON, str(error)) from None
    if not isinstance(record, dict):
        raise SkipSample(INVALID_JSON, f"expected an object, got {type(record).__name__}")
    return record


# Image formats a shard may hold, whatever the file's extension says (Pillow sniffs the content).
# Restricting Image.open keeps plugins with external tools or a history of parser bugs (EPS runs
# Ghostscript) away from untrusted bytes; TIFF stays for CMYK scans. A camera's multi-picture JPEG
# opens through JPEG (as format MPO, a JPEG subclass, so draft mode applies to it too).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
JPEG_FORMATS = ("JPEG", "MPO")

# Limits checked on the header, before any pixel is decoded. Defaults for SampleSettings.
MAX_IMAGE_PIXELS = 8192 * 8192  # 64 Mpx: above every camera photo; an RGB copy is 200 MB
MIN_IMAGE_SIDE = 8              # as demo.synthetic.render: below 8 px nothing in the image is recognisable
MAX_ASPECT_RATIO = 20.0         # beyond it, "shortest" (CLIP) crops away 95 % of the image, "squash"
                                # (SigLIP) stretches it 20x: either way the caption no longer fits


def _open_checked(data: bytes, max_pixels: int, min_side: int, max_aspect_ratio: float | None) -> Image.Image:
    """Image.open (the header only) and the header checks of decode_image; Pillow's errors escape."""
    with warnings.catch_warnings():
        # Pillow warns about sizes it considers bombs; the limit below refuses them instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    width, height = image.size
    if width * height > max_pixels:
        raise SkipSample(IMAGE_TOO_LARGE, f"{width}x{height} = {width * height} pixels > {max_pixels}")
    if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * max(min(width, height), 1):
        raise SkipSample(IMAGE_EXTREME_ASPECT, f"{width}x{height}: aspect ratio over {max_aspect_ratio:g}")
    if min(width, height) < min_side:
        raise SkipSample(IMAGE_TOO_SMALL, f"{width}x{height}: a side under {min_side} pixels")
    return image


def decode_image(data: bytes, *, draft_size: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                 min_side: int = 1, max_aspect_ratio: float | None = None) -> Image.Image:
    """An RGB image from encoded bytes, as a viewer shows it; raises SkipSample when it cannot be.

    - The header is checked first (Image.open reads nothing else): more than `max_pixels` pixels
      (a decompression bomb declares a huge size in a few bytes) is image_too_large, a side under
      `min_side` image_too_small, a ratio of sides over `max_aspect_ratio` image_extreme_aspect.
      None of these is decoded, so a bomb costs no memory.
    - `draft_size`: the side the encoder's transform resizes to. A JPEG is then decoded by libjpeg
      at 1/2, 1/4 or 1/8 scale, the smallest that keeps both sides >= draft_size (Image.draft's
      rule), so the transform never upsamples what a full decode would have downsampled.
    - The EXIF orientation is applied (phones store photos sideways and set a tag), then the image
      is converted to RGB by `to_rgb`. Only the first frame of an animation is used.
    """
    try:
        image = _open_checked(data, max_pixels, min_side, max_aspect_ratio)
        if draft_size is not None and image.format in JPEG_FORMATS:
            image.draft("RGB", (draft_size, draft_size))
        image.load()  # truncation and corrupt data show up here
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except Exception:  # noqa: BLE001 - a malformed EXIF block: the pixels are fine, keep them as stored
            pass
        return to_rgb(image)
    except Image.DecompressionBombError as error:  # Pillow's own guard (MAX_IMAGE_PIXELS), in open
        raise SkipSample(IMAGE_TOO_LARGE, str(error)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        # SyntaxError is what some Pillow plugins raise for malformed headers; a format outside
        # ACCEPTED_FORMATS is an UnidentifiedImageError.
        raise SkipSample(IMAGE_UNDECODABLE, f"{type(error).__name__}: {error}") from None


# EXIF orientations that turn an image a quarter (ImageOps.exif_transpose swaps its sides).
_QUARTER_TURNS = (5, 6, 7, 8)
_ORIENTATION = 0x0112


def image_size(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 1,
               max_aspect_ratio: float | None = None) -> tuple[int, int]:
    """(height, width) of the image decode_image (without draft_size) would return, read from the
    header alone, no pixel decoded: the same header checks and skip reasons as decode_image, and
    the sides swapped when the EXIF orientation turns the image a quarter.

    A PNG whose EXIF block comes after its pixels (Pillow sees it only on decoding) is read as
    stored; whoever relies on the size compares it with the decoded image's."""
    try:
        image = _open_checked(data, max_pixels, min_side, max_aspect_ratio)
        width, height = image.size
        orientation = 1
        # A PNG's getexif decodes the image when the header held no EXIF block.
        if image.format != "PNG" or "exif" in image.info:
            try:
                orientation = image.getexif().get(_ORIENTATION, 1)
            except Exception:  # noqa: BLE001 - malformed EXIF: decode_image keeps such pixels as stored
                orientation = 1
        return (width, height) if orientation in _QUARTER_TURNS else (height, width)
    except Image.DecompressionBombError as error:
        raise SkipSample(IMAGE_TOO_LARGE, str(error)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        raise SkipSample(IMAGE_UNDECODABLE, f"{type(error).__name__}: {error}") from None


# 16-bit grayscale comes in several spellings; "I" (32-bit) is what older Pillow versions and some
# TIFFs give for 16-bit data, so it is read on the same 0..65535 scale.
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a viewer would show it.

    Pillow's plain `convert("RGB")` gets two cases wrong for training: transparent pixels keep
    whatever colour they happen to store (often black), where a viewer shows the page behind them,
    white; and 16-bit grayscale is clipped at 255, turning most of the image white instead of
    scaling it down.

    Why white behind transparency: the image was made to be seen on a page, and web pages, viewers
    and document backgrounds are white by default, so the caption describes the image as seen on
    white. Black (Pillow's default for many palette files) would hide the black text and line art
    that transparent logos, icons and diagrams are mostly made of.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _WIDE_GRAY_MODES:
        gray = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def decode_video(data: bytes, frames_upbound: int) -> list[Image.Image]:
    """The RGB frames of a video file's bytes, sampled uniformly up to `frames_upbound`
    (multimodal.video.read_video, PyAV); SkipSample with the VideoError's reason (video_undecodable,
    video_no_frames, video_mixed_sizes) when it cannot be used."""
    try:
        return video.read_video(bytes(data), frames_upbound)
    except video.VideoError as error:
        raise SkipSample(error.reason, str(error)) from None
