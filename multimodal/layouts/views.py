"""Images and video frames -> the encoder's input views: float32 [views, 3, tile, tile] tensors,
bit-identical to transformers 5.24's LlavaOnevisionImageProcessorPil (images) and
LlavaOnevisionVideoProcessor (frames) on CPU.

What those do, and so what this does:
- Images are converted to RGB first; transparency is composited onto white.
- Images stay uint8 until the last step. Every resize is Pillow's bicubic (no reducing_gap) on the
  uint8 RGB image; padding is with uint8 values.
- Images then become (uint8 -> float64) * (1/255) -> float32, and (x - mean) / std in float32.
- Video frames are resized by torchvision (`transforms.v2.functional.resize`, bicubic, antialias,
  on uint8 [F, 3, H, W] tensors: torch's native uint8 kernel on CPU, close to but not Pillow's).
  They are normalised in one step: (float32(x) - 255*mean) / (255*std) (Hugging Face fuses the
  rescale into the mean and std), which rounds differently from the images' two steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from multimodal.layouts.config import ImageLayout
from multimodal.layouts.geometry import best_resolution

RESCALE = 1 / 255
"""Hugging Face's rescale_factor: uint8 -> [0, 1]."""

Stats = float | Sequence[float]


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB, transparency composited onto white (Hugging Face's convert_to_rgb). ValueError
    for something that is not a PIL image or has no pixels."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    if image.width <= 0 or image.height <= 0:
        raise ValueError(f"image has no pixels: {image.width}x{image.height} (width x height)")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _channels(values: Stats, name: str) -> tuple[float, float, float]:
    values = [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 values (one per RGB channel), got {len(values)}")
    if name == "std" and 0 in values:
        raise ValueError(f"std must not be 0, got {values}")
    return values[0], values[1], values[2]


def _resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Pillow bicubic; the same size is left alone (Pillow's resize would only copy it)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


def _normalize(image: Image.Image, mean: Stats, std: Stats) -> torch.Tensor:
    """RGB uint8 image -> [3, H, W] float32: float32(float64(x) * (1/255)), then (x - mean) / std in
    float32, with mean and std as float32 (Hugging Face's rescale, then normalize)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    scaled = (pixels.to(torch.float64) * RESCALE).to(torch.float32)
    mean32 = torch.tensor(_channels(mean, "mean"), dtype=torch.float32).view(3, 1, 1)
    std32 = torch.tensor(_channels(std, "std"), dtype=torch.float32).view(3, 1, 1)
    return (scaled - mean32) / std32


def fitted_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image of `size` resized into `target` with its aspect ratio kept: the
    limiting side becomes the target's, the other min(ceil(side * scale), target side)
    (transformers' get_patch_output_size)."""
    height, width = size
    target_height, target_width = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def anyres_views(image: Image.Image, pinpoints: Sequence[Sequence[int]], tile: int, mean: Stats,
                 std: Stats) -> torch.Tensor:
    """[1 + rows*cols, 3, tile, tile]: the base view (the whole image squashed to tile x tile), then
    the tiles row by row of the image fitted (aspect kept) into its best pinpoint and centred on
    black (0; the left/top margins get the smaller half)."""
    image = to_rgb(image)
    target = best_resolution((image.height, image.width), pinpoints)
    if target[0] % tile or target[1] % tile:
        raise ValueError(f"pinpoint {target} is not a whole number of {tile}-pixel tiles")
    height, width = fitted_size((image.height, image.width), target)
    canvas = Image.new("RGB", (target[1], target[0]), (0, 0, 0))
    canvas.paste(_resize(image, height, width), ((target[1] - width) // 2, (target[0] - height) // 2))
    rows, cols = target[0] // tile, target[1] // tile
    tiles = _normalize(canvas, mean, std).view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)
    base = _normalize(_resize(image, tile, tile), mean, std)
    return torch.cat([base[None], tiles.reshape(rows * cols, 3, tile, tile)])


def square_view(image: Image.Image, tile: int, mean: Stats, std: Stats) -> torch.Tensor:
    """[1, 3, tile, tile]: the image centred on a square of its longer side (the margins get
    int(mean * 255) per channel, grey 127 for mean 0.5; the left/top margin gets the smaller half),
    then resized to tile x tile: one image of a sample that holds several."""
    image = to_rgb(image)
    side = max(image.size)
    if image.width != image.height:
        background = tuple(int(m * 255) for m in _channels(mean, "mean"))
        square = Image.new("RGB", (side, side), background)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    return _normalize(_resize(image, tile, tile), mean, std)[None]


def video_views(frames: Sequence[Image.Image], tile: int, mean: Stats, std: Stats) -> torch.Tensor:
    """[F, 3, tile, tile]: every frame squashed to tile x tile (torchvision bicubic with antialias
    on uint8, as Hugging Face's video processor does on CPU), then (x - 255*mean) / (255*std) in
    float32. Frames of one size are resized together, as Hugging Face does. Frames are made RGB like
    images; Hugging Face blends a transparent frame onto white in float instead, so parity holds for
    opaque frames."""
    import torchvision.transforms.v2.functional as tvF

    if len(frames) == 0:
        raise ValueError("a video needs at least one frame")
    rgb = [np.asarray(to_rgb(frame), dtype=np.uint8) for frame in frames]
    # Hugging Face's fused rescale: mean and std scaled by 1 / rescale_factor, in float32.
    mean255 = torch.tensor(_channels(mean, "mean")) * (1.0 / RESCALE)
    std255 = torch.tensor(_channels(std, "std")) * (1.0 / RESCALE)
    out = torch.empty(len(rgb), 3, tile, tile, dtype=torch.float32)
    for shape in dict.fromkeys(frame.shape for frame in rgb):
        index = [i for i, frame in enumerate(rgb) if frame.shape == shape]
        stack = torch.from_numpy(np.stack([rgb[i] for i in index])).permute(0, 3, 1, 2).contiguous()
        resized = tvF.resize(stack, [tile, tile], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        out[index] = tvF.normalize(resized.to(torch.float32), mean255, std255)
    return out


def sample_views(images: Sequence[Image.Image], layout: ImageLayout, tile: int, mean: Stats,
                 std: Stats) -> list[torch.Tensor]:
    """The views of every image of one sample, one tensor per image: anyres views (base view and
    tiles) when the sample holds exactly one image, one square view per image when it holds several."""
    if not layout.is_anyres:
        raise ValueError("sample_views is for the anyres layout; a fixed layout uses the encoder's own transform")
    layout.check_tile(tile)
    if len(images) == 1:
        return [anyres_views(images[0], layout.grid_pinpoints, tile, mean, std)]
    return [square_view(image, tile, mean, std) for image in images]
