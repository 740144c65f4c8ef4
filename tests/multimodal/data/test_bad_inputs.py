"""The bad-input matrix through the real data path (issue 5).

One shard set holds every kind of bad input among good samples: images that cannot be decoded or
must not be (truncated, empty, not an image, decompression bombs, 1x1, 1x4000), images that need a
repair (CMYK, 16-bit, palette with transparency, grayscale, EXIF-rotated), text that cannot be
trained on (missing, empty, not UTF-8, invalid JSON, no assistant turn, placeholder mismatch, too
long), and a second shard whose tar breaks off. build_dataset must deliver every good sample with
its own text and pixels, the repaired ones repaired, and count each bad one under its reason.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from webdataset import TarWriter

from encoders.transforms import image_transform
from multimodal.data import DataConfig, build_dataset
from multimodal.data.decode import SkipSample, decode_image
from tests.multimodal.data.helpers import colour, model_parts


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def solid(rgb, size=(32, 32), mode="RGB") -> Image.Image:
    return Image.new(mode, size, rgb)


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what Pillow cannot save (16-bit RGB) or should not (a bomb)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png16_rgb(rgb16: tuple[int, int, int], size: int = 32) -> bytes:
    row = b"\x00" + struct.pack(">3H", *rgb16) * size  # filter byte 0, then big-endian samples
    return png(size, size, 16, 2, row * size)


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).resize(size, Image.Resampling.BICUBIC)


def caption(key: str, image: bytes, ext: str = "jpg", text: str | None = None) -> dict[str, bytes]:
    return {"__key__": key, ext: image, "txt": (text if text is not None else f"A red circle about {key}.").encode()}


def conversation(key: str, turns: list[tuple[str, str]], **images: bytes) -> dict[str, bytes]:
    record = {"conversations": [{"from": who, "value": what} for who, what in turns]}
    return {"__key__": key, "json": json.dumps(record).encode(), **{name.replace("_", "."): data
                                                                   for name, data in images.items()}}


class Good:
    """A sample that must arrive: its key's mark in its text, and images close to `references`
    (what the decoder should make of them, before the encoder transform) within `tolerance`:
    mean absolute difference in 0..255 levels after the transform."""

    def __init__(self, references: list[Image.Image], tolerance: float = 3.0) -> None:
        self.references = references
        self.tolerance = tolerance


# EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise to be shown upright.
# A photo taken upright is stored rotated back: Pillow's ROTATE_90 (counter-clockwise).
UPRIGHT = photo("chelsea", (64, 96))           # a portrait photo as the viewer shows it


def exif_jpeg(upright: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def build_shards(directory) -> tuple[list[str], dict[str, Good], Counter]:
    """The shard set: every bad kind between good samples; a second shard that breaks off."""
    good: dict[str, Good] = {}
    bad: Counter = Counter()
    samples: list[dict[str, bytes]] = []

    def add_good(files, references, tolerance=3.0):
        samples.append(files)
        good[files["__key__"]] = Good(references, tolerance)

    def add_bad(files, reason):
        samples.append(files)
        bad[reason] += 1

    def good_caption(index: int) -> None:  # solid colour unique to the index, JPEG or PNG
        key, rgb = f"g{index:03d}", colour(index)
        fmt, ext = ("JPEG", "jpg") if index % 2 else ("PNG", "png")
        add_good(caption(key, encode(solid(rgb), fmt, quality=95), ext), [solid(rgb)])

    astronaut = photo("astronaut", (640, 480))
    astronaut_jpeg = encode(astronaut, "JPEG", quality=90)
    gray_photo = Image.fromarray(skdata.camera()).resize((64, 64), Image.Resampling.BICUBIC)
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    palette.paste(1, (16, 0, 32, 32))
    palette_seen = Image.new("RGB", (32, 32), (255, 255, 255))
    palette_seen.paste((200, 10, 20), (16, 0, 32, 32))
    long_text = "A red circle on a blue background. " * 100

    index = 0
    bad_and_repaired = [
        # --- images that cannot or must not be decoded
        lambda: add_bad(caption("b_truncated_jpeg", astronaut_jpeg[: len(astronaut_jpeg) // 2]), "image_undecodable"),
        lambda: add_bad(caption("b_zero_byte", b""), "image_undecodable"),
        lambda: add_bad(caption("b_not_an_image", b"<html><body>404 Not Found</body></html>"), "image_undecodable"),
        # 9000 x 9000 declares 81 Mpx (over the 64 Mpx limit, under Pillow's own guard); its IDAT is
        # cut, so decoding it would say image_undecodable: image_too_large proves the header check.
        lambda: add_bad(caption("b_bomb", png(9000, 9000, 8, 0, b"\x00" * 100), "png"), "image_too_large"),
        lambda: add_bad(caption("b_bomb_huge", png(100_000, 100_000, 8, 0, b"\x00" * 100), "png"), "image_too_large"),
        lambda: add_bad(caption("b_1x1", encode(solid((9, 9, 9), (1, 1))), "png"), "image_too_small"),
        lambda: add_bad(caption("b_1x4000", encode(solid((9, 9, 9), (1, 4000))), "png"), "image_extreme_aspect"),
        # --- text that cannot be trained on
        lambda: add_bad({"__key__": "b_no_caption", "png": encode(solid((1, 2, 3)))}, "missing_text"),
        lambda: add_bad(caption("b_empty_caption", encode(solid((1, 2, 3))), "png", ""), "empty_text"),
        lambda: add_bad(caption("b_space_caption", encode(solid((1, 2, 3))), "png", " \n\t "), "empty_text"),
        lambda: add_bad({"__key__": "b_latin1", "png": encode(solid((1, 2, 3))), "txt": "Un cercle vermell, cafè.".encode("latin-1")},
                        "not_utf8"),
        lambda: add_bad({"__key__": "b_json", "png": encode(solid((1, 2, 3))), "json": b'{"conversations": [{"from": '},
                        "invalid_json"),
        lambda: add_bad(conversation("b_no_assistant", [("human", "<image>\nWhat is this?")], png=encode(solid((1, 2, 3)))),
                        "no_labels"),
        lambda: add_bad(conversation("b_placeholders", [("human", "<image> and <image>?"), ("gpt", "Two.")],
                                     png=encode(solid((1, 2, 3)))), "placeholder_mismatch"),
        lambda: add_bad(caption("b_too_long", encode(solid((1, 2, 3))), "png", long_text), "too_long"),
        # --- images repaired
        lambda: add_good(caption("r_cmyk", encode(solid((0, 255, 255, 0), mode="CMYK"), "JPEG", quality=95)),
                         [solid((255, 0, 0))], tolerance=8.0),
        lambda: add_good(caption("r_png16_gray", encode(Image.fromarray(np.full((32, 32), 100 * 257, np.uint16))), "png"),
                         [solid((100, 100, 100))], tolerance=0.5),
        lambda: add_good(caption("r_png16_rgb", png16_rgb((200 * 257, 50 * 257, 10 * 257)), "png"),
                         [solid((200, 50, 10))], tolerance=0.5),
        lambda: add_good(caption("r_palette_alpha", encode(palette, transparency=0), "png"), [palette_seen], tolerance=0.5),
        lambda: add_good(caption("r_gray", encode(gray_photo, "JPEG", quality=95)), [gray_photo.convert("RGB")], 4.0),
        lambda: add_good(caption("r_exif", exif_jpeg(UPRIGHT)), [UPRIGHT], tolerance=4.0),
        # --- good samples of other kinds
        lambda: add_good(caption("g_photo", astronaut_jpeg), [astronaut], tolerance=2.5),  # decoded in draft mode
        lambda: add_good(conversation("g_two_images", [("human", "<image> or <image>?"), ("gpt", "The first about g_two_images.")],
                                      **{"0_png": encode(solid(colour(500, 0))), "1_jpg": encode(solid(colour(500, 1)), "JPEG", quality=95)}),
                         [solid(colour(500, 0)), solid(colour(500, 1))]),
        lambda: add_good({"__key__": "g_text", "txt": b"Un cercle vermell about g_text."}, []),
    ]
    for add in bad_and_repaired:  # a good sample before each one
        good_caption(index)
        index += 1
        add()
    good_caption(index)

    first = str(directory / "bad-000.tar")
    with TarWriter(first) as writer:
        for files in samples:
            writer.write(files)

    def cut_shard(path, prefix: str, colour_base: int, count: int, cut_at: str, inside: bool, arrive: int) -> None:
        """`count` solid-colour captions; the tar cut at member `cut_at`: halfway into its data
        (inside) or right before its header. The first `arrive` samples are expected to arrive."""
        with TarWriter(str(path)) as writer:
            for number in range(count):
                key, rgb = f"{prefix}{number:03d}", colour(colour_base + number)
                writer.write(caption(key, encode(solid(rgb, (64, 64)), "PNG"), "png"))
                if number < arrive:
                    good[key] = Good([solid(rgb, (64, 64))])
        whole = path.read_bytes()
        with tarfile.open(path) as tar:
            member = next(m for m in tar.getmembers() if m.name == cut_at)
        path.write_bytes(whole[: member.offset_data + member.size // 2] if inside else whole[: member.offset])
        bad["shard_error"] += 1

    # The second shard breaks off inside its fourth sample's image. The shard is counted once
    # (shard_error); the cut sample is dropped, and so is the one before it: read_shard completes
    # a sample only when the next key's file has been read whole, so it cannot tell that t002 had
    # all its files. Two arrive.
    second = directory / "bad-001.tar"
    cut_shard(second, "t", 600, 6, "t003.png", inside=True, arrive=2)
    # The third breaks off exactly between two members, where Python's tarfile sees a normal end:
    # the missing end-of-archive marker gives it away. The samples before the cut all arrive.
    third = directory / "bad-002.tar"
    cut_shard(third, "u", 700, 4, "u002.png", inside=False, arrive=2)
    return [first, str(second), str(third)], good, bad


def levels(a: torch.Tensor, b: torch.Tensor, transform) -> float:
    """Mean absolute difference of two transformed images, in 0..255 levels."""
    std = torch.tensor(transform.std).view(3, 1, 1)
    return float(((a - b).abs() * std).mean() * 255)


def arrived(dataset, parts) -> tuple[dict[str, tuple[str, list[torch.Tensor]]], Counter]:
    """key -> (decoded text, image tensors) of every sample in the Batches, and the skip counts."""
    samples, skips = {}, Counter()
    for batch in dataset:
        keys = batch.keys
        skips.update(batch.skipped)
        image_index = 0
        for r, (row_keys, lengths) in enumerate(zip(keys, batch.layout.seq_lens)):
            start = 0
            for key, length in zip(row_keys, lengths):
                ids = batch.input_ids[r, start:start + length].tolist()
                start += length
                count = ids.count(parts.image_token_id) // parts.num_image_tokens
                images = [batch.pixels[image_index + i] for i in range(count)]
                image_index += count
                assert key not in samples, f"{key} arrived twice"
                samples[key] = (parts.tokenizer.decode(ids), images)
    return samples, skips


def test_bad_input_matrix(tokenizer, tmp_path, caplog):
    parts = model_parts(tokenizer)
    transform = parts.transform
    shards, good, bad = build_shards(tmp_path)
    config = DataConfig(shards, max_tokens=256, rows_per_batch=2, shuffle_buffer=0)
    dataset = build_dataset(config, tokenizer, transform, parts.image_token_id, parts.num_image_tokens)
    with caplog.at_level("WARNING", logger="multimodal.data"):
        samples, skips = arrived(dataset, parts)

    assert sorted(samples) == sorted(good)  # every good one, nothing else
    for key, expected in good.items():
        text, images = samples[key]
        assert f"about {key}" in text, (key, text)
        assert len(images) == len(expected.references), key
        for got, reference in zip(images, expected.references):
            error = levels(got, transform(reference), transform)
            assert error <= expected.tolerance, (key, error)
    assert skips == bad  # exact counts per reason, nothing under unexpected_error

    # Each skip is logged with its shard and key (the shard alone for a broken tar).
    for key in ("b_truncated_jpeg", "b_bomb", "b_1x4000", "b_latin1", "b_too_long"):
        assert any(shards[0] in record.getMessage() and f"key {key} " in record.getMessage()
                   for record in caplog.records), key
    assert any(shards[1] in r.getMessage() and "shard_error" in r.getMessage() for r in caplog.records)


def test_repairs_are_not_vacuous(tokenizer):
    """What the matrix's repaired samples would look like unrepaired: far outside its tolerances."""
    transform = model_parts(tokenizer).transform
    stored = UPRIGHT.transpose(Image.Transpose.ROTATE_90)  # EXIF ignored
    assert levels(transform(stored), transform(UPRIGHT), transform) > 20
    assert levels(transform(decode_image(exif_jpeg(UPRIGHT))), transform(UPRIGHT), transform) <= 4
    clipped = Image.open(io.BytesIO(encode(Image.fromarray(np.full((32, 32), 100 * 257, np.uint16))))).convert("RGB")
    assert levels(transform(clipped), transform(solid((100, 100, 100))), transform) > 100  # plain convert clips
    image = decode_image(png16_rgb((200 * 257, 50 * 257, 10 * 257)))
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (200, 50, 10)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
def test_draft_decoding_matches_full_decoding(name, mode):
    """JPEG draft decoding to 224 px: the transformed pixels stay close to a full decode's.

    Tolerance, in 0..255 levels after the transform: mean |difference| <= 2 and 99th percentile
    <= 12. libjpeg's 1/2-scale decode averages in the DCT domain, a different low-pass filter than
    Pillow's antialiased bicubic, so sharp edges differ by up to ~30 levels while smooth regions
    agree; the mean (measured 0.4 to 1.3) is the size of the JPEG q90 encoding's own error against
    the lossless original (0.6 to 1.5). Decoding too small and upsampling (1/8 scale here) is
    caught: its error is several times larger.
    """
    transform = image_transform(224, 0.5, 0.5, resize_mode=mode)
    raw = encode(photo(name, (640, 480)), "JPEG", quality=90)
    full = decode_image(raw)
    draft = decode_image(raw, draft_size=224)
    assert full.size == (640, 480) and draft.size == (320, 240) and draft.mode == "RGB"
    difference = ((transform(draft) - transform(full)).abs() * 127.5).flatten()
    assert difference.mean() <= 2.0 and difference.quantile(0.99) <= 12.0, (difference.mean(), difference.quantile(0.99))
    too_small = decode_image(raw, draft_size=56)  # 80 x 60: the transform would upsample
    assert (transform(too_small) - transform(full)).abs().mul(127.5).mean() > 3.0


def test_draft_never_decodes_below_the_transform_size():
    raw = encode(photo("coffee", (451, 300)), "JPEG", quality=90)
    for size in (32, 64, 100, 150, 224, 300, 384):
        width, height = decode_image(raw, draft_size=size).size
        assert min(width, height) >= min(size, 300), (size, width, height)


@pytest.mark.parametrize("size, reason", [((1, 1), "image_too_small"), ((7, 50), "image_too_small"),
                                          ((1, 4000), "image_extreme_aspect"), ((4000, 150), "image_extreme_aspect")])
def test_tiny_and_extreme_images_are_refused_before_the_transform(size, reason):
    with pytest.raises(SkipSample) as info:
        decode_image(encode(solid((9, 9, 9), size)), min_side=8, max_aspect_ratio=20)
    assert info.value.reason == reason


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("pad", [False, True])
def test_the_transform_takes_every_image_the_limits_let_through(mode, pad):
    """The extremes the default limits allow (8 px sides, 20:1) go through every transform."""
    transform = image_transform(32, 0.5, 0.5, resize_mode=mode, pad_to_square=pad)
    for size in ((8, 8), (8, 160), (160, 8), (9, 180)):
        image = decode_image(encode(solid((9, 9, 9), size)), min_side=8, max_aspect_ratio=20)
        tensor = transform(image)
        assert tensor.shape == (3, 32, 32) and torch.isfinite(tensor).all()
