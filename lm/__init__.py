"""The Salamandra decoder, a text LM in its own right: it knows nothing of images."""

from lm.attention import SeqLayout
from lm.compile import compile_blocks
from lm.config import LMConfig
from lm.decode import KVCache
from lm.hf import load_decoder, save_decoder
from lm.loss import IGNORE_INDEX, chunked_cross_entropy
from lm.model import Decoder
from lm.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS, Tokenizer, format_chatml, load_tokenizer, train_tokenizer

__all__ = [
    "Decoder", "IGNORE_INDEX", "KVCache", "LMConfig", "SPECIAL_IDS", "SPECIAL_TOKENS", "SeqLayout", "Tokenizer",
    "chunked_cross_entropy", "compile_blocks", "format_chatml", "load_decoder", "load_tokenizer", "save_decoder",
    "train_tokenizer",
]
