"""What the data path reads and how: DataConfig (the `data.train` / `data.val` section of a YAML
config), its sources, and the one place where shard patterns become the URLs a reader opens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from multimodal.data.shards import check_local_shards, expand_shards
from multimodal.prompts import CAPTION_PROMPTS


@dataclass
class SourceConfig:
    """One data source of a mix: a name (logged as data/source_<name>), its shards (as
    DataConfig.shards) and its weight (relative: the weights need not sum to 1)."""

    name: str
    shards: str | list[str]
    weight: float = 1.0


SINGLE_SOURCE = "shards"  # the name of the one source of a DataConfig given `shards`


@dataclass
class DataConfig:
    """Where the shards are and how to pack them.

    shards: a path or URL (`pipe:` and anything else webdataset opens), a brace pattern
      (`data/train-{000..009}.tar`), several joined by `::`, or a list of any of these.
    sources: instead of shards, several sources mixed by weight: [{name, shards, weight}, ...].
    max_tokens: tokens per packed row; a longer sample is skipped (too_long).
    rows_per_batch: packed rows per Batch.
    trim_rows: pad each Batch's rows to its longest row, rounded up to a multiple of 64 tokens,
      instead of to max_tokens. Saves the compute of trailing padding where rows are not full (long
      samples such as anyres images, the end of the data); the price is varying shapes: the first
      step is no longer the largest (memory), and compiled blocks see up to max_tokens/64 lengths.
    shuffle_buffer: raw samples each worker shuffles over; 0 turns shuffling (samples and shards)
      off, for validation.
    pack_buffer: the most samples the packer holds in open rows; more gives fuller rows.
    seed: shard order, sample shuffle and caption prompts all derive from it.
    default_language: the language of captions whose json names none (img2dataset's output).
    pad_to_square: pad images to a square (LLaVA's expand2square) before the encoder's transform.
    resampled: draw shards with replacement, forever (see data/dataset.py's docstring for epochs).
    batches_per_epoch: Batches per rank per epoch (split across its DataLoader workers); None: the
      epoch ends when the data does (never, in resampled mode).
    max_skip_fraction: stop with SkipBudgetExceeded, naming the worst shards, when a reader has
      skipped more than this fraction of its samples (after skip_budget_min_samples samples);
      None: never stop.
    resume: when training resumes from a checkpoint saved mid-epoch, go on from the data position it
      saved (exactly the Batches an uninterrupted run would have seen next; needs the same ranks
      and DataLoader workers); False: start that epoch's data afresh.
    """

    shards: str | list[str] | None = None
    max_tokens: int = 2048
    rows_per_batch: int = 1
    trim_rows: bool = False
    shuffle_buffer: int = 1000
    pack_buffer: int = 64
    seed: int = 0
    default_language: str = "en"
    pad_to_square: bool = False
    sources: list[SourceConfig] | None = None
    resampled: bool = False
    batches_per_epoch: int | None = None
    max_skip_fraction: float | None = 0.1
    skip_budget_min_samples: int = 1000
    resume: bool = True

    def __post_init__(self) -> None:
        if self.sources is not None and self.shards:
            raise ValueError("DataConfig: give either shards or sources, not both")
        if self.sources is None:
            if not self.shards:
                raise ValueError("DataConfig.shards is empty; give a shard path, URL or brace pattern")
        else:
            self.sources = [SourceConfig(**s) if isinstance(s, Mapping) else s for s in self.sources]
            if not self.sources:
                raise ValueError("DataConfig.sources is empty")
            names = [s.name for s in self.sources]
            if len(set(names)) != len(names) or not all(names):
                raise ValueError(f"DataConfig.sources need distinct non-empty names, got {names}")
            for source in self.sources:
                if not source.shards:
                    raise ValueError(f"source {source.name!r} has no shards")
                if not (math.isfinite(source.weight) and source.weight > 0):
                    raise ValueError(f"source {source.name!r} weight must be > 0, got {source.weight}")
        if self.batches_per_epoch is not None and self.batches_per_epoch < 1:
            raise ValueError(f"DataConfig.batches_per_epoch must be >= 1 or None, got {self.batches_per_epoch}")
        if self.max_skip_fraction is not None and not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"DataConfig.max_skip_fraction must be in [0, 1] or None, got {self.max_skip_fraction}")
        if self.skip_budget_min_samples < 1:
            raise ValueError(f"DataConfig.skip_budget_min_samples must be >= 1, got {self.skip_budget_min_samples}")
        for name, minimum in (("max_tokens", 1), ("rows_per_batch", 1), ("shuffle_buffer", 0), ("pack_buffer", 1)):
            if getattr(self, name) < minimum:
                raise ValueError(f"DataConfig.{name} must be >= {minimum}, got {getattr(self, name)}")
        if self.default_language not in CAPTION_PROMPTS:
            raise ValueError(f"DataConfig.default_language {self.default_language!r} has no caption prompts; "
                             f"choose one of {sorted(CAPTION_PROMPTS)}")

    def source_list(self) -> list[SourceConfig]:
        """The sources to read: `sources`, or the one source `shards` (named "shards")."""
        return list(self.sources) if self.sources is not None else [SourceConfig(SINGLE_SOURCE, self.shards, 1.0)]


@dataclass(frozen=True)
class Source:
    """A source with its shard patterns expanded."""

    name: str
    weight: float
    urls: tuple[str, ...]


def resolve_sources(config: DataConfig) -> list[Source]:
    """The sources `config` names, each with its shard patterns expanded to URLs; a pattern that
    names no shard, or a local shard that does not exist, fails here, before any reader starts."""
    sources = []
    for source in config.source_list():
        urls = expand_shards(source.shards)
        if not urls:
            raise ValueError(f"source {source.name!r}: {source.shards!r} names no shard")
        check_local_shards(urls)
        sources.append(Source(source.name, float(source.weight), tuple(urls)))
    return sources
