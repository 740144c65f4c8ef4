"""The Salamandra decoder, a text LM in its own right: it knows nothing of images."""

from lm.attention import SeqLayout
from lm.config import LMConfig
from lm.hf import load_decoder, save_decoder
from lm.model import Decoder, KVCache

__all__ = ["Decoder", "KVCache", "LMConfig", "SeqLayout", "load_decoder", "save_decoder"]
