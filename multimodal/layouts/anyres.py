"""AnyresImages: a model's anyres layout applied to its encoder, the one source of every image's and
video's token count and views, for the model (VisionLanguageModel.anyres) and for the DataLoader
workers of the data path, which get it from the model. It gives a sample's images the layout (LLaVA-OneVision's: an image alone in its sample becomes its base view and tiles, images
beside others one square view each; a video's frames one squashed view each, pooled 2x2): the
layout, the encoder's tile size, a view's token grid side and the encoder's mean and std. Plain
values, picklable.

Token counts come from the images' sizes alone (multimodal.layouts.geometry), so a sample's length
is known from its images' headers, before any pixel is decoded; the views are those of
multimodal.layouts.views.sample_views, as VisionLanguageModel.preprocess makes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from multimodal.layouts.config import ImageLayout
from multimodal.layouts.geometry import Size, anyres_image_tokens, video_token_count
from multimodal.layouts.views import sample_views, video_views


@dataclass(frozen=True)
class AnyresImages:
    """layout: the model's ImageLayout (anyres). tile: the encoder's input size in pixels (a view's
    side). side: tokens along a side of one view's grid. mean, std: the encoder's normalisation."""

    layout: ImageLayout
    tile: int
    side: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.layout.is_anyres:
            raise ValueError(f"AnyresImages is for the anyres layout, got kind {self.layout.kind!r}")
        if self.tile <= 0 or self.side <= 0:
            raise ValueError(f"tile and side must be positive, got {self.tile} and {self.side}")
        self.layout.check_tile(self.tile)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def min_tokens(self) -> int:
        """The fewest tokens an image can take: one view and its newline (one of several images)."""
        return self.side * self.side + 1

    def token_counts(self, sizes: Sequence[Size]) -> list[int]:
        """Placeholders each image of one sample needs, from the images' (height, width): the same
        numbers as VisionLanguageModel.image_token_counts."""
        return [anyres_image_tokens(size, self.layout.grid_pinpoints, self.layout.max_tiles, self.side, self.tile,
                                    alone=len(sizes) == 1) for size in sizes]

    def views(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """The encoder's input views of one sample's images, one [views, 3, tile, tile] tensor per image."""
        return sample_views(images, self.layout, self.tile, self.mean, self.std)

    @property
    def frames_upbound(self) -> int:
        """The most frames a video gives (sampled uniformly over it)."""
        return self.layout.frames_upbound

    def video_tokens(self, frames: int) -> int:
        """Placeholders a video of `frames` frames needs: the same number as
        VisionLanguageModel.video_token_counts (every frame's pooled grid, one newline)."""
        return video_token_count(frames, self.side)

    def video_views(self, frames: Sequence[Image.Image]) -> torch.Tensor:
        """The encoder's input views of one video's frames, [F, 3, tile, tile], as the model's own
        preprocess makes them (layouts.views.video_views)."""
        return video_views(frames, self.tile, self.mean, self.std)
