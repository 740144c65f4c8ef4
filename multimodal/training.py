"""Training with PyTorch Lightning: the VLM as a LightningModule, WebDataset shards as a DataModule.

A stage is configuration, not code: `StageConfig.train` names the modules that learn (stage 1:
["projector"]; stage 2: ["encoder", "projector", "decoder"]), each with its own learning rate.
Precision, gradient clipping, accumulation, devices and strategy are the Lightning Trainer's
settings (see configs/*.yaml).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

import projector as projectors
from encoders import OpenCLIPEncoder
from lm import Decoder, LMConfig, compile_blocks, load_decoder, load_tokenizer
from lm.config import PRESETS
from multimodal.batch import Batch
from multimodal.data import DataConfig, build_loader, dataset_for_model
from multimodal.data.resume import DataPosition, ResumePlan
from multimodal.layouts import ImageLayout, onevision_pinpoints
from multimodal.lora import LoraSettings, add_lora, is_adapter
from multimodal.model import VisionLanguageModel
from multimodal.parallel import FSDP2Strategy, is_sharded
from multimodal.resume_settings import check_data_layout

MODULES = ("encoder", "projector", "decoder")


@dataclass
class ModelSpec:
    """What to build. `decoder` is an LM preset name (lm.LMConfig.from_name) or a Hugging Face Llama
    directory; `encoder` holds OpenCLIPEncoder's arguments; `projector` projector.build's options
    (widths are filled in). `layout` is the image layout's fields (multimodal.layouts.ImageLayout:
    kind, max_tiles, grid_pinpoints); None is the fixed layout, {"kind": "anyres"} LLaVA-OneVision's
    (max_tiles 9, its 36 grids of the encoder's image size). `video_token` names the videos'
    placeholder token (e.g. "<|reserved_token_2|>"; anyres only); None: no videos, and the data path
    skips video samples. `init_from` starts from saved weights: a save_pretrained directory (whose
    architecture then wins; a video token is added to a model saved without one, which adds no
    weights) or a Lightning checkpoint of the same architecture."""

    tokenizer: str
    decoder: str = "demo"
    decoder_options: dict[str, Any] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=lambda: {"model_name": "ViT-B-16"})
    projector: dict[str, Any] = field(default_factory=lambda: {"kind": "mlp", "depth": 2})
    image_token: str = "<|reserved_token_1|>"
    init_from: str | None = None
    # None rather than {}: a checkpoint saved before this field existed compares equal on resume.
    layout: dict[str, Any] | None = None
    # None, as before this field existed (a checkpoint without it compares equal on resume).
    video_token: str | None = None


def image_layout(settings: dict[str, Any] | None, tile: int) -> ImageLayout:
    """ModelSpec.layout -> ImageLayout; an anyres layout without grid_pinpoints gets OneVision's
    (1..6 x 1..6 tiles of `tile` pixels, the encoder's image size)."""
    settings = dict(settings or {})
    if settings.get("kind") == "anyres" and not settings.get("grid_pinpoints"):
        settings["grid_pinpoints"] = onevision_pinpoints(tile)
    return ImageLayout.from_dict(settings)


@dataclass
class StageConfig:
    """Which modules train, at which learning rate, with which schedule (linear warmup, then cosine
    decay to min_lr_ratio of the peak over trainer.max_steps)."""

    train: list[str] = field(default_factory=lambda: ["projector"])
    lr: dict[str, float] = field(default_factory=lambda: {"encoder": 2e-6, "projector": 1e-3, "decoder": 2e-5})
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    gradient_checkpointing: bool = False
    # torch.compile each decoder block (lm.compile_blocks): true, or torch.compile's options
    # ({"mode": "max-autotune-no-cudagraphs"}). Worth it on a GPU; compiling costs a minute or more.
    compile: bool | dict[str, Any] = False
    # "bf16": store the modules this stage does not train in bf16 (stage 1: the encoder and the
    # decoder), as prismatic does: half their memory, and under bf16-mixed precision the same
    # matmuls (autocast computes them in bf16 anyway). Needs trainer.precision bf16-mixed. The
    # export at the end writes fp32 (the bf16 values) so the next stage starts in fp32.
    frozen_dtype: Literal["bf16"] | None = None


def build_model(spec: ModelSpec) -> VisionLanguageModel:
    if spec.init_from and (Path(spec.init_from) / "config.json").exists():
        return from_saved(spec)
    tokenizer = load_tokenizer(spec.tokenizer)
    if spec.decoder in PRESETS:
        # A preset's vocabulary follows the tokenizer unless set explicitly (the demo's is small).
        options = {"vocab_size": tokenizer.vocab_size, **spec.decoder_options}
        decoder = Decoder(LMConfig.from_name(spec.decoder, **options))
    else:
        decoder = load_decoder(spec.decoder, dtype=torch.float32, **spec.decoder_options)
    if decoder.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"decoder vocabulary {decoder.config.vocab_size} < tokenizer vocabulary {tokenizer.vocab_size}")
    encoder = OpenCLIPEncoder(**spec.encoder)
    proj = projectors.build(in_dim=encoder.hidden_size, out_dim=decoder.config.d_model, **spec.projector)
    video_token_id = None if spec.video_token is None else tokenizer.token_to_id(spec.video_token)
    model = VisionLanguageModel(encoder, proj, decoder, tokenizer, tokenizer.token_to_id(spec.image_token),
                                layout=image_layout(spec.layout, encoder.image_size),
                                video_token_id=video_token_id)
    if spec.init_from:
        load_lightning_weights(model, spec.init_from)
    return model


def from_saved(spec: ModelSpec) -> VisionLanguageModel:
    """The model of a save_pretrained directory (spec.init_from), to train: its architecture and
    weights, with the spec's image layout and video token where the spec sets them. That is how a
    OneVision stage goes on from the one before: stage 1's export (fixed layout) trains on in the
    anyres layout, with a new newline embedding; a single-image stage's export gains the video token
    (no weights). A model saved with another video token than the spec's: ValueError."""
    # from_pretrained hands back a model ready for inference (eval mode); this one trains.
    saved = VisionLanguageModel.from_pretrained(spec.init_from).train()
    layout = saved.layout if spec.layout is None else image_layout(spec.layout, saved.encoder.image_size)
    video_token_id = saved.video_token_id
    if spec.video_token is not None:
        video_token_id = saved.tokenizer.token_to_id(spec.video_token)
        if saved.video_token_id not in (None, video_token_id):
            raise ValueError(f"{spec.init_from} was saved with the video token "
                             f"{saved.tokenizer.id_to_token(saved.video_token_id)!r}; model.video_token asks for "
                             f"{spec.video_token!r}")
    if (layout, video_token_id) == (saved.layout, saved.video_token_id):
        return saved
    model = VisionLanguageModel(saved.encoder, saved.projector, saved.decoder, saved.tokenizer, saved.image_token_id,
                                saved.loss_chunk_size, layout=layout, video_token_id=video_token_id)
    if saved.layout.is_anyres and layout.is_anyres:
        model.image_newline = saved.image_newline  # the trained one
    model.lora = saved.lora  # its adapters sit inside the decoder (and encoder) it shares
    return model.train()


def load_lightning_weights(model: VisionLanguageModel, path: str) -> None:
    """Model weights from a Lightning checkpoint written by VLMModule (plain tensors and dicts only:
    read with weights_only=True, never full unpickling)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    model.load_state_dict(state)


def apply_stage(model: VisionLanguageModel, stage: StageConfig) -> None:
    unknown = set(stage.train) - set(MODULES)
    if unknown:
        raise ValueError(f"stage trains unknown modules {sorted(unknown)}; choose from {MODULES}")
    for name in MODULES:
        getattr(model, name).requires_grad_(name in stage.train)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"this stage would train nothing: train={stage.train} selects no parameters")
    missing_lr = [name for name in stage.train if name not in stage.lr]
    if missing_lr:
        raise ValueError(f"no learning rate for trained modules {missing_lr} (stage.lr has {sorted(stage.lr)})")
    lora = model.lora
    if lora is not None:
        # The adapted modules learn through their adapters only.
        untrained = [name for name in lora.modules if name not in stage.train]
        if untrained:
            raise ValueError(f"LoRA adapts {untrained}: list them in stage.train (its learning rate is the adapters')")
        for name in lora.modules:
            for parameter_name, parameter in getattr(model, name).named_parameters():
                parameter.requires_grad_(is_adapter(parameter_name))
    model.decoder.gradient_checkpointing = stage.gradient_checkpointing
    if stage.frozen_dtype is not None:
        if stage.frozen_dtype != "bf16":
            raise ValueError(f"stage.frozen_dtype must be bf16 or null, got {stage.frozen_dtype!r}")
        for name in MODULES:
            if name not in stage.train:
                getattr(model, name).to(torch.bfloat16)
    if stage.compile:
        compile_blocks(model.decoder, **(stage.compile if isinstance(stage.compile, dict) else {}))


def parameter_report(model: VisionLanguageModel) -> str:
    lines = []
    for name in MODULES:
        params = list(getattr(model, name).parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        lines.append(f"  {name:<9} {trainable:>14,} trainable / {total:>14,}")
    return "parameters per module:\n" + "\n".join(lines)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warmup to 1, then cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def data_epoch(trainer: L.Trainer) -> int:
    """The epoch whose data the training loop reads next: the one Lightning gives samplers
    (its count of processed epochs, as trainer.current_epoch in a run that was not interrupted).

    Resuming from a checkpoint taken after an epoch's last Batch but before the epoch's end (a
    ModelCheckpoint every n steps), Lightning counts that epoch as done and goes on with the next
    one, without calling on_train_epoch_start; the loader, made before that, must already read the
    next epoch, from its start. (A checkpoint taken at the epoch's end has it processed already.)"""
    epochs = trainer.fit_loop.epoch_progress.current
    epoch = epochs.processed
    if epochs.started > epochs.processed and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
        epoch += 1
    return epoch


def fused_adamw_supported(model: torch.nn.Module) -> bool:
    """AdamW's fused kernel (one pass over all parameters: about 8x faster than the per-tensor loop
    on CPU) runs on CPU and CUDA floating-point parameters."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())


class VLMModule(L.LightningModule):
    """`lora`: LoRA adapters on the decoder (and optionally the encoder blocks); the stage must train
    the adapted modules, which then learn through their adapters only (multimodal.lora)."""

    def __init__(self, model: ModelSpec, stage: StageConfig | None = None, export_dir: str | None = None,
                 lora: LoraSettings | None = None):
        super().__init__()
        self.spec = model
        self.stage = stage or StageConfig()
        self.export_dir = export_dir
        self.lora = lora
        # Plain dicts, so a checkpoint loads with torch.load(weights_only=True). `lora` only when
        # set, so that checkpoints from before it compare equal on resume.
        hyperparameters = {"model": dataclasses.asdict(self.spec), "stage": dataclasses.asdict(self.stage),
                           "export_dir": export_dir}
        if lora is not None:
            hyperparameters["lora"] = dataclasses.asdict(lora)
        self.save_hyperparameters(hyperparameters)
        self.model: VisionLanguageModel | None = None
        self.skipped: Counter[str] = Counter()
        self.source_counts: Counter[str] = Counter()
        self._step_started: float | None = None
        # What this rank has trained on in the current epoch: saved with every checkpoint so that a
        # resumed run goes on with exactly the data an uninterrupted one would have seen.
        self.data_position = DataPosition()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = build_model(self.spec)
        if self.lora is not None and self.model.lora is None:  # a saved model may bring its own adapters
            add_lora(self.model, self.lora)
        apply_stage(self.model, self.stage)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy):
            strategy.shard(self.model)

    def on_fit_start(self) -> None:
        precision = self.trainer.precision
        if self.stage.frozen_dtype is not None and precision != "bf16-mixed":
            raise ValueError(f"stage.frozen_dtype {self.stage.frozen_dtype} needs trainer.precision bf16-mixed (autocast "
                             f"runs the bf16 frozen modules and the fp32 trained ones together), not {precision}")
        rank_zero_info(f"stage trains {self.stage.train}; " + parameter_report(self.model))

    def on_train_start(self) -> None:
        # Resumed from a checkpoint taken at an epoch's end, Lightning (2.6) counts that epoch as
        # processed but, when training runs to max_steps, not as completed: trainer.current_epoch
        # would then stay one behind the uninterrupted run's (and name checkpoints so) for the rest
        # of the run. Lightning makes the same correction itself when training runs to max_epochs.
        epochs = self.trainer.fit_loop.epoch_progress.current
        epochs.completed = max(epochs.completed, epochs.processed)

    def on_train_epoch_start(self) -> None:
        # Lightning reseeds samplers, not iterable datasets: reshuffle the shards for this epoch.
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(data_epoch(self.trainer))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.data_position.consumed(batch.position)
        loss, _ = self.model(batch)
        rows = batch.input_ids.shape[0]
        tokens = batch.real_tokens()
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        self.log("train/padding_waste", 1.0 - tokens / batch.input_ids.numel(), batch_size=rows)
        now = time.perf_counter()
        if self._step_started is not None:
            self.log("train/tokens_per_s", tokens / max(now - self._step_started, 1e-9), prog_bar=True, batch_size=rows)
        self._step_started = now
        self.skipped.update(batch.skipped)
        for reason, count in self.skipped.items():
            self.log(f"data/skipped_{reason}", float(count), batch_size=rows)
        # Achieved mix so far (this rank): the fraction of samples from each source.
        self.source_counts.update(batch.sources)
        if len(self.source_counts) > 1:
            total = sum(self.source_counts.values())
            for name, count in self.source_counts.items():
                self.log(f"data/source_{name}", count / total, batch_size=rows)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank reads its own shards, so the checkpoint (written by rank 0) holds every rank's
        # position. Lightning calls this hook on all ranks together, as a collective needs.
        mine = {"position": self.data_position.state_dict(), "skipped": dict(self.skipped),
                "sources": dict(self.source_counts)}
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        checkpoint["data_position"] = ranks

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ranks = checkpoint.get("data_position")
        if not ranks:
            return
        # A checkpoint from another number of ranks: the data module refuses its plan (ResumePlan.check).
        mine = ranks[self.global_rank] if self.global_rank < len(ranks) else ranks[0]
        self.data_position = DataPosition.from_state_dict(mine["position"])
        self.skipped, self.source_counts = Counter(mine["skipped"]), Counter(mine["sources"])

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, _ = self.model(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch.input_ids.shape[0])
        return loss

    def configure_optimizers(self) -> dict:
        groups = []
        for name in self.stage.train:
            params = [p for p in getattr(self.model, name).parameters() if p.requires_grad]
            # Norm weights and biases are not decayed: shrinking them toward 0 only hurts.
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            lr = self.stage.lr[name]
            groups.append({"params": decay, "lr": lr, "weight_decay": self.stage.weight_decay})
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=tuple(self.stage.betas),
                                      fused=fused_adamw_supported(self.model))
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError("set trainer.max_steps: the cosine schedule needs the length of the run "
                             "(streamed shards have no fixed epoch length)")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, self.stage.warmup_steps, total, self.stage.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_end(self) -> None:
        if not self.export_dir:
            return
        state = None
        if is_sharded(self.model):
            # Gathering the full weights is a collective: every rank takes part, rank 0 keeps them.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.stage.frozen_dtype is not None:  # the next stage starts from fp32 weights
            state = {name: t.float() if t.is_floating_point() else t
                     for name, t in (self.model.state_dict() if state is None else state).items()}
        if self.trainer.is_global_zero:
            self.model.save_pretrained(self.export_dir, state_dict=state)
            rank_zero_info(f"saved the model to {self.export_dir}")


class ShardDataModule(L.LightningDataModule):
    """Training and validation streams. The tokenizer, preprocessing and image token counts come
    from the model being trained (data.dataset_for_model: its layout decides fixed or anyres
    Batches), so the data always matches it.

    Before training, the shard counts are checked against world size x num_workers (ValueError when
    a reader would get no shard; a warning in resampled mode). With several ranks, every rank must
    yield the same number of batches per epoch, or the others hang in their next collective: they
    need data.train.resampled and data.train.batches_per_epoch (ValueError otherwise)."""

    def __init__(self, train: DataConfig | None = None, val: DataConfig | None = None, num_workers: int = 2):
        super().__init__()
        self.train_config, self.val_config, self.num_workers = train, val, num_workers

    def _loader(self, config: DataConfig, epoch: int = 0, plan: ResumePlan | None = None):
        model: VisionLanguageModel = self.trainer.lightning_module.model
        dataset = dataset_for_model(config, model)  # config.pad_to_square is applied by build_dataset
        dataset.set_epoch(epoch)
        dataset.resume_from(plan)  # build_loader checks the plan against the ranks and workers
        return build_loader(dataset, self.num_workers, world_size=self.trainer.world_size)

    def train_dataloader(self):
        if self.train_config is None:
            raise ValueError("no training data: set data.train.shards or data.train.sources")
        config = self.train_config
        if self.trainer.world_size > 1 and not (config.resampled and config.batches_per_epoch):
            # A rank that runs out of Batches first leaves the others waiting in a collective forever.
            raise ValueError(f"{self.trainer.world_size} ranks need equal numbers of Batches per epoch: set "
                             "data.train.resampled: true and data.train.batches_per_epoch (read-once shards give "
                             "each rank a different number of samples)")
        # Lightning makes the loader (and starts its workers) before on_train_epoch_start, also when
        # it resumes inside an epoch: the epoch and the data position are set here.
        epoch = data_epoch(self.trainer)
        position = getattr(self.trainer.lightning_module, "data_position", None)
        plan = position.plan() if position is not None else None
        if not (config.resume and plan is not None and plan.epoch == epoch):
            plan = None
        return self._loader(config, epoch, plan)

    def state_dict(self) -> dict[str, Any]:
        # The settings the saved data position is only valid for (checked on resume).
        # (The ranks and workers it needs are in the position itself: ResumePlan.check.)
        return {"train": None if self.train_config is None else dataclasses.asdict(self.train_config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.train_config is None or state.get("train") is None or not self.train_config.resume:
            return  # resume: false starts the epoch's data afresh, with whatever settings
        check_data_layout(dataclasses.asdict(self.train_config), state["train"])

    def val_dataloader(self):
        return [] if self.val_config is None else self._loader(self.val_config)
