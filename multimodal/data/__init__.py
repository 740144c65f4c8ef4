"""The data path: WebDataset shards in, packed model-ready Batches out.

Read in this order:
- config.py    DataConfig and its sources; the one place shard patterns become shard URLs.
- shards.py    which shards each rank and worker reads; reading tars into samples.
- skips.py     counting and logging skipped samples; the skip budget.
- decode.py    bytes -> text, JSON, RGB images; the skip reasons.
- samples.py   one raw sample (caption, conversation, text) -> token ids, labels, image tensors.
- stages.py    a reader's stages: shard after shard per source, mixing by weight, shuffling, tokenizing.
- packing.py   first-fit packing into rows of max_tokens; rows -> Batch; padding waste.
- reader.py    one reader's stages wired into Batches; its exact position after each (ReaderState).
- resume.py    the position training consumed, saved in checkpoints; going on from it.
- dataset.py   the IterableDataset, what an epoch is, and the DataLoader (build_loader).

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
from multimodal.data.config import DataConfig, SourceConfig, resolve_sources
from multimodal.data.decode import SkipSample
from multimodal.data.dataset import ShardDataset, build_loader
from multimodal.data.packing import make_batch, pack_samples, padding_waste
from multimodal.data.samples import SampleSettings, TokenizedSample, to_tokenized_sample
from multimodal.data.skips import SkipBudgetExceeded

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
    """An IterableDataset of Batches over config.shards, or over config.sources mixed by weight.
    build_loader checks the shard counts against the readers.

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
    sources = resolve_sources(config)
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
