"""Lightning training in the anyres layout on CPU: a tiny OneVision-shaped model (384 px, patch 14,
27x27 tokens a view) built from a ModelSpec with `layout: {kind: anyres}`, trained through
VLMModule and ShardDataModule on images of mixed sizes and a conversation with several images; the
loss falls clearly."""

import json

import lightning as L
import torch
from webdataset import TarWriter

from multimodal.data import DataConfig
from multimodal.layouts import ImageLayout, onevision_pinpoints
from multimodal.training import ModelSpec, ShardDataModule, StageConfig, VLMModule
from tests.multimodal.data.helpers import ANYRES_SIZES, anyres_sample
from tests.multimodal.layouts.tiny_onevision import TINY_SIGLIP_384
from tests.multimodal.test_training import LossHistory, trainer

# Each kind of image has its own caption: the model can learn which from the image's tokens.
CAPTIONS = {"small": "A small picture.", "square": "A square picture.", "wide": "A wide picture.",
            "tall": "A tall picture."}


def write_shard(path, num_samples: int) -> str:
    kinds = list(ANYRES_SIZES)
    with TarWriter(str(path)) as writer:
        for index in range(num_samples):
            key = f"s{index:03d}"
            if index % 5 == 4:  # every fifth: a conversation about two images
                writer.write(anyres_sample(key, [ANYRES_SIZES["wide"], ANYRES_SIZES["small"]], index))
                continue
            kind = kinds[index % len(kinds)]
            writer.write(anyres_sample(key, [ANYRES_SIZES[kind]], index, fmt="JPEG" if index % 2 else "PNG",
                                       caption=CAPTIONS[kind]))
    return str(path)


def test_anyres_training_loss_falls(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer")
    shard = write_shard(tmp_path / "anyres-000.tar", 10)
    encoder = {"model_name": TINY_SIGLIP_384, "feature_layer": -1, "activation": "gelu_tanh",
               "preprocess_cfg": {"mean": 0.5, "std": 0.5, "resize_mode": "squash"}}
    spec = ModelSpec(tokenizer=str(tmp_path / "tokenizer"), decoder="tiny",
                     decoder_options={"attention": "sdpa", "max_seq_len": 8192}, encoder=encoder,
                     projector={"kind": "mlp", "depth": 2}, layout={"kind": "anyres"})
    torch.manual_seed(0)
    module = VLMModule(spec, StageConfig(train=["encoder", "projector", "decoder"],
                                         lr={"encoder": 3e-3, "projector": 3e-3, "decoder": 3e-3}, warmup_steps=3))
    history = LossHistory()
    data = ShardDataModule(DataConfig(shard, max_tokens=3584, rows_per_batch=1, shuffle_buffer=4, pack_buffer=2),
                           num_workers=0)
    trainer(36, callbacks=[history]).fit(module, datamodule=data)

    model = module.model
    assert model.layout == ImageLayout.anyres("anyres_max_9", onevision_pinpoints(384))
    assert model.image_newline.requires_grad
    assert len(history.losses) == 36
    first, last = sum(history.losses[:4]) / 4, sum(history.losses[-4:]) / 4
    assert last < first / 2, (first, last, history.losses)


def test_layout_setting_builds_the_layout(tokenizer, tmp_path):
    from multimodal.training import build_model, image_layout

    assert image_layout(None, 384).kind == "fixed"
    pins = [[384, 384], [384, 768]]
    assert image_layout({"kind": "anyres", "max_tiles": 4, "grid_pinpoints": pins}, 384) == ImageLayout(
        "anyres", 4, tuple(map(tuple, pins)))
    tokenizer.save(tmp_path / "tokenizer")
    spec = ModelSpec(tokenizer=str(tmp_path / "tokenizer"), decoder="tiny", encoder={"model_name": TINY_SIGLIP_384},
                     layout={"kind": "anyres", "grid_pinpoints": pins})
    model = build_model(spec)
    assert model.layout.grid_pinpoints == ((384, 384), (384, 768)) and model.view_side == 27
    json.dumps(spec.layout)  # a plain value in the checkpoint's hyperparameters
