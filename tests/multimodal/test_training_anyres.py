"""Lightning training in the anyres layout on CPU: a tiny OneVision-shaped model (384 px, patch 14,
27x27 tokens a view) built from a ModelSpec with `layout: {kind: anyres}`, trained through
VLMModule and ShardDataModule on images of mixed sizes and a conversation with several images; the
loss falls clearly. With `video_token`, a short fit on data with video files and videos given as
images runs with a finite loss."""

import dataclasses
import json

import math

import lightning as L
import pytest
import torch
from webdataset import TarWriter

from multimodal.data import DataConfig
from multimodal.resume_settings import changed
from multimodal.layouts import ImageLayout, onevision_pinpoints
from multimodal.training import ModelSpec, ShardDataModule, StageConfig, VLMModule
from tests.multimodal.data.helpers import ANYRES_SIZES, anyres_sample, encoded, textured_image
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


ENCODER_384 = {"model_name": TINY_SIGLIP_384, "feature_layer": -1, "activation": "gelu_tanh",
               "preprocess_cfg": {"mean": 0.5, "std": 0.5, "resize_mode": "squash"}}


def write_video_shard(path, num_samples: int) -> str:
    """Video files (3 frames), videos given as images (2 frames), an image with a video, captions."""
    import numpy as np

    from tests.multimodal.video_helpers import video_bytes

    def frames(count, seed):
        return [np.asarray(textured_image((48, 64), seed * 10 + i)) for i in range(count)]

    def chat(answer, **extra):
        return json.dumps({**extra, "conversations": [{"from": "human", "value": "What is shown?"},
                                                      {"from": "gpt", "value": answer}]}).encode()

    with TarWriter(str(path)) as writer:
        for index in range(num_samples):
            key, kind = f"v{index:03d}", index % 4
            if kind == 0:
                writer.write({"__key__": key, "mkv": video_bytes(path.parent, f"{key}.mkv", frames(3, index)),
                              "json": chat("A short video.")})
            elif kind == 1:
                images = {f"{i}.png": encoded(textured_image((48, 64), index * 10 + i)) for i in range(2)}
                writer.write({"__key__": key, **images, "json": chat("Two frames.", video=True)})
            elif kind == 2:
                writer.write({"__key__": key, "png": encoded(textured_image(ANYRES_SIZES["small"], index)),
                              "mp4": video_bytes(path.parent, f"{key}.mkv", frames(2, index)),
                              "json": chat("A picture and a video.")})
            else:
                writer.write(anyres_sample(key, [ANYRES_SIZES["small"]], index, caption=CAPTIONS["small"]))
    return str(path)


def test_training_with_videos_runs(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer")
    shard = write_video_shard(tmp_path / "video-000.tar", 8)
    spec = ModelSpec(tokenizer=str(tmp_path / "tokenizer"), decoder="tiny",
                     decoder_options={"attention": "sdpa", "max_seq_len": 4096}, encoder=ENCODER_384,
                     projector={"kind": "mlp", "depth": 2}, layout={"kind": "anyres", "frames_upbound": 4},
                     video_token="<|reserved_token_2|>")
    torch.manual_seed(0)
    module = VLMModule(spec, StageConfig(train=["encoder", "projector", "decoder"],
                                         lr={"encoder": 1e-3, "projector": 1e-3, "decoder": 1e-3}))
    history = LossHistory()
    data = ShardDataModule(DataConfig(shard, max_tokens=2048, rows_per_batch=1, shuffle_buffer=4, pack_buffer=2,
                                      max_skip_fraction=0.0, skip_budget_min_samples=1), num_workers=0)
    trainer(6, callbacks=[history]).fit(module, datamodule=data)
    assert module.model.video_token_id == tokenizer.reserved_token_id(2)
    assert len(history.losses) == 6 and all(math.isfinite(loss) for loss in history.losses), history.losses
    assert not module.skipped  # every video sample was trained on


def test_video_token_setting(tokenizer, tmp_path):
    from multimodal.training import build_model

    tokenizer.save(tmp_path / "tokenizer")
    spec = ModelSpec(tokenizer=str(tmp_path / "tokenizer"), decoder="tiny", encoder={"model_name": TINY_SIGLIP_384},
                     layout={"kind": "anyres"})
    assert spec.video_token is None and build_model(spec).video_token_id is None
    # A checkpoint saved before the field existed compares equal on resume (None is the default).
    saved = dataclasses.asdict(spec)
    del saved["video_token"]
    assert changed(dataclasses.asdict(spec), saved) == {}
    assert changed(dataclasses.asdict(dataclasses.replace(spec, video_token="<|reserved_token_2|>")), saved)
    with_video = dataclasses.replace(spec, video_token="<|reserved_token_2|>")
    assert build_model(with_video).video_token_id == tokenizer.reserved_token_id(2)
    # A single-image stage's export, without a video token, gets the spec's: it adds no weights.
    build_model(spec).save_pretrained(tmp_path / "single-image")
    resumed = build_model(dataclasses.replace(with_video, init_from=str(tmp_path / "single-image")))
    assert resumed.video_token_id == tokenizer.reserved_token_id(2)
    resumed.save_pretrained(tmp_path / "video")
    with pytest.raises(ValueError, match="video token"):
        build_model(dataclasses.replace(spec, init_from=str(tmp_path / "video"), video_token="<|reserved_token_3|>"))
    with pytest.raises(ValueError, match="same token"):
        build_model(dataclasses.replace(spec, video_token="<|reserved_token_1|>"))
    single_image = str(tmp_path / "single-image")
    with pytest.raises(ValueError, match="same token"):
        build_model(dataclasses.replace(spec, init_from=single_image, video_token="<|reserved_token_1|>"))


def test_a_next_onevision_stage_starts_from_the_previous_export_in_its_own_layout(tokenizer, tmp_path):
    """Stage 1's export (fixed layout) -> stage 1.5 (anyres): the same weights, a new newline; an
    anyres export keeps its trained newline."""
    from multimodal.training import build_model

    tokenizer.save(tmp_path / "tokenizer")
    spec = ModelSpec(tokenizer=str(tmp_path / "tokenizer"), decoder="tiny", encoder={"model_name": TINY_SIGLIP_384})
    stage1 = build_model(spec)
    assert not stage1.layout.is_anyres
    stage1.save_pretrained(tmp_path / "stage1")
    mid = build_model(dataclasses.replace(spec, init_from=str(tmp_path / "stage1"), layout={"kind": "anyres"}))
    assert mid.layout.is_anyres and mid.layout.grid_pinpoints[0] == (384, 384) and mid.training
    weights = stage1.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in mid.state_dict().items() if k != "image_newline")
    with torch.no_grad():
        mid.image_newline.fill_(0.5)
    mid.save_pretrained(tmp_path / "mid")
    ov = build_model(dataclasses.replace(spec, init_from=str(tmp_path / "mid"), layout={"kind": "anyres"},
                                         video_token="<|reserved_token_2|>"))
    assert ov.video_token_id == tokenizer.reserved_token_id(2) and torch.all(ov.image_newline == 0.5)
    # No layout in the spec: the saved model's stands.
    assert build_model(dataclasses.replace(spec, init_from=str(tmp_path / "mid"))).layout == mid.layout
