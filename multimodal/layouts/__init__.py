"""How an image becomes decoder tokens: one fixed view (LLaVA-1.5), or LLaVA-OneVision's any-resolution
tiles, one padded view per image when a sample has several, and pooled video frames.

config.py: ImageLayout, the choice saved with a model. geometry.py: tile grids and token counts
(pure arithmetic, no pixels). views.py: images and frames -> the encoder's input views. packing.py:
the projected features of those views -> the tokens that replace an image's placeholders."""

from multimodal.layouts.config import FIXED, ImageLayout, onevision_pinpoints

__all__ = ["FIXED", "ImageLayout", "onevision_pinpoints"]
