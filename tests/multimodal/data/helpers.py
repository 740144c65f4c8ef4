"""Shards written by the tests: every sample kind, each image a solid colour unique to its sample,
each text naming its sample's key, so a test can tell from a Batch which image went with which text."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image
from webdataset import TarWriter

from encoders.transforms import encoder_transform
from lm.attention import SeqLayout
from tests.multimodal.tiny import build_tiny_vlm

IMAGE_SIZE = 32  # the tiny tower's input size: images pass the transform unresized, colours exact


@dataclass(frozen=True)
class ModelParts:
    tokenizer: object
    transform: object
    image_token_id: int
    num_image_tokens: int


@lru_cache(maxsize=None)
def model_parts(tokenizer) -> ModelParts:
    vlm = build_tiny_vlm(tokenizer)
    return ModelParts(tokenizer, encoder_transform(vlm.encoder), vlm.image_token_id, vlm.num_image_tokens)


def colour(index: int, image: int = 0) -> tuple[int, int, int]:
    """A colour per (sample, image), distinct for index < 1000 and image < 3."""
    n = index * 3 + image
    return (n * 7) % 256, (n // 37 * 11 + 40) % 256, (n * 13 + n // 256 * 101) % 256


def image_bytes(rgb: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    options = {"lossless": True} if fmt == "WEBP" else {}
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rgb).save(buffer, fmt, **options)
    return buffer.getvalue()


@dataclass
class Expected:
    """What a sample should become: its images' colours in placeholder order and a text it contains."""

    key: str
    colours: list[tuple[int, int, int]] = field(default_factory=list)
    text: str = ""


KINDS = ("caption", "caption_es", "llava_1", "messages_2", "no_marker", "json_text", "plain_text", "llava_0")


def make_sample(index: int) -> tuple[dict[str, bytes], Expected]:
    """One sample of kind KINDS[index % len(KINDS)]; its key is "s{index:04d}"."""
    key = f"s{index:04d}"
    kind = KINDS[index % len(KINDS)]
    mark = f"about {key}"
    files: dict[str, bytes] = {"__key__": key}
    colours = []
    if kind in ("caption", "caption_es"):
        colours = [colour(index)]
        files["png" if index % 2 else "jpg"] = image_bytes(colours[0], "PNG" if index % 2 else "JPEG")
        files["txt"] = f"A red circle {mark}.".encode()
        meta = {"url": "http://example.com/x.jpg", "caption": "ignored", "width": 32}  # img2dataset style
        if kind == "caption_es":
            meta["language"] = "es"
        files["json"] = json.dumps(meta).encode()
    elif kind == "llava_1":
        colours = [colour(index)]
        files["png"] = image_bytes(colours[0])
        files["json"] = json.dumps({"conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": f"A circle {mark}."}]}).encode()
    elif kind == "messages_2":
        colours = [colour(index, 0), colour(index, 1)]
        files["0.png"] = image_bytes(colours[0])
        files["1.webp"] = image_bytes(colours[1], "WEBP")
        files["json"] = json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " and "},
                                         {"type": "image"}, {"type": "text", "text": " compare"}]},
            {"role": "assistant", "content": f"Two shapes {mark}."}]}).encode()
    elif kind == "no_marker":  # images but no <image>: markers go to the start of the first user turn
        colours = [colour(index, 0), colour(index, 1)]
        files["0.png"] = image_bytes(colours[0])
        files["1.png"] = image_bytes(colours[1])
        files["json"] = json.dumps({"conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Describe."},
            {"from": "gpt", "value": f"Squares {mark}."}]}).encode()
    elif kind == "json_text":
        files["json"] = json.dumps({"messages": [
            {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": f"Hi {mark}."}]}).encode()
    elif kind == "plain_text":
        files["txt"] = f"Un cercle vermell {mark}.".encode()
    else:  # llava_0: a conversation without images
        files["json"] = json.dumps({"conversations": [
            {"from": "human", "value": "Count."}, {"from": "gpt", "value": f"One two {mark}."}]}).encode()
    return files, Expected(key, colours, mark)


def write_shards(directory: Path, num_samples: int, num_shards: int, start: int = 0,
                 name: str = "train") -> tuple[list[str], dict[str, Expected]]:
    """`num_shards` shards named {name}-000.tar ..., samples dealt out contiguously."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, expected = [], {}
    per_shard = -(-num_samples // num_shards)
    for shard in range(num_shards):
        path = directory / f"{name}-{shard:03d}.tar"
        with TarWriter(str(path)) as writer:
            for index in range(start + shard * per_shard, start + min(num_samples, (shard + 1) * per_shard)):
                files, exp = make_sample(index)
                writer.write(files)
                expected[exp.key] = exp
        paths.append(str(path))
    return paths, expected


def write_sample_shards(directory: Path, name: str, shards: list[list[dict[str, bytes]]]) -> list[str]:
    """One tar per list of WebDataset samples (dicts with their `__key__`), named {name}-000.tar, ..."""
    paths = []
    for index, samples in enumerate(shards):
        path = directory / f"{name}-{index:03d}.tar"
        with TarWriter(str(path)) as writer:
            for sample in samples:
                writer.write(sample)
        paths.append(str(path))
    return paths


def split_rows(input_ids: torch.Tensor, layout: SeqLayout) -> list[list[list[int]]]:
    """Per row, the token ids of each packed sample."""
    rows = []
    for r, lengths in enumerate(layout.seq_lens):
        start, samples = 0, []
        for n in lengths:
            samples.append(input_ids[r, start:start + n].tolist())
            start += n
        rows.append(samples)
    return rows


def pixel_colour(pixels: torch.Tensor, transform) -> tuple[int, int, int]:
    """The mean colour of a transformed image back in 0..255."""
    mean = torch.tensor(transform.mean).view(3, 1, 1)
    std = torch.tensor(transform.std).view(3, 1, 1)
    rgb = (pixels * std + mean).mul(255).mean(dim=(1, 2))
    return tuple(int(round(v)) for v in rgb.tolist())


def check_batch(batch, keys: list[list[str]], expected: dict[str, Expected], parts: ModelParts) -> None:
    """Each packed sample is the one its key says (its text), with its own images at its placeholders."""
    tokenizer = parts.tokenizer
    assert batch.input_ids.shape[0] == len(keys) == len(batch.layout.seq_lens)
    image_index = 0
    for row_keys, row_samples in zip(keys, split_rows(batch.input_ids, batch.layout)):
        assert len(row_keys) == len(row_samples)
        for key, ids in zip(row_keys, row_samples):
            exp = expected[key]
            assert exp.text in tokenizer.decode(ids), (key, tokenizer.decode(ids))
            assert ids.count(parts.image_token_id) == parts.num_image_tokens * len(exp.colours)
            for want in exp.colours:
                got = pixel_colour(batch.pixels[image_index], parts.transform)
                assert max(abs(a - b) for a, b in zip(got, want)) <= 4, (key, got, want)  # JPEG rounding
                image_index += 1
    assert image_index == (0 if batch.pixels is None else batch.pixels.shape[0])


# --- the anyres layout: images of their own sizes -------------------------------------------------

# (height, width) of the anyres tests' images: smaller than a tile, one tile, wide (1x3 tiles), tall (3x1).
ANYRES_SIZES = {"small": (80, 100), "square": (384, 384), "wide": (300, 900), "tall": (900, 300)}


def textured_image(size: tuple[int, int], seed: int) -> Image.Image:
    """An RGB image of `size` (height, width): smooth colour gradients and a few blocks, different
    for each seed, so that every view and tile of it differs (a solid colour would hide a mix-up)."""
    import numpy as np

    height, width = size
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    pixels = np.stack([127 + 120 * np.sin(rows / (11 + 7 * c) + cols / (17 + 5 * c) + phase[c]) for c in range(3)], -1)
    for _ in range(4):
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        pixels[top:top + height // 5, left:left + width // 5] = rng.integers(0, 256, size=3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def anyres_sample(key: str, sizes: list[tuple[int, int]], seed: int, fmt: str = "PNG",
                  caption: str | None = None) -> dict[str, bytes]:
    """A caption sample (one image; `caption` or a text naming the key) or, for several sizes, a
    LLaVA conversation with a marker per image (0.png, 1.jpg, ... alternating PNG and JPEG)."""
    files: dict[str, bytes] = {"__key__": key}
    if len(sizes) == 1:
        files["png" if fmt == "PNG" else "jpg"] = encoded(textured_image(sizes[0], seed), fmt)
        files["txt"] = (caption or f"A textured picture about {key}.").encode()
        return files
    for index, size in enumerate(sizes):
        name = f"{index}.png" if index % 2 == 0 else f"{index}.jpg"
        files[name] = encoded(textured_image(size, seed + index), "PNG" if index % 2 == 0 else "JPEG")
    markers = "".join("<image>\n" for _ in sizes)
    files["json"] = json.dumps({"conversations": [
        {"from": "human", "value": f"{markers}Compare these."},
        {"from": "gpt", "value": f"They differ, {key}."}]}).encode()
    return files
