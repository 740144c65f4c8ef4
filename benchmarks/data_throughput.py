"""Data-loading throughput: JPEG shards -> model-ready batches, samples/s per worker.

Three pipelines read the same WebDataset shards of real photographs (JPEGs of about 640x480, made
from the photographs shipped with scikit-image: random crops, flips and colour changes, each with a
caption) and produce the same 224 px images (ViT-B-16's eval preprocessing):

- ours:      multimodal.data.build_dataset (decode, tokenize with the prompt, pack into Batches),
             through build_loader; picks up whatever multimodal/data/ does, e.g. JPEG draft mode;
- open_clip: open_clip_train.data.get_wds_dataset, open_clip's own training loader, with open_clip's
             image_transform at the same settings and our tokenizer padded to 77 ids per caption;
- naive:     a plain in-process loop over the tar: PIL open + convert("RGB") + our transform, and
             the caption tokenized.

Each pipeline runs with --workers DataLoader workers (0: in the main process; naive is always in
process), skips --warmup samples, then counts --samples. The runs alternate (--repeats rounds) and
the best round of each pipeline is reported, which is the least disturbed by other processes on a
shared machine. torch runs with one thread, so the figures are per core.

    python benchmarks/data_throughput.py                 # one JSON line on stdout
    python benchmarks/data_throughput.py --profile       # plus cProfile of each pipeline on stderr

Needs the `bench` extra (pandas, for open_clip_train) and scikit-image (the `dev` extra).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import random
import sys
import tarfile
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, features

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import emit, machine_info  # noqa: E402
from encoders.open_clip import OpenCLIPEncoder  # noqa: E402
from encoders.transforms import encoder_transform  # noqa: E402
from lm.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from multimodal.data import DataConfig, build_dataset, build_loader  # noqa: E402

# skimage.data photographs (all ship with scikit-image, no download) and what they show.
SOURCES = {
    "astronaut": "an astronaut in a white space suit",
    "chelsea": "a tabby cat looking to the side",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on its launch pad",
    "hubble_deep_field": "distant galaxies in a dark sky",
    "retina": "a photograph of the back of an eye",
    "immunohistochemistry": "stained tissue under a microscope",
    "camera": "a man with a camera on a tripod",
    "moon": "the cratered surface of the moon",
    "coins": "old coins laid out in rows",
    "grass": "a close view of grass",
    "gravel": "small stones of gravel",
    "brick": "a wall of bricks",
    "cell": "a cell seen through a microscope",
}
WIDTH, HEIGHT = 640, 480
MODEL = "ViT-B-16"


# --- shards ---------------------------------------------------------------------------------------


def source_images() -> dict[str, Image.Image]:
    import skimage.data

    images = {}
    for name in SOURCES:
        pixels = getattr(skimage.data, name)()
        image = Image.fromarray(np.ascontiguousarray(pixels[..., :3] if pixels.ndim == 3 else pixels))
        images[name] = image.convert("RGB")
    return images


def make_photo(source: Image.Image, rng: random.Random) -> tuple[Image.Image, list[str]]:
    """A random 4:3 crop of `source`, resized to 640x480 and altered; and words describing it."""
    width, height = source.size
    scale = rng.uniform(0.45, 1.0)
    crop_w = int(width * scale)
    crop_h = int(crop_w * 3 / 4)
    if crop_h > height:  # a tall source: the 4:3 crop is as high as the image
        crop_h, crop_w = height, int(height * 4 / 3)
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = source.crop((left, top, left + crop_w, top + crop_h)).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    words = ["seen up close" if scale < 0.7 else "in a wide view"]
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
        words.append("mirrored")
    brightness = rng.uniform(0.7, 1.3)
    image = ImageEnhance.Brightness(image).enhance(brightness)
    words.append("in dim light" if brightness < 0.9 else "in bright light" if brightness > 1.1 else "in even light")
    colour = rng.uniform(0.5, 1.5)
    image = ImageEnhance.Color(image).enhance(colour)
    words.append("with pale colours" if colour < 0.8 else "with vivid colours" if colour > 1.2 else "with natural colours")
    return image, words


def write_shards(out_dir: Path, count: int, num_shards: int, seed: int) -> tuple[str, list[str]]:
    """`count` distinct JPEG + caption samples in `num_shards` tars; the brace pattern and captions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources = source_images()
    names = list(SOURCES)
    per_shard = math.ceil(count / num_shards)
    captions, index = [], 0
    for shard in range(num_shards):
        with tarfile.open(out_dir / f"photos-{shard:03d}.tar", "w") as tar:
            for _ in range(min(per_shard, count - index)):
                name = names[index % len(names)]
                image, words = make_photo(sources[name], rng)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=rng.randint(80, 95))
                caption = f"{SOURCES[name]}, {', '.join(words)}."
                captions.append(caption)
                for suffix, data in (("jpg", buffer.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{index:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
    return str(out_dir / f"photos-{{000..{num_shards - 1:03d}}}.tar"), captions


# --- the three pipelines --------------------------------------------------------------------------


class PaddedTokenizer:
    """open_clip's tokenizer interface (list of texts -> LongTensor[N, 77]) over our tokenizer."""

    def __init__(self, tokenizer: Tokenizer, context_length: int = 77) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.full((len(texts), self.context_length), self.tokenizer.pad_id, dtype=torch.long)
        for row, ids in enumerate(self.tokenizer.encode_batch(texts, add_bos=True)):
            ids = ids[: self.context_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def timed(batches, count_of, warmup: int, samples: int) -> tuple[int, float]:
    """Skip batches until `warmup` samples have gone by, then time until `samples` more have come."""
    seen, counted, start = 0, 0, None
    for batch in batches:
        n = count_of(batch)
        if start is None:
            seen += n
            if seen >= warmup:
                start = time.perf_counter()
            continue
        counted += n
        if counted >= samples:
            break
    if start is None or counted == 0:
        raise RuntimeError(f"the shards ran out during warmup ({seen} samples); use more --samples or less --warmup")
    return counted, time.perf_counter() - start


def run_ours(setup: dict, workers: int, warmup: int, samples: int) -> tuple[int, float]:
    config = DataConfig(setup["pattern"], max_tokens=2048, rows_per_batch=4, shuffle_buffer=1000, seed=0)
    dataset = build_dataset(config, setup["tokenizer"], setup["transform"], setup["image_token_id"],
                            setup["num_image_tokens"])
    batches = build_loader(dataset, num_workers=workers) if workers > 0 else iter(dataset)
    return timed(batches, lambda batch: batch.num_samples, warmup, samples)


def patch_open_clip_train() -> None:
    """open_clip_train 3.3's group_by_keys_nothrow reads filesample["fname"] from every item, but
    webdataset >= 1.0 ends each shard with an empty end-of-shard marker ({}), a KeyError at the end
    of the first shard. Ask webdataset for no marker, as before 1.0 (keys here are unique across
    shards, so nothing can merge across a shard boundary). Set before the DataLoader forks."""
    import functools

    import open_clip_train.data
    from webdataset.tariterators import tar_file_expander

    open_clip_train.data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


def run_open_clip(setup: dict, workers: int, warmup: int, samples: int) -> tuple[int, float]:
    from open_clip_train.data import get_wds_dataset

    patch_open_clip_train()

    batch_size = 32
    args = Namespace(train_data=setup["pattern"], val_data=None, train_num_samples=warmup + samples + 2 * batch_size,
                     dataset_resampled=False, train_data_upsampling_factors=None, seed=0,
                     batch_size=batch_size, world_size=1, workers=workers)
    info = get_wds_dataset(args, setup["open_clip_transform"], is_train=True, tokenizer=setup["padded_tokenizer"])
    loader = info.dataloader
    try:
        return timed(loader, lambda batch: len(batch[0]), warmup, samples)
    finally:
        del loader, info  # ends its persistent worker


def naive_samples(pattern_paths: list[str]):
    """(jpeg bytes, caption) pairs, straight from the tars."""
    for path in pattern_paths:
        with tarfile.open(path) as tar:
            files = {}
            for member in tar:
                key, _, suffix = member.name.partition(".")
                files.setdefault(key, {})[suffix] = tar.extractfile(member).read()
                if len(files[key]) == 2:
                    item = files.pop(key)
                    yield item["jpg"], item["txt"].decode()


def run_naive(setup: dict, workers: int, warmup: int, samples: int) -> tuple[int, float]:
    transform, tokenizer = setup["transform"], setup["tokenizer"]

    def loop():
        for data, caption in naive_samples(setup["paths"]):
            pixels = transform(Image.open(io.BytesIO(data)).convert("RGB"))
            ids = tokenizer.encode(caption, add_bos=True)
            yield pixels, ids

    return timed(loop(), lambda item: 1, warmup, samples)


PIPELINES = {"ours": run_ours, "open_clip": run_open_clip, "naive": run_naive}


# --- setup, measurement, report ---------------------------------------------------------------------


def make_setup(out_dir: Path, count: int, num_shards: int) -> dict:
    import open_clip

    pattern, captions = write_shards(out_dir, count, num_shards, seed=0)
    with torch.device("meta"):  # only the settings are needed, not the weights
        encoder = OpenCLIPEncoder(MODEL)
    transform = encoder_transform(encoder)
    open_clip_transform = open_clip.image_transform(
        encoder.image_size, is_train=False, mean=encoder.mean, std=encoder.std,
        resize_mode=encoder.resize_mode, interpolation=encoder.interpolation, fill_color=encoder.fill_color)
    tokenizer = train_tokenizer(captions, vocab_size=1024)
    return {
        "pattern": pattern,
        "paths": sorted(str(path) for path in out_dir.glob("photos-*.tar")),
        "transform": transform,
        "open_clip_transform": open_clip_transform,
        "tokenizer": tokenizer,
        "padded_tokenizer": PaddedTokenizer(tokenizer),
        "image_token_id": tokenizer.reserved_token_id(1),
        "num_image_tokens": encoder.num_tokens,
    }


def profile(setup: dict, warmup: int, samples: int, top: int = 18) -> None:
    """cProfile each pipeline in process; the top functions by own time go to stderr."""
    for name, run in PIPELINES.items():
        profiler = cProfile.Profile()
        profiler.enable()
        counted, seconds = run(setup, 0, warmup, samples)
        profiler.disable()
        print(f"\n=== {name}: {counted} samples, in process under cProfile ===", file=sys.stderr)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=800, help="samples timed per pipeline and round")
    parser.add_argument("--warmup", type=int, default=None, help="samples skipped first (default min(128, samples))")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (0: in process)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each is reported")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the shards go (default: a temp dir)")
    parser.add_argument("--profile", action="store_true", help="also cProfile each pipeline in process (stderr)")
    args = parser.parse_args(argv)
    warmup = min(128, args.samples) if args.warmup is None else args.warmup
    torch.set_num_threads(1)  # DataLoader workers use one thread too: figures are per core

    # Enough distinct images that no pipeline reads one twice, plus a packing/batch of slack.
    count = args.samples + warmup + 96
    num_shards = max(8, args.workers)
    with tempfile.TemporaryDirectory(prefix="data-throughput-") as temp:
        out_dir = args.out_dir or Path(temp)
        start = time.perf_counter()
        setup = make_setup(out_dir, count, num_shards)
        shard_seconds = time.perf_counter() - start
        rates: dict[str, list[float]] = {name: [] for name in PIPELINES}
        for round_ in range(args.repeats):
            order = list(PIPELINES) if round_ % 2 == 0 else list(reversed(PIPELINES))
            for name in order:
                counted, seconds = PIPELINES[name](setup, args.workers, warmup, args.samples)
                rates[name].append(counted / seconds)
        if args.profile:
            profile(setup, warmup, args.samples)
        shard_bytes = sum(os.path.getsize(path) for path in setup["paths"])

    per_worker = max(1, args.workers)
    best = {name: max(values) / (1 if name == "naive" else per_worker) for name, values in rates.items()}
    result = {
        "benchmark": "data_throughput",
        "ours_samples_per_s": round(best["ours"], 1),
        "open_clip_samples_per_s": round(best["open_clip"], 1),
        "naive_samples_per_s": round(best["naive"], 1),
        "speedup": round(best["ours"] / best["open_clip"], 3),
        "ours_over_naive": round(best["ours"] / best["naive"], 3),
        "per": "worker (core)" if args.workers > 0 else "process (core)",
        "rounds_samples_per_s": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "workers": args.workers,
        "samples": args.samples,
        "warmup": warmup,
        "images": count,
        "shards": num_shards,
        "image_px": f"{WIDTH}x{HEIGHT} -> 224",
        "mean_jpeg_kb": round(shard_bytes / count / 1024, 1),
        "shard_build_s": round(shard_seconds, 1),
        "machine": {**machine_info("pillow", "open_clip_torch", "webdataset"),
                    "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo"))},
    }
    return emit(result)


if __name__ == "__main__":
    main()
