"""ImageLayout: how a model turns each image into tokens; saved in the model's config.json."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("fixed", "anyres")
_ANYRES_MAX = re.compile(r"anyres_max_(\d+)")


def onevision_pinpoints(tile: int = 384, largest: int = 6) -> list[list[int]]:
    """LLaVA-OneVision's grid pinpoints, as (height, width) in pixels: every grid of 1..largest tiles
    a side, in the row-major order that settles ties in best_resolution ([[384, 384], [384, 768], ...])."""
    return [[tile * rows, tile * cols] for rows in range(1, largest + 1) for cols in range(1, largest + 1)]


@dataclass(frozen=True)
class ImageLayout:
    """kind "fixed": one view per image at the encoder's size, projector tokens only (LLaVA-1.5; the
    default). kind "anyres": LLaVA-OneVision. A sample with one image gets the squashed whole image
    (base view) plus the tiles of the best-fitting grid of `grid_pinpoints` ((height, width) pixel
    sizes, multiples of the encoder's image size); the tiles' features lose the grid's padding, are
    reduced bilinearly when they hold more than about `max_tiles` tiles' worth, and every row ends
    with the model's learned newline embedding. A sample with several images gets one view per image
    (padded to a square, grey 127), its tokens plus one newline. A video gets its frames pooled 2x2
    (bilinear) and one newline after the last frame; a video file gives at most `frames_upbound`
    frames, sampled uniformly."""

    kind: str = "fixed"
    max_tiles: int = 9
    grid_pinpoints: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    # The most frames a video file gives (sampled uniformly over it; OneVision's frames_upbound).
    frames_upbound: int = 32

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"image layout kind {self.kind!r}; choose one of {KINDS}")
        object.__setattr__(self, "grid_pinpoints", tuple(tuple(int(v) for v in pair) for pair in self.grid_pinpoints))
        if self.kind == "anyres":
            if not self.grid_pinpoints:
                raise ValueError("an anyres layout needs grid_pinpoints ((height, width) pixel sizes)")
            if any(len(pair) != 2 or min(pair) <= 0 for pair in self.grid_pinpoints):
                raise ValueError(f"grid_pinpoints must be positive (height, width) pairs, got {self.grid_pinpoints}")
            if self.max_tiles < 1:
                raise ValueError(f"max_tiles must be >= 1, got {self.max_tiles}")
        if self.frames_upbound < 1:
            raise ValueError(f"frames_upbound must be >= 1, got {self.frames_upbound}")

    @property
    def is_anyres(self) -> bool:
        return self.kind == "anyres"

    @property
    def aspect_ratio_name(self) -> str:
        """Hugging Face's / LLaVA-NeXT's name for the reduction threshold: "anyres_max_<max_tiles>"."""
        return f"anyres_max_{self.max_tiles}"

    def check_tile(self, tile: int) -> None:
        """ValueError unless every pinpoint is a whole number of `tile`-pixel tiles."""
        bad = [pair for pair in self.grid_pinpoints if pair[0] % tile or pair[1] % tile]
        if bad:
            raise ValueError(f"grid_pinpoints {bad[:4]} are not multiples of the encoder's image size {tile}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["grid_pinpoints"] = [list(pair) for pair in self.grid_pinpoints]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ImageLayout":
        return FIXED if not data else cls(**data)

    @classmethod
    def anyres(cls, aspect_ratio: str = "anyres_max_9", grid_pinpoints: Any = None, tile: int = 384) -> "ImageLayout":
        """From Hugging Face's names: vision_aspect_ratio "anyres_max_N" and image_grid_pinpoints
        (default: OneVision's 36 grids)."""
        match = _ANYRES_MAX.fullmatch(aspect_ratio)
        if match is None:
            raise ValueError(f"vision_aspect_ratio {aspect_ratio!r} is not of the form anyres_max_<N>")
        pinpoints = onevision_pinpoints(tile) if grid_pinpoints is None else grid_pinpoints
        return cls("anyres", int(match.group(1)), tuple(tuple(p) for p in pinpoints))


FIXED = ImageLayout()
