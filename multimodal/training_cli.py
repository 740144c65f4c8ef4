"""`salamandra-vl fit` / `validate`: LightningCLI with what a training run needs by default.

- Periodic checkpoints: every `checkpoint.every_n_train_steps` steps (default 500) and `last.ckpt`,
  written atomically (checkpoint_io.AtomicCheckpointIO), unless the config has a ModelCheckpoint of
  its own (which then decides) or `trainer.enable_checkpointing: false`.
- Resumes that keep the given settings: LightningCLI replaces the model's settings with those
  saved in the checkpoint given by --ckpt_path, so a resumed run would silently ignore a new export
  directory (and write its export over the first run's). Here the settings given on the command
  line and in the configs stand; those the checkpoint fixes (the architecture, the optimizer's
  settings: resume_settings.MAY_CHANGE says which may change) must equal the saved ones, or the
  run is refused with ResumeMismatch naming each of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer import Trainer

from multimodal.resume_settings import check_model_settings


@dataclass
class CheckpointSettings:
    """The default checkpoints of `salamandra-vl fit` (Lightning's ModelCheckpoint arguments):
    every_n_train_steps: how often (to save none: --trainer.enable_checkpointing false);
    save_top_k: how many step checkpoints to keep (1: the newest; -1: all; 0: none, last.ckpt only);
    save_last: also keep `last.ckpt` (true: a copy; "link": a symbolic link, no second write);
    dirpath: where (default: the logger's version directory + /checkpoints, or
    trainer.default_root_dir/checkpoints without a logger)."""

    every_n_train_steps: PositiveInt = 500
    save_top_k: Literal[-1, 0, 1] = 1
    save_last: bool | Literal["link"] = True
    dirpath: str | None = None


def sharded_checkpoint_settings(checkpoint_dir: str) -> dict[str, Any]:
    """The VLMModule settings saved in a sharded checkpoint's meta.pt."""
    from multimodal.consolidate import read_meta

    return read_meta(checkpoint_dir).get("hyper_parameters", {})


class TrainingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(CheckpointSettings, "checkpoint")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Kept before LightningCLI puts the checkpoint's saved settings in their place.
        subcommand = self.config.get("subcommand")
        self.given_model = copy.deepcopy(self.config[subcommand]["model"]) if subcommand else None

    def before_instantiate_classes(self) -> None:
        section = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        ckpt_path = section.get("ckpt_path")
        if ckpt_path and self.given_model is not None:
            if Path(ckpt_path).is_dir():
                # A sharded checkpoint (fsdp2): LightningCLI reads settings from checkpoint files only.
                saved = sharded_checkpoint_settings(ckpt_path)
            else:
                saved = section["model"].as_dict()
            check_model_settings(self.given_model.as_dict(), saved)
            section["model"] = self.given_model

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        section = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = section.get("trainer") or {}
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        settings: CheckpointSettings = section["checkpoint"]
        if (self.subcommand in ("fit", None) and trainer.get("enable_checkpointing") is not False
                and not any(isinstance(callback, ModelCheckpoint) for callback in callbacks)):
            kwargs["callbacks"] = [*callbacks, ModelCheckpoint(
                dirpath=settings.dirpath, every_n_train_steps=settings.every_n_train_steps,
                save_top_k=settings.save_top_k, save_last=settings.save_last)]
        return super().instantiate_trainer(**kwargs)
