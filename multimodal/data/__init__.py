"""The data path: WebDataset shards in, packed model-ready Batches out.

Read in this order:
- config.py    DataConfig and its sources; the one place shard patterns become shard URLs.
- shards.py    which shards each rank and worker reads; reading tars into samples.
- skips.py     counting and logging skipped samples; the skip budget.
- decode.py    bytes -> text, JSON, RGB images, video frames; the skip reasons.
- samples.py   one raw sample (caption, conversation, text; images, videos) -> token ids, labels, pixels.
- anyres.py    the anyres layout's settings in a worker: each image's (video's) token count and views.
- stages.py    a reader's stages: shard after shard per source, mixing by weight, shuffling, tokenizing.
- packing.py   first-fit packing into rows of max_tokens; rows -> Batch; padding waste.
- reader.py    one reader's stages wired into Batches; its exact position after each (ReaderState).
- resume.py    the position training consumed, saved in checkpoints; going on from it.
- dataset.py   the IterableDataset, what an epoch is, and the DataLoader (build_loader).

    dataset = dataset_for_model(DataConfig("data/train-{000..009}.tar", max_tokens=2048), model)
    for batch in build_loader(dataset, num_workers=4):
        loss, _ = model(batch.to("cuda"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from PIL import Image

from encoders.transforms import ImageTransform, encoder_transform
from lm.tokenizer import Tokenizer
from multimodal.layouts.anyres import AnyresImages
from multimodal.data.config import DataConfig, SourceConfig, resolve_sources
from multimodal.data.decode import SkipSample
from multimodal.data.dataset import ShardDataset, build_loader
from multimodal.data.packing import make_batch, pack_samples, padding_waste
from multimodal.data.samples import SampleSettings, TokenizedSample, to_tokenized_sample
from multimodal.data.skips import SkipBudgetExceeded

__all__ = [
    "AnyresImages",
    "DataConfig",
    "ShardDataset",
    "SampleSettings",
    "SkipBudgetExceeded",
    "SkipSample",
    "SourceConfig",
    "TokenizedSample",
    "build_dataset",
    "dataset_for_model",
    "build_loader",
    "make_batch",
    "pack_samples",
    "padding_waste",
    "to_tokenized_sample",
]


def dataset_for_model(config: DataConfig, model) -> ShardDataset:
    """build_dataset with what the data must match taken from `model` (a VisionLanguageModel): its
    tokenizer and image placeholder; in the fixed layout its encoder's transform and token count per
    image, in the anyres layout its AnyresImages (each image's count from its size, its views) and
    its video placeholder (None: video samples are skipped as no_video_token)."""
    anyres = model.anyres
    if anyres is not None:
        return build_dataset(config, model.tokenizer, None, model.image_token_id, anyres=anyres,
                             video_token_id=getattr(model, "video_token_id", None))
    return build_dataset(config, model.tokenizer, encoder_transform(model.encoder), model.image_token_id,
                         model.num_image_tokens)


def build_dataset(
    config: DataConfig,
    tokenizer: Tokenizer,
    image_transform: Callable[[Image.Image], torch.Tensor] | None,
    image_token_id: int,
    num_image_tokens: int | None = None,
    anyres: AnyresImages | None = None,
    video_token_id: int | None = None,
) -> ShardDataset:
    """An IterableDataset of Batches over config.shards, or over config.sources mixed by weight.
    build_loader checks the shard counts against the readers. `dataset_for_model` takes every
    argument from the model.

    Fixed layout: `image_transform` maps an RGB PIL image to a [3, H, W] tensor
    (`encoder_transform(encoder)`) and every image takes `num_image_tokens` placeholders.
    Anyres layout: `anyres` (data.model.anyres) instead of both (give them as None); every
    image's count then follows its size, and a Batch's pixels are ImageInputs.
    `image_token_id` is the model's placeholder token; `video_token_id` its video placeholder
    (anyres only; None: samples with videos are skipped as no_video_token).
    """
    if anyres is not None:
        if num_image_tokens is not None or image_transform is not None:
            raise ValueError("the anyres layout takes each image's token count and views from `anyres`: "
                             "give image_transform and num_image_tokens as None")
        if config.pad_to_square:
            raise ValueError("pad_to_square is for the fixed layout; the anyres layout pads the images of a sample "
                             "with several itself, and tiles an image alone")
        if anyres.min_tokens >= config.max_tokens:
            raise ValueError(f"max_tokens {config.max_tokens} leaves no room for text around an image of at least "
                             f"{anyres.min_tokens} tokens; raise max_tokens")
    elif num_image_tokens is None:
        raise ValueError("give num_image_tokens (fixed layout) or anyres (anyres layout)")
    elif num_image_tokens <= 0:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    elif num_image_tokens >= config.max_tokens:
        raise ValueError(f"max_tokens {config.max_tokens} leaves no room for text around an image of "
                         f"{num_image_tokens} tokens; raise max_tokens")
    if config.pad_to_square:
        if not isinstance(image_transform, ImageTransform):
            raise ValueError("pad_to_square needs an encoders.transforms.ImageTransform; "
                             "pass encoder_transform(encoder, pad_to_square=True) instead")
        image_transform = dataclasses.replace(image_transform, pad_to_square=True)
    sources = resolve_sources(config)
    settings = SampleSettings(
        tokenizer=tokenizer,
        image_transform=image_transform,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        max_tokens=config.max_tokens,
        seed=config.seed,
        default_language=config.default_language,
        anyres=anyres,
        video_token_id=video_token_id,
    )
    return ShardDataset(config, settings, sources)
