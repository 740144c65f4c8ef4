"""ImageInputs: the images of a batch in the anyres layout, as the encoder takes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from multimodal.layouts.geometry import Size


@dataclass
class ImageInputs:
    """pixels: [views, 3, S, S], the views of every image in placeholder order (an image's base view
    first, then its tiles). sizes: each image's original (height, width). views: how many views
    each image has (1: the image is one of several in its sample). Videos, under their own
    placeholder: frames [F, 3, S, S], every video's frames in placeholder order, and frames_per_video.
    (No images: pixels with 0 views.)"""

    pixels: torch.Tensor
    sizes: list[Size]
    views: list[int]
    frames: torch.Tensor | None = None
    frames_per_video: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pixels.ndim != 4:
            raise ValueError(f"pixels must be [views, 3, height, width], got shape {tuple(self.pixels.shape)}")
        if len(self.sizes) != len(self.views):
            raise ValueError(f"{len(self.sizes)} image sizes for {len(self.views)} images")
        if sum(self.views) != self.pixels.shape[0] or min(self.views, default=1) < 1:
            raise ValueError(f"views per image {self.views} do not add up to the {self.pixels.shape[0]} views given")
        self.sizes = [(int(h), int(w)) for h, w in self.sizes]
        frames = 0 if self.frames is None else self.frames.shape[0]
        if sum(self.frames_per_video) != frames or min(self.frames_per_video, default=1) < 1:
            raise ValueError(f"frames per video {self.frames_per_video} do not add up to the {frames} frames given")

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_videos(self) -> int:
        return len(self.frames_per_video)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "ImageInputs":
        frames = None if self.frames is None else self.frames.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return replace(self, pixels=self.pixels.to(device=device, dtype=dtype, non_blocking=non_blocking), frames=frames)

    @classmethod
    def cat(cls, parts: Sequence["ImageInputs"]) -> "ImageInputs | None":
        """The images of several prompts or samples, one after another (None for none)."""
        parts = [part for part in parts if part is not None and (len(part) or part.num_videos)]
        if not parts:
            return None
        frames = [part.frames for part in parts if part.frames is not None]
        return cls(torch.cat([part.pixels for part in parts]), [s for part in parts for s in part.sizes],
                   [v for part in parts for v in part.views], torch.cat(frames) if frames else None,
                   [f for part in parts for f in part.frames_per_video])
