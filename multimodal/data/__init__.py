"""The data path: WebDataset shards in, packed model-ready Batches out.

Read in this order:
- pipeline.py  DataConfig; which shards each rank and worker reads; reading tars into samples;
               the shuffle buffer; counting and logging skipped samples; the IterableDataset.
- decode.py    bytes -> text, JSON, RGB images; the skip reasons.
- samples.py   one raw sample (caption, conversation, text) -> token ids, labels, image tensors.
- packing.py   first-fit packing into rows of max_tokens; rows -> Batch; padding waste.

    dataset = build_dataset(DataConfig("data/train-{000..009}.tar", max_tokens=2048),
                            tokenizer, encoder_transform(model.encoder), model.image_token_id,
                            model.num_image_tokens)
    for batch in build_loader(dataset, num_workers=4):
        loss, _ = model(batch.to("cuda"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from PIL import Image

from encoders.transforms import ImageTransform
from lm.tokenizer import Tokenizer
from multimodal.data.decode import SkipSample
from multimodal.data.packing import make_batch, pack_samples, padding_waste
from multimodal.data.pipeline import (
    DataConfig,
    ShardDataset,
    SkipBudgetExceeded,
    Source,
    SourceConfig,
    build_loader,
    check_local_shards,
    expand_shards,
)
from multimodal.data.samples import SampleSettings, TokenizedSample, to_tokenized_sample

__all__ = [
    "DataConfig",
    "ShardDataset",
    "SampleSettings",
    "SkipBudgetExceeded",
    "SkipSample",
    "SourceConfig",
    "TokenizedSample",
    "build_dataset",
    "build_loader",
    "make_batch",
    "pack_samples",
    "padding_waste",
    "to_tokenized_sample",
]


def build_dataset(
    config: DataConfig,
    tokenizer: Tokenizer,
    image_transform: Callable[[Image.Image], torch.Tensor],
    image_token_id: int,
    num_image_tokens: int,
) -> ShardDataset:
    """An IterableDataset of Batches (or (Batch, keys) with config.with_keys) over config.shards, or
    over config.sources mixed by weight. build_loader checks the shard counts against the readers.

    `image_transform` maps an RGB PIL image to a [3, H, W] tensor: `encoder_transform(encoder)`.
    `image_token_id` and `num_image_tokens` are the model's (VisionLanguageModel attributes).
    """
    if num_image_tokens <= 0:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    if num_image_tokens >= config.max_tokens:
        raise ValueError(f"max_tokens {config.max_tokens} leaves no room for text around an image of "
                         f"{num_image_tokens} tokens; raise max_tokens")
    if config.pad_to_square:
        if not isinstance(image_transform, ImageTransform):
            raise ValueError("pad_to_square needs an encoders.transforms.ImageTransform; "
                             "pass encoder_transform(encoder, pad_to_square=True) instead")
        image_transform = dataclasses.replace(image_transform, pad_to_square=True)
    sources = []
    for source in config.source_list():
        urls = expand_shards(source.shards)
        if not urls:
            raise ValueError(f"source {source.name!r}: {source.shards!r} names no shard")
        check_local_shards(urls)
        sources.append(Source(source.name, float(source.weight), tuple(urls)))
    settings = SampleSettings(
        tokenizer=tokenizer,
        image_transform=image_transform,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        max_tokens=config.max_tokens,
        seed=config.seed,
        default_language=config.default_language,
    )
    return ShardDataset(config, settings, sources)
