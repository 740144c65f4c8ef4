"""Vision towers: pixels in, [images, tokens, width] out. Knows nothing of the decoder or projector."""

from encoders.open_clip import OpenCLIPEncoder, load_visual_state_dict
from encoders.transforms import ImageTransform, encoder_transform, expand_to_square, image_transform

__all__ = [
    "ImageTransform",
    "OpenCLIPEncoder",
    "encoder_transform",
    "expand_to_square",
    "image_transform",
    "load_visual_state_dict",
]
