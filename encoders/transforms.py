"""Image preprocessing for the vision towers: PIL image in, normalized FloatTensor[3, S, S] out.

The tensors equal open_clip's own inference preprocessing for the same settings (the tests prove it
bit for bit), with two deliberate choices:
- every image is converted to RGB *before* resizing. open_clip resizes first, so palette images get
  nearest-neighbour resampling (Pillow's rule for mode "P") and RGBA images are resampled with
  premultiplied alpha; LLaVA and Hugging Face processors convert first, and so do we. For RGB input
  (and grayscale, whose conversion commutes with resizing) the result is identical to open_clip's.
- LLaVA's pad-to-square ("expand2square") is available: the image is centred on a square canvas
  whose colour is the normalization mean, so the padding becomes ~0 after normalization.

The transform is a frozen dataclass rather than a closure so DataLoader workers can pickle it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from encoders.open_clip import OpenCLIPEncoder

RESIZE_MODES = ("shortest", "longest", "squash")
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _three_floats(name: str, value: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = (value,) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} needs one value per RGB channel (3), got {len(values)}: {values}")
    return values  # type: ignore[return-value]


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Centre `image` (RGB) on a square canvas of side max(width, height), as LLaVA's expand2square.

    An odd leftover pixel goes to the bottom/right side, as in LLaVA.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@dataclass(frozen=True)
class ImageTransform:
    """PIL.Image -> FloatTensor[3, image_size, image_size], deterministic (see module docstring).

    resize_mode (open_clip's names):
      "shortest": shortest side to image_size (aspect kept), then centre crop   (CLIP)
      "squash":   both sides to image_size, aspect ratio not kept               (SigLIP)
      "longest":  longest side to image_size, then centre pad with fill_color
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    pad_to_square: bool = False
    fill_color: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {tuple(_RESAMPLE)}, got {self.interpolation!r}")
        object.__setattr__(self, "mean", _three_floats("mean", self.mean))
        object.__setattr__(self, "std", _three_floats("std", self.std))

    @property
    def background(self) -> tuple[int, int, int]:
        """Pad-to-square colour: the mean in 0..255, truncated like LLaVA's int(x * 255)."""
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.pad_to_square:
            image = expand_to_square(image, self.background)
        image = self._resize(image)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        # Same operations in the same order as torchvision's ToTensor + Normalize (open_clip's
        # pipeline), so results agree bit for bit rather than to rounding error.
        pixels = pixels.to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return pixels.sub(mean).div(std)

    def _resize(self, image: Image.Image) -> Image.Image:
        size = self.image_size
        resample = _RESAMPLE[self.interpolation]
        width, height = image.size
        if self.resize_mode == "squash":
            return image.resize((size, size), resample) if image.size != (size, size) else image

        if self.resize_mode == "shortest":
            # int() truncation of the long side, evaluated as size * long / short, as torchvision does.
            if width <= height:
                new_width, new_height = size, int(size * height / width)
            else:
                new_width, new_height = int(size * width / height), size
            if (new_width, new_height) != image.size:
                image = image.resize((new_width, new_height), resample)
            # Python's round() (half to even) places the crop where torchvision's CenterCrop does.
            top = int(round((new_height - size) / 2.0))
            left = int(round((new_width - size) / 2.0))
            return image.crop((left, top, left + size, top + size))

        # "longest": scale so the longest side fits, then pad the short side symmetrically.
        ratio = max(height / size, width / size)
        new_width, new_height = round(width / ratio), round(height / ratio)
        if (new_width, new_height) != image.size:
            image = image.resize((new_width, new_height), resample)
        if image.size == (size, size):
            return image
        canvas = Image.new("RGB", (size, size), (self.fill_color,) * 3)
        canvas.paste(image, ((size - new_width) // 2, (size - new_height) // 2))
        return canvas


def image_transform(
    image_size: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    pad_to_square: bool = False,
    fill_color: int = 0,
) -> ImageTransform:
    """A deterministic PIL.Image -> FloatTensor[3, image_size, image_size] transform."""
    return ImageTransform(
        image_size=image_size,
        mean=_three_floats("mean", mean),
        std=_three_floats("std", std),
        resize_mode=resize_mode,
        interpolation=interpolation,
        pad_to_square=pad_to_square,
        fill_color=fill_color,
    )


def encoder_transform(encoder: OpenCLIPEncoder, pad_to_square: bool = False) -> ImageTransform:
    """The eval preprocessing that `encoder` expects (size, normalization, resize mode, interpolation)."""
    return image_transform(
        image_size=encoder.image_size,
        mean=encoder.mean,
        std=encoder.std,
        resize_mode=encoder.resize_mode,
        interpolation=encoder.interpolation,
        pad_to_square=pad_to_square,
        fill_color=encoder.fill_color,
    )
