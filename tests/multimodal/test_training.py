"""Lightning training on CPU: stages, freezing, schedule, resume, stage-to-stage weights."""

import math

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from multimodal.data import DataConfig
from multimodal.training import (
    ModelSpec,
    ShardDataModule,
    StageConfig,
    VLMModule,
    warmup_cosine,
)
from tests.multimodal.data.helpers import write_shards
from tests.multimodal.tiny import TINY_CLIP


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    tokenizer.save(root / "tokenizer")
    shards, _ = write_shards(root / "shards", num_samples=24, num_shards=2)
    spec = ModelSpec(tokenizer=str(root / "tokenizer"), decoder="tiny", decoder_options={"attention": "sdpa"},
                     encoder={"model_name": TINY_CLIP}, projector={"kind": "mlp", "depth": 2})
    return root, spec, shards


def trainer(max_steps: int, **options) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    return L.Trainer(**{**defaults, **options})


def data(shards, **options) -> ShardDataModule:
    return ShardDataModule(DataConfig(shards, max_tokens=160, rows_per_batch=2, shuffle_buffer=8, **options),
                           num_workers=0)


class LossHistory(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_full_training_loss_falls_by_a_large_factor(setup):
    _, spec, shards = setup
    torch.manual_seed(0)
    module = VLMModule(spec, StageConfig(train=["encoder", "projector", "decoder"],
                                         lr={"encoder": 3e-3, "projector": 3e-3, "decoder": 3e-3}, warmup_steps=5))
    history = LossHistory()
    trainer(80, callbacks=[history]).fit(module, datamodule=data(shards))
    first, last = sum(history.losses[:5]) / 5, sum(history.losses[-5:]) / 5
    assert last < first / 4, (first, last)


def test_stage1_trains_only_the_projector(setup):
    _, spec, shards = setup
    module = VLMModule(spec, StageConfig(train=["projector"], lr={"projector": 1e-2}))
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer(6).fit(module, datamodule=data(shards))
    after = module.model.state_dict()
    for name, tensor in before.items():
        if name.startswith("projector."):
            continue
        assert torch.equal(after[name], tensor), name
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("projector."))


def test_stage_that_trains_nothing_is_refused(setup):
    _, spec, _ = setup
    with pytest.raises(ValueError, match="would train nothing"):
        VLMModule(spec, StageConfig(train=[])).configure_model()
    with pytest.raises(ValueError, match="unknown modules"):
        VLMModule(spec, StageConfig(train=["vision"])).configure_model()
    with pytest.raises(ValueError, match=r"no learning rate for trained modules \['decoder'\]"):
        VLMModule(spec, StageConfig(train=["decoder"], lr={"projector": 1e-3})).configure_model()


def test_resume_restores_model_optimizer_schedule_and_step(setup, tmp_path):
    _, spec, shards = setup
    stage = StageConfig(train=["projector", "decoder"], lr={"projector": 1e-3, "decoder": 1e-3}, warmup_steps=3)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer(4, callbacks=[checkpoints], enable_checkpointing=True).fit(VLMModule(spec, stage), datamodule=data(shards))
    saved = torch.load(checkpoints.last_model_path or next(tmp_path.glob("*.ckpt")), weights_only=True)

    resumed = VLMModule(spec, stage)
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, module):
            seen["step"] = trainer.global_step
            seen["lr_steps"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch
            seen["exp_avg"] = next(iter(trainer.optimizers[0].state.values()))["exp_avg"].clone()
            seen["weights"] = {k: v.clone() for k, v in module.model.state_dict().items()}

    ckpt = str(next(tmp_path.glob("*.ckpt")))
    trainer(8, callbacks=[Probe()]).fit(resumed, datamodule=data(shards), ckpt_path=ckpt)
    assert seen["step"] == 4 and seen["lr_steps"] == 4
    first_state = next(iter(saved["optimizer_states"][0]["state"].values()))["exp_avg"]
    assert torch.equal(seen["exp_avg"], first_state)
    for name, tensor in seen["weights"].items():
        assert torch.equal(tensor, saved["state_dict"]["model." + name]), name


def test_stage2_starts_from_stage1_weights(setup, tmp_path):
    _, spec, shards = setup
    stage1 = VLMModule(spec, StageConfig(train=["projector"], lr={"projector": 1e-2}), export_dir=str(tmp_path / "s1"))
    trainer(3).fit(stage1, datamodule=data(shards))
    from dataclasses import replace

    stage2 = VLMModule(replace(spec, init_from=str(tmp_path / "s1")), StageConfig(train=["encoder", "projector", "decoder"]))
    stage2.configure_model()
    for name, tensor in stage1.model.state_dict().items():
        assert torch.equal(stage2.model.state_dict()[name], tensor), name
    assert all(p.requires_grad for p in stage2.model.parameters())


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_compiled_decoder_blocks_train_like_eager(setup):
    _, spec, shards = setup
    losses = {}
    for name, compile in (("eager", False), ("compiled", {"backend": "aot_eager"})):
        torch.manual_seed(0)
        stage = StageConfig(train=["projector", "decoder"], lr={"projector": 1e-3, "decoder": 1e-3}, compile=compile)
        module = VLMModule(spec, stage)
        history = LossHistory()
        trainer(4, callbacks=[history]).fit(module, datamodule=data(shards))
        losses[name] = history.losses
        blocks = module.model.decoder.model.layers
        assert all((block._compiled_call_impl is not None) == bool(compile) for block in blocks)
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-6)


def test_stage1_can_store_the_frozen_modules_in_bf16(setup, tmp_path):
    """frozen_dtype bf16: encoder and decoder in bf16 (half their memory), the projector in fp32 and
    learning under bf16-mixed; the frozen weights are the bf16 values of the fp32 ones and do not
    move; the export is fp32 throughout, so the next stage starts in fp32."""
    _, spec, shards = setup
    stage = StageConfig(train=["projector"], lr={"projector": 1e-2}, frozen_dtype="bf16")
    module = VLMModule(spec, stage, export_dir=str(tmp_path / "export"))
    reference = VLMModule(spec, StageConfig(train=["projector"], lr={"projector": 1e-2}))
    torch.manual_seed(0)
    module.configure_model()
    torch.manual_seed(0)
    reference.configure_model()
    fp32 = {k: v.clone() for k, v in reference.model.state_dict().items()}
    dtypes = {name: {p.dtype for p in getattr(module.model, name).parameters()}
              for name in ("encoder", "projector", "decoder")}
    assert dtypes == {"encoder": {torch.bfloat16}, "projector": {torch.float32}, "decoder": {torch.bfloat16}}
    history = LossHistory()
    trainer(8, precision="bf16-mixed", callbacks=[history]).fit(module, datamodule=data(shards))
    assert all(math.isfinite(loss) for loss in history.losses)
    saved = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    for name, tensor in fp32.items():
        if name.startswith("projector."):
            assert not torch.equal(saved[name], tensor), name  # it learned
        elif name in saved:
            assert torch.equal(saved[name], tensor.to(torch.bfloat16).float()), name  # frozen: bf16-rounded, unmoved
    with pytest.raises(ValueError, match="bf16-mixed"):
        trainer(1).fit(VLMModule(spec, stage), datamodule=data(shards))


def test_several_ranks_need_equal_batch_counts_before_training(setup):
    """With several ranks a read-once epoch gives each rank another number of Batches, and the rank
    that runs out first would leave the others waiting in a collective: refused before training."""
    from types import SimpleNamespace

    _, _, shards = setup
    for options in ({}, {"batches_per_epoch": 4}, {"resampled": True}):
        module = data(shards, **options)
        module.trainer = SimpleNamespace(world_size=2)
        with pytest.raises(ValueError, match="resampled: true and data.train.batches_per_epoch"):
            module.train_dataloader()
