"""The arithmetic of LLaVA-OneVision's layout: which grid of tiles an image gets, what of the tiles'
feature grid is padding, when the grid is reduced, and how many tokens an image or a video takes.
Plain integers, no pixels: the data path counts tokens with it before decoding any image.

Sizes are (height, width). The numbers are those of transformers 5.24's LlavaOnevisionProcessor
(`_get_number_of_features`) and LlavaOnevisionModel.pack_image_features, including their
`int(round(x, 7))` in the unpadding, which LLaVA-NeXT's `int(x)` differs from for rare sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Size = tuple[int, int]


def best_resolution(size: Size, pinpoints: Sequence[Sequence[int]]) -> Size:
    """The pinpoint that keeps most of the image's pixels when the image is fitted inside it (aspect
    kept), then the one that wastes least; on an exact tie, the first in `pinpoints`."""
    height, width = size
    best, most_kept, least_wasted = None, 0, math.inf
    for target_height, target_width in pinpoints:
        scale = min(target_width / width, target_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (int(target_height), int(target_width)), kept, wasted
    if best is None:
        raise ValueError(f"no pinpoint fits an image of {size}: {list(pinpoints)[:4]}")
    return best


def tile_grid(size: Size, pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """(rows, columns) of `tile`-pixel tiles an image of `size` is cut into."""
    height, width = best_resolution(size, pinpoints)
    return height // tile, width // tile


@dataclass(frozen=True)
class FeatureGrid:
    """The tiles' features of one image as a grid of `side`-token tiles: `rows` x `cols` tokens after
    the padding is cut off (`top` rows and `left` columns on each side come off), then `out_rows` x
    `out_cols` after the bilinear reduction (the same when there is none)."""

    rows: int
    cols: int
    top: int
    left: int
    out_rows: int
    out_cols: int

    @property
    def reduced(self) -> bool:
        return (self.out_rows, self.out_cols) != (self.rows, self.cols)

    @property
    def tokens(self) -> int:
        """The tiles' tokens: the grid plus one newline per row."""
        return self.out_rows * (self.out_cols + 1)


def feature_grid(size: Size, grid: tuple[int, int], side: int, max_tiles: int) -> FeatureGrid:
    """Where the image's pixels lie in the tiles' feature grid (grid = (rows, cols) of tiles, `side`
    tokens a tile side), and its size after the reduction to about `max_tiles` tiles' worth."""
    height, width = size
    full_rows, full_cols = grid[0] * side, grid[1] * side
    rows, cols, top, left = full_rows, full_cols, 0, 0
    if width / height > full_cols / full_rows:  # wider than the grid: padding above and below
        kept = int(round(height * (full_cols / width), 7))
        top = (full_rows - kept) // 2
        rows = full_rows - 2 * top
    else:  # taller (or the same shape): padding left and right
        kept = int(round(width * (full_rows / height), 7))
        left = (full_cols - kept) // 2
        cols = full_cols - 2 * left
    ratio = math.sqrt(rows * cols / (max_tiles * side * side))
    if ratio > 1.1:
        return FeatureGrid(rows, cols, top, left, int(rows // ratio), int(cols // ratio))
    return FeatureGrid(rows, cols, top, left, rows, cols)


def pooled_side(side: int) -> int:
    """A video frame's token grid side after OneVision's 2x2 bilinear pooling: ceil(side / 2)."""
    return math.ceil(side / 2)


def video_token_count(frames: int, side: int) -> int:
    """Tokens of a video: every frame's pooled grid, then one newline."""
    return frames * pooled_side(side) ** 2 + 1


def anyres_image_tokens(size: Size, pinpoints: Sequence[Sequence[int]], max_tiles: int, side: int, tile: int,
                        alone: bool = True) -> int:
    """Tokens of one image in the anyres layout: alone in its sample, the base view's side² tokens
    plus the tiles' (feature_grid: rows and newlines); beside other images, one view and a newline."""
    if not alone:
        return side * side + 1
    grid = tile_grid(size, pinpoints, tile)
    return side * side + feature_grid(size, grid, side, max_tiles).tokens
