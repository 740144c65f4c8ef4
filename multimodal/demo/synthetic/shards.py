"""Splits, samples and shards: which split owns a scene, the scenes of a split, and the WebDataset
shards the demo trains on."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Sequence

from PIL import Image

from multimodal.demo.synthetic.captions import LANGUAGES, describe
from multimodal.demo.synthetic.render import render
from multimodal.demo.synthetic.scenes import Scene, scene

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Per mille of contents held out. A content is held out as a whole, so a val/test caption never
# occurs in training, while each of its shapes, colours and positions does.
_HELD_OUT_PER_MILLE = {"test": 50, "val": 50}
# Disjoint seed ranges per split; `seed` picks a block of _SEED_BLOCK seeds inside the range.
_SPLIT_SEED_BASE = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
_SEED_BLOCK = 10_000_000


def split_of(scene_or_content: Scene | tuple) -> str:
    """The split ("train", "val" or "test") that owns this scene's content; a pure function of the
    caption-level content, so no content can ever land in two splits."""
    content = scene_or_content.content if isinstance(scene_or_content, Scene) else tuple(scene_or_content)
    bucket = int.from_bytes(hashlib.sha256(repr(content).encode()).digest()[:8], "big") % 1000
    if bucket < _HELD_OUT_PER_MILLE["test"]:
        return "test"
    if bucket < _HELD_OUT_PER_MILLE["test"] + _HELD_OUT_PER_MILLE["val"]:
        return "val"
    return "train"


def split_seeds(split: str, num: int, seed: int = 0) -> list[int]:
    """The first `num` scene seeds of `split`: taken from the split's own seed range (block `seed`)
    and kept only where the scene's content belongs to the split."""
    return [image_seed for image_seed, _ in _split_scenes(split, num, seed)]


def _split_scenes(split: str, num: int, seed: int) -> list[tuple[int, Scene]]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if not 0 <= seed < 100:
        raise ValueError(f"seed {seed} is out of range; use 0 <= seed < 100 (each picks its own block of seeds)")
    start = _SPLIT_SEED_BASE[split] + seed * _SEED_BLOCK
    found = []
    for candidate in range(start, start + _SEED_BLOCK):
        if len(found) == num:
            break
        drawn = scene(candidate)
        if split_of(drawn) == split:
            found.append((candidate, drawn))
    if len(found) < num:
        raise ValueError(f"asked for {num} {split} scenes; one seed block holds only {len(found)}")
    return found


def sample(seed: int, language: str, size: int = 32) -> tuple[Image.Image, str]:
    """One example: the image of `scene(seed)` and its caption in `language`."""
    drawn = scene(seed)
    return render(drawn, size), describe(drawn, language)


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG: lossless, and about 1 kB at 32x32."""
    buffer = io.BytesIO()
    # Level 1 is twice as fast as the default and only ~3% larger on these tiny images.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_shards(
    directory: str | os.PathLike,
    split: str,
    num_images: int,
    languages: Sequence[str] = LANGUAGES,
    samples_per_shard: int = 10_000,
    seed: int = 0,
    size: int = 32,
) -> list[str]:
    """Write `num_images` scenes of `split`, each once per language, as WebDataset tar shards.

    A sample is `{key}.png` (the image), `{key}.txt` (the caption) and `{key}.json`
    (`{"language": ..., "scene": ...}`); one image's languages follow each other. Shards are named
    `{split}-000000.tar`, ...; the list of their paths is returned. Deterministic in (split,
    num_images, languages, seed, size).
    """
    import webdataset as wds  # imported here so the rest of the module works without it

    for language in languages:
        if language not in LANGUAGES:
            raise ValueError(f"unknown language {language!r}; choose from {LANGUAGES}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    os.makedirs(directory, exist_ok=True)
    pattern = os.path.join(os.fspath(directory).replace("%", "%%"), f"{split}-%06d.tar")
    written = 0
    # An integer mtime keeps tarfile from adding a PAX header to every member (twice the size and
    # time) and makes the shards byte-identical from run to run.
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0, encoder=False) as sink:
        for image_seed, drawn in _split_scenes(split, num_images, seed):
            image = png_bytes(render(drawn, size))
            scene_dict = drawn.to_dict()
            for language in languages:
                sink.write({
                    "__key__": f"{split}-{image_seed:010d}-{language}",
                    "png": image,
                    "txt": describe(drawn, language).encode(),
                    "json": json.dumps({"language": language, "seed": image_seed, "scene": scene_dict},
                                       ensure_ascii=False).encode(),
                })
                written += 1
    # The writer opens a new shard only when a sample arrives for it, so this is what exists.
    return [pattern % i for i in range(max(1, math.ceil(written / samples_per_shard)))]


def texts_for_pretraining(num: int, seed: int = 0) -> list[str]:
    """`num` captions for pre-training the decoder as a text LM, the languages taking turns; all
    from training scenes, so no held-out caption leaks into the decoder."""
    seeds = split_seeds("train", num, seed)
    return [describe(scene(s), LANGUAGES[i % len(LANGUAGES)]) for i, s in enumerate(seeds)]
