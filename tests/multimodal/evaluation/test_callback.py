"""Generation-based validation during training: every N optimizer steps the model answers the
validation items, and the scores of those answers are logged beside the loss."""

from __future__ import annotations

import io
import json

import lightning as L
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from multimodal.data import DataConfig
from multimodal.evaluation.callback import GenerationValidation
from multimodal.evaluation.run import score
from multimodal.training import ModelSpec, ShardDataModule, StageConfig, VLMModule
from tests.multimodal.data.helpers import write_shards
from tests.multimodal.tiny import TINY_CLIP


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return buffer.getvalue()


class Steps(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append(trainer.global_step)


def test_scores_are_logged_every_n_steps_from_the_models_own_answers(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer")
    shards, _ = write_shards(tmp_path / "train", num_samples=24, num_shards=2)
    colors = [(200, 20, 20), (20, 200, 20), (20, 20, 200)]
    with TarWriter(str(tmp_path / "val.tar")) as writer:
        for i, color in enumerate(colors):
            writer.write({"__key__": f"v{i}", "png": png(color),
                          "json": json.dumps({"captions": {"en": ["a square"], "es": ["un cuadrado"]}}).encode()})
    spec = ModelSpec(tokenizer=str(tmp_path / "tokenizer"), decoder="tiny", decoder_options={"attention": "sdpa"},
                     encoder={"model_name": TINY_CLIP})
    module = VLMModule(spec, StageConfig(train=["projector", "decoder"], lr={"projector": 1e-3, "decoder": 1e-3}))
    validation = GenerationValidation(str(tmp_path / "val.tar"), every_n_steps=2, languages=["en", "es"], limit=4,
                                      batch_size=3, max_new_tokens=4)
    steps = Steps()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accumulate_grad_batches=2, callbacks=[validation, steps])
    data = ShardDataModule(DataConfig(shards, max_tokens=160, rows_per_batch=2, shuffle_buffer=8), num_workers=0)
    trainer.fit(module, datamodule=data)
    assert validation.last_step == 4 and module.model.training
    records = validation.last_records
    assert [(r["key"], r["language"]) for r in records] == [("v0", "en"), ("v0", "es"), ("v1", "en"), ("v1", "es")]
    assert validation.last_metrics == pytest.approx(
        {f"val_gen/{k}": v for k, v in score(records, "caption").items() if k != "items"})
    for name in ("val_gen/cider", "val_gen/bleu4", "val_gen/chrf", "val_gen/language_fidelity"):
        assert torch.isclose(trainer.callback_metrics[name], torch.tensor(validation.last_metrics[name]))
    # The answers were the model's own at step 4, the end of training.
    model = module.model.eval()
    for record, color in zip(records, [colors[0], colors[0], colors[1], colors[1]]):
        image = Image.open(io.BytesIO(png(color))).convert("RGB")
        assert record["prediction"] == str(model.caption(image, record["language"], max_new_tokens=4)).strip()


def test_a_source_without_usable_items_is_an_error(tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    with pytest.raises(FileNotFoundError, match="2 of 2 shards do not exist"):
        GenerationValidation(str(tmp_path / "none-{0..1}.tar")).setup(trainer, None, "fit")
    with TarWriter(str(tmp_path / "bad.tar")) as writer:
        writer.write({"__key__": "x", "png": b"not an image", "txt": b"a caption"})
    validation = GenerationValidation(str(tmp_path / "bad.tar"))
    validation.setup(trainer, None, "fit")
    with pytest.raises(ValueError, match="no usable item.*image_undecodable"):
        validation._load()
