"""The composition of encoder, projector and decoder. Depends on lm, encoders, projector."""

from multimodal.batch import Batch
from multimodal.model import VisionLanguageModel

__all__ = ["Batch", "VisionLanguageModel"]
