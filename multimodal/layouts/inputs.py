"""ImageInputs: the images of a batch in the anyres layout, as the encoder takes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from multimodal.layouts.geometry import Size


@dataclass
class ImageInputs:
    """pixels: [views, 3, S, S], the views of every image in placeholder order (an image's base view
    first, then its tiles). sizes: each image's original (height, width). views: how many views
    each image has (1: the image is one of several in its sample)."""

    pixels: torch.Tensor
    sizes: list[Size]
    views: list[int]

    def __post_init__(self) -> None:
        if self.pixels.ndim != 4:
            raise ValueError(f"pixels must be [views, 3, height, width], got shape {tuple(self.pixels.shape)}")
        if len(self.sizes) != len(self.views):
            raise ValueError(f"{len(self.sizes)} image sizes for {len(self.views)} images")
        if sum(self.views) != self.pixels.shape[0] or min(self.views, default=1) < 1:
            raise ValueError(f"views per image {self.views} do not add up to the {self.pixels.shape[0]} views given")
        self.sizes = [(int(h), int(w)) for h, w in self.sizes]

    def __len__(self) -> int:
        return len(self.sizes)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "ImageInputs":
        return replace(self, pixels=self.pixels.to(device=device, dtype=dtype, non_blocking=non_blocking))

    @classmethod
    def cat(cls, parts: Sequence["ImageInputs"]) -> "ImageInputs | None":
        """The images of several prompts or samples, one after another (None for none)."""
        parts = [part for part in parts if part is not None and len(part)]
        if not parts:
            return None
        return cls(torch.cat([part.pixels for part in parts]), [s for part in parts for s in part.sizes],
                   [v for part in parts for v in part.views])
