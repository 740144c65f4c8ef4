"""The projected features of an image's views (or a video's frames) -> the tokens that take the
place of its placeholders, in LLaVA-OneVision's layout.

An image alone in its sample: the base view's tokens as they are, then the tiles' features as one
grid (rows of tiles, row-major inside each), cut to the image's own area (geometry.feature_grid),
reduced bilinearly when larger than about max_tiles tiles, each row followed by the newline
embedding. An image beside others: its one view's tokens and a newline. A video: every frame's
grid pooled 2x2 (bilinear), the frames one after another, one newline at the end. These are the
tensors of transformers' LlavaOnevisionModel.pack_image_features and get_video_features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multimodal.layouts.config import ImageLayout
from multimodal.layouts.geometry import Size, feature_grid, pooled_side, tile_grid


def _as_grid(features: torch.Tensor, side: int) -> torch.Tensor:
    """[views, side*side, D] -> [views, D, side, side]."""
    views, tokens, dim = features.shape
    if tokens != side * side:
        raise ValueError(f"a view has {tokens} tokens; the layout needs a square grid of {side}x{side}")
    return features.view(views, side, side, dim).permute(0, 3, 1, 2)


def pack_image(features: torch.Tensor, size: Size, layout: ImageLayout, side: int, tile: int,
               newline: torch.Tensor) -> torch.Tensor:
    """[views, side*side, D] projected features of one image -> [tokens, D]. One view: the image was
    one of several in its sample. More: the base view, then the tiles of its grid, row-major."""
    views, _, dim = features.shape
    if views == 1:
        return torch.cat([features[0], newline[None].to(features.dtype)])
    rows, cols = tile_grid(size, layout.grid_pinpoints, tile)
    if views != rows * cols + 1:
        raise ValueError(f"an image of {size[0]}x{size[1]} has a {rows}x{cols} grid of tiles plus its base view, "
                         f"{rows * cols + 1} views, but {views} were given")
    # [rows, cols, side, side, D] -> [D, rows*side, cols*side]: one grid over all tiles.
    grid = features[1:].view(rows, cols, side, side, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * side, cols * side)
    area = feature_grid(size, (rows, cols), side, layout.max_tiles)
    grid = grid[:, area.top:area.top + area.rows, area.left:area.left + area.cols]
    if area.reduced:
        grid = F.interpolate(grid[None], [area.out_rows, area.out_cols], mode="bilinear")[0]
    ends = newline.to(grid.dtype)[:, None, None].expand(dim, area.out_rows, 1)
    grid = torch.cat([grid, ends], dim=2)
    return torch.cat([features[0], grid.flatten(1).T])


def pack_video(features: torch.Tensor, side: int, newline: torch.Tensor) -> torch.Tensor:
    """[frames, side*side, D] projected features of one video's frames -> [frames * pooled² + 1, D]."""
    frames, _, dim = features.shape
    pooled = pooled_side(side)
    grid = F.interpolate(_as_grid(features, side), size=[pooled, pooled], mode="bilinear")
    return torch.cat([grid.permute(0, 2, 3, 1).reshape(frames * pooled * pooled, dim), newline[None].to(grid.dtype)])
