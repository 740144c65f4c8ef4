"""Generation-based validation during training: every N optimizer steps, the model answers the items
of an evaluation source (the shard format of `salamandra-vl evaluate`) and the scores are logged
beside the loss: `val_gen/cider` (captions), `val_gen/vqa_accuracy`, `val_gen/choice_accuracy`,
and `val_gen/language_fidelity` always. A loss can fall while answers drift into English; this shows it.

    trainer:
      callbacks:
        - class_path: multimodal.evaluation.callback.GenerationValidation
          init_args: {data: "data/val-captions-{000..003}.tar", every_n_steps: 500, languages: [en, es, ca]}

Rank 0 generates (greedy, batched) while the others wait at their next collective; the items are
read once and kept (`limit` of them). Not under the fsdp2 strategy, whose weights are sharded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import islice
from typing import Any

import lightning as L
import torch

from multimodal.evaluation.run import predict, score
from multimodal.evaluation.samples import EvalItem, read_items, shard_urls


class GenerationValidation(L.Callback):
    def __init__(self, data: str | list[str], every_n_steps: int = 500, task: str = "caption",
                 languages: Sequence[str] | None = None, limit: int = 64, batch_size: int = 8,
                 max_new_tokens: int = 32) -> None:
        if every_n_steps < 1 or limit < 1:
            raise ValueError(f"every_n_steps and limit must be >= 1, got {every_n_steps} and {limit}")
        self.data, self.every_n_steps, self.task = data, every_n_steps, task
        self.languages = list(languages) if languages else None
        self.limit, self.batch_size, self.max_new_tokens = limit, batch_size, max_new_tokens
        self.items: list[EvalItem] | None = None
        self.skipped: Counter = Counter()
        self.last_step = -1
        self.last_records: list[dict[str, Any]] = []
        self.last_metrics: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from multimodal.parallel import FSDP2Strategy

        if isinstance(trainer.strategy, FSDP2Strategy):
            raise ValueError("GenerationValidation does not run under the fsdp2 strategy (its weights are sharded); "
                             "evaluate the consolidated checkpoints with salamandra-vl evaluate instead")
        self.urls = shard_urls(self.data)

    def _load(self) -> list[EvalItem]:
        if self.items is None:
            items = list(islice(read_items(self.urls, self.task, self.languages, self.skipped), self.limit))
            if not items:
                raise ValueError(f"GenerationValidation: no usable item in {self.data!r} (skipped: {dict(self.skipped)})")
            self.items = items
        return self.items

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # Called for every micro-batch; the step count moves once per optimizer step.
        if step == 0 or step % self.every_n_steps or step == self.last_step:
            return
        self.last_step = step
        if trainer.is_global_zero:
            model = pl_module.model
            was_training = model.training
            model.eval()
            try:
                self.last_records = predict(model, self._load(), self.batch_size, progress=False,
                                            max_new_tokens=self.max_new_tokens)
            finally:
                model.train(was_training)
            self.last_metrics = {f"val_gen/{name}": float(value)
                                 for name, value in score(self.last_records, self.task).items() if name != "items"}
            for logger in trainer.loggers:
                logger.log_metrics(self.last_metrics, step=step)
            trainer.callback_metrics.update({name: torch.tensor(value) for name, value in self.last_metrics.items()})
        trainer.strategy.barrier("generation_validation")

