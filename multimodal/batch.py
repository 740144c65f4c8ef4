"""The model-ready batch that the data path produces and VisionLanguageModel consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from lm.attention import SeqLayout
from multimodal.layouts.inputs import ImageInputs


@dataclass
class Batch:
    """input_ids: [B, T] token ids, each image's placeholder expanded to the projector's token count.
    labels: [B, T] the same ids where a loss is taken, -100 elsewhere (Hugging Face convention:
    not shifted). pixels: [N, 3, H, W], the images of the whole batch in the order their
    placeholders appear (row by row); in the anyres layout, ImageInputs (views and sizes). layout: plain causal rows, or packed rows with sample lengths.
    The data path also reports what it did: num_samples packed into this batch, and samples skipped
    (by reason) since the previous batch of the same worker, and how many of its samples came from
    each data source (by source name), the keys of the samples in each row, and `position`: where
    the reader that made it stood right after it (data.resume; what a checkpoint saves).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    pixels: torch.Tensor | ImageInputs | None = None
    layout: SeqLayout | None = None
    num_samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    keys: list[list[str]] = field(default_factory=list)
    position: dict[str, Any] | None = None

    def to(self, device: torch.device | str) -> "Batch":
        """The same Batch with its tensors on `device` (and its own copies of the count dicts)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {name: value.to(device, non_blocking=True) for name, value in values.items()
                 if isinstance(value, (torch.Tensor, ImageInputs))}
        return replace(self, **moved, skipped=dict(self.skipped), sources=dict(self.sources))

    def real_tokens(self) -> int:
        """The tokens that are not padding: the sample lengths of a packed layout (host-side numbers,
        no device synchronisation); in plain causal rows every position counts."""
        if self.layout is not None and self.layout.is_packed:
            return sum(sum(row) for row in self.layout.seq_lens)
        return self.input_ids.numel()
