"""Salamandra's special tokens and their fixed ids.

The first 104 ids of every Salamandra vocabulary are these tokens, in this order: checkpoints, the
chat format and the VLM's image placeholder (a reserved token) all rely on the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BYTE_TOKENS", "NUM_RESERVED_TOKENS", "SPECIAL_IDS", "SPECIAL_TOKENS", "SpecialTokenIds"]

NUM_RESERVED_TOKENS = 98
SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|reserved_token_{n}|>" for n in range(1, NUM_RESERVED_TOKENS + 1)),
)
# The spelling ByteFallback (tokenizers) and SentencePiece both use for raw bytes.
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))


@dataclass(frozen=True)
class SpecialTokenIds:
    """Salamandra's special token ids; ``first_reserved`` is ``<|reserved_token_1|>``."""

    unk: int = 0
    bos: int = 1
    eos: int = 2
    pad: int = 3
    im_start: int = 4
    im_end: int = 5
    first_reserved: int = 6


SPECIAL_IDS = SpecialTokenIds()
