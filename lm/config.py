"""LMConfig: the shape of a Salamandra (Llama-architecture) decoder, with the published presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")


@dataclass
class LMConfig:
    vocab_size: int = 256_000
    n_layers: int = 24
    d_model: int = 2048
    n_heads: int = 16
    n_kv_heads: int = 16
    d_ff: int = 5440
    max_seq_len: int = 8192
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # "auto": xformers on CUDA when importable, else PyTorch's scaled_dot_product_attention.
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r}; choose one of {ATTENTION_BACKENDS}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LMConfig":
        """A named preset; keyword overrides replace single fields (e.g. ``attention="sdpa"``)."""
        if name not in PRESETS:
            raise KeyError(f"unknown LM preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown LMConfig fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**values)


# Published values: Salamandra technical report (arXiv 2502.08489), BSC-LT's config.json files on the
# Hugging Face Hub and the NeMo training configs. The parameter counts of 2b and 7b are checked in the tests.
PRESETS: dict[str, LMConfig] = {
    "salamandra-2b": LMConfig(
        n_layers=24, d_model=2048, n_heads=16, n_kv_heads=16, d_ff=5440,
        max_seq_len=8192, norm_eps=1e-5, init_std=0.014,
    ),
    "salamandra-7b": LMConfig(
        n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=11008,
        max_seq_len=8192, norm_eps=1e-6, init_std=0.02,
    ),
    "salamandra-40b": LMConfig(
        n_layers=48, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=24576,
        max_seq_len=4096, norm_eps=1e-5, init_std=0.007,
    ),
    # Small shapes with the same architecture, for tests and the offline demo. Their vocabulary
    # is that of the small tokenizer the demo trains; override vocab_size to match another one.
    "tiny": LMConfig(
        vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=160,
        max_seq_len=512, init_std=0.02,
    ),
    "demo": LMConfig(
        vocab_size=2048, n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, d_ff=688,
        max_seq_len=1024, init_std=0.02,
    ),
}
