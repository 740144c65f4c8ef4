"""Shards -> raw samples -> tokenized samples -> packed Batches, in each DataLoader worker.

Per epoch, every rank and worker runs the same steps on its own share of the shards:
1. `shards_for_worker`: the shard list is shuffled with a seed that every rank shares (so all agree
   on the order), then dealt out by rank and by worker, so each shard is read by exactly one
   reader and no sample is seen twice (every reader gets some when shards >= ranks x workers).
2. `read_shard`: webdataset opens the URL (local path, `pipe:`, http, ...) and iterates the tar;
   files are grouped into samples by key within one shard only, so a sample can never take a file
   from a neighbour or from another shard.
3. a shuffle buffer over raw samples (bytes are small; decoded images would not be).
4. `samples.to_tokenized_sample`, or a counted and logged skip.
5. `packing`: first-fit rows, grouped into Batches that carry the skip counts since the last one.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator
from webdataset.utils import pytorch_worker_info

from multimodal.batch import Batch
from multimodal.data.decode import DUPLICATE_FILE, SHARD_ERROR, SPLIT_SAMPLE, UNEXPECTED_ERROR, SkipSample
from multimodal.data.packing import group_rows, make_batch, pack_samples
from multimodal.data.samples import SampleSettings, TokenizedSample, to_tokenized_sample
from multimodal.prompts import CAPTION_PROMPTS

logger = logging.getLogger("multimodal.data")


@dataclass
class DataConfig:
    """Where the shards are and how to pack them.

    shards: a path or URL (`pipe:` and anything else webdataset opens), a brace pattern
      (`data/train-{000..009}.tar`), several joined by `::`, or a list of any of these.
    max_tokens: tokens per packed row; a longer sample is skipped (too_long).
    rows_per_batch: packed rows per Batch.
    shuffle_buffer: raw samples each worker shuffles over; 0 turns shuffling (samples and shards)
      off, for validation.
    pack_buffer: the most samples the packer holds in open rows; more gives fuller rows.
    seed: shard order, sample shuffle and caption prompts all derive from it.
    default_language: the language of captions whose json names none (img2dataset's output).
    pad_to_square: pad images to a square (LLaVA's expand2square) before the encoder's transform.
    with_keys: yield (Batch, keys) with each row's sample keys, for tests and debugging.
    """

    shards: str | list[str]
    max_tokens: int = 2048
    rows_per_batch: int = 1
    shuffle_buffer: int = 1000
    pack_buffer: int = 64
    seed: int = 0
    default_language: str = "en"
    pad_to_square: bool = False
    with_keys: bool = False

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("DataConfig.shards is empty; give a shard path, URL or brace pattern")
        for name, minimum in (("max_tokens", 1), ("rows_per_batch", 1), ("shuffle_buffer", 0), ("pack_buffer", 1)):
            if getattr(self, name) < minimum:
                raise ValueError(f"DataConfig.{name} must be >= {minimum}, got {getattr(self, name)}")
        if self.default_language not in CAPTION_PROMPTS:
            raise ValueError(f"DataConfig.default_language {self.default_language!r} has no caption prompts; "
                             f"choose one of {sorted(CAPTION_PROMPTS)}")


# --- 1. which shards this reader reads ---------------------------------------------------------


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard URLs from a pattern or a list of patterns (braces and `::` expanded by webdataset)."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    return [url for pattern in patterns for url in expand_urls(pattern)]


def local_path(url: str) -> str | None:
    """The file a URL names when it is a local file, else None (pipe:, http:, ...)."""
    if url.startswith("file:"):
        return url[len("file:"):]
    return None if ":" in url.split("/", 1)[0] else url


def shards_for_worker(urls: Sequence[str], seed: int, epoch: int, shuffle: bool,
                      rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """This reader's shards for `epoch`. Every reader shuffles the full list with the same seed,
    then takes every (world_size)-th shard from its rank, then every (num_workers)-th of those
    from its worker: together the readers partition the list."""
    urls = list(urls)
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(urls)
    return urls[rank::world_size][worker::num_workers]


# --- skips: counted by reason, logged without flooding ------------------------------------------


@dataclass
class SkipCounter:
    """Counts skipped samples by reason and logs them: the first `log_first` of each reason one
    by one (with shard and key), then at most one summary per reason every `log_every_s` seconds,
    so a broken shard of ten thousand samples writes a few lines, not ten thousand."""

    log_first: int = 5
    log_every_s: float = 60.0
    since_batch: Counter = field(default_factory=Counter)
    total: Counter = field(default_factory=Counter)
    unlogged: Counter = field(default_factory=Counter)
    last_log: dict[str, float] = field(default_factory=dict)

    def skip(self, reason: str, shard: str, key: str | None, detail: str = "") -> None:
        self.since_batch[reason] += 1
        self.total[reason] += 1
        where = f"{shard} key {key}" if key is not None else shard
        now = time.monotonic()
        if self.total[reason] <= self.log_first:
            logger.warning("skipped %s (%s): %s", where, reason, detail or "-")
            self.last_log[reason] = now
        elif now - self.last_log.get(reason, 0.0) >= self.log_every_s:
            logger.warning("skipped %d more samples (%s) since the last message; latest: %s: %s",
                           self.unlogged[reason] + 1, reason, where, detail or "-")
            self.unlogged[reason] = 0
            self.last_log[reason] = now
        else:
            self.unlogged[reason] += 1

    def take(self) -> dict[str, int]:
        """The counts since the previous call (what the next Batch reports), and reset them."""
        counts = dict(self.since_batch)
        self.since_batch.clear()
        return counts


# --- 2. raw samples from a shard -----------------------------------------------------------------


def read_shard(url: str, skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """The samples of one shard in tar order: {"__key__", "__url__", suffix: bytes, ...}.

    A file's key is its name up to the first dot ("a/b.0.jpg" -> key "a/b", suffix "0.jpg"), as in
    webdataset. Unlike webdataset's own grouping, a sample never spans two shards, and a key that
    comes back later in the shard, or a suffix twice in one sample, is skipped rather than merged:
    either would pair one sample's image with another one's text. An unreadable shard or a tar that
    breaks off is counted once (shard_error); the sample being read when it broke is dropped.
    """
    try:
        stream = webdataset.gopen(url)
    except Exception as error:  # missing file, failed command, refused connection, ...
        skips.skip(SHARD_ERROR, url, None, f"cannot open: {type(error).__name__}: {error}")
        return
    seen: set[str] = set()
    current: dict[str, Any] | None = None
    try:
        for file in tar_file_iterator(stream):
            key, suffix = base_plus_ext(file["fname"])
            if key is None:  # no extension: not part of any sample
                continue
            suffix = suffix.lower()
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield from complete_sample(current, skips)
                current = {"__key__": key, "__url__": url}
                if key in seen:
                    current["__skip__"] = (SPLIT_SAMPLE, "the key's files are not contiguous in the tar")
                seen.add(key)
            if suffix in current:
                current["__skip__"] = (DUPLICATE_FILE, f"{suffix!r} appears twice")
            current[suffix] = file["data"]
    except Exception as error:  # a truncated or corrupt tar stream
        skips.skip(SHARD_ERROR, url, None, f"tar stream broke off: {type(error).__name__}: {error}")
        current = None
    finally:
        try:
            stream.close()
        except Exception as error:  # a pipe: command closed early exits non-zero; nothing to do
            logger.debug("closing %s: %s", url, error)
    if current is not None:
        yield from complete_sample(current, skips)


def complete_sample(sample: dict[str, Any], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """The sample, or nothing (a counted skip) if grouping found it broken."""
    if "__skip__" in sample:
        reason, detail = sample["__skip__"]
        skips.skip(reason, sample["__url__"], sample["__key__"], detail)
    else:
        yield sample


def read_shards(urls: Sequence[str], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    for url in urls:
        yield from read_shard(url, skips)


# --- 4. tokenized samples -------------------------------------------------------------------------


def tokenized_samples(raw: Iterator[Mapping[str, Any]], settings: SampleSettings,
                      skips: SkipCounter) -> Iterator[TokenizedSample]:
    for sample in raw:
        try:
            tokenized = to_tokenized_sample(sample, settings)
        except SkipSample as skip:
            skips.skip(skip.reason, sample["__url__"], sample["__key__"], skip.detail)
            continue
        except Exception as error:
            # Training must not die on one sample, but an unforeseen error may be a bug: it is
            # counted under its own reason and its traceback logged (rate-limited like the rest).
            skips.skip(UNEXPECTED_ERROR, sample["__url__"], sample["__key__"], f"{type(error).__name__}: {error}")
            if skips.total[UNEXPECTED_ERROR] <= skips.log_first:
                logger.debug("traceback of the unexpected error", exc_info=True)
            continue
        yield tokenized


# --- all steps, in one reader ----------------------------------------------------------------------


def iterate_batches(config: DataConfig, settings: SampleSettings, urls: Sequence[str],
                    epoch: int) -> Iterator[Batch | tuple[Batch, list[list[str]]]]:
    """The Batches of this reader (rank x DataLoader worker) for one epoch.

    The rank comes from RANK / WORLD_SIZE when set (torchrun), else from the torch.distributed
    process group, which DataLoader workers inherit when forked (build_loader's default on Linux).
    """
    rank, world_size, worker, num_workers = pytorch_worker_info()
    shuffle = config.shuffle_buffer > 0
    mine = shards_for_worker(urls, config.seed, epoch, shuffle, rank, world_size, worker, num_workers)
    if not mine:
        logger.warning("rank %d worker %d has no shard: %d shards for %d ranks x %d workers; "
                       "use more shards or fewer workers", rank, worker, len(urls), world_size, num_workers)
        return
    skips = SkipCounter()
    raw = read_shards(mine, skips)
    if shuffle:
        # Each reader its own stream of random numbers, reproducible from (seed, epoch, reader).
        rng = random.Random(f"samples:{config.seed}:{epoch}:{rank}:{worker}")
        raw = webdataset.shuffle(config.shuffle_buffer, rng=rng)(raw)
    samples = tokenized_samples(raw, settings, skips)
    rows = pack_samples(samples, config.max_tokens, config.pack_buffer)

    def finish(group: list[list[TokenizedSample]]) -> Batch | tuple[Batch, list[list[str]]]:
        batch = make_batch(group, config.max_tokens, settings.tokenizer.pad_id, skips.take())
        return (batch, [[sample.key for sample in row] for row in group]) if config.with_keys else batch

    # One group is held back until the next is ready (or the data ends), so skips found after the
    # last full batch, at the tail of the last shard, still reach the training loop on a Batch.
    pending, batches = None, 0
    for group in group_rows(rows, config.rows_per_batch):
        if pending is not None:
            yield finish(pending)
            batches += 1
        pending = group
    if pending is not None:
        yield finish(pending)
        batches += 1
    if batches == 0 and skips.total:
        logger.warning("rank %d worker %d produced no batch from %d shards; every sample was skipped: %s",
                       rank, worker, len(mine), dict(skips.total))
    else:
        logger.info("rank %d worker %d: %d batches from %d shards, skipped %s",
                    rank, worker, batches, len(mine), dict(skips.total))


class ShardDataset(torch.utils.data.IterableDataset):
    """The data path as a torch IterableDataset: iterating it (in each DataLoader worker) yields
    that reader's Batches for the current epoch. Call `set_epoch` before each epoch to reshuffle;
    with non-persistent workers (build_loader's choice) the new epoch reaches every worker."""

    def __init__(self, config: DataConfig, settings: SampleSettings, urls: Sequence[str]) -> None:
        super().__init__()
        self.config = config
        self.settings = settings
        self.urls = list(urls)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch | tuple[Batch, list[list[str]]]]:
        return iterate_batches(self.config, self.settings, self.urls, self.epoch)


def keep_as_is(item: Any) -> Any:
    """The DataLoader's collate: a Batch is already a batch (module-level so workers can pickle it)."""
    return item


def build_loader(dataset: ShardDataset, num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` that passes its Batches through unchanged.

    Workers are not persistent, so each epoch's `set_epoch` reaches them (a worker process costs
    little next to a pass over the shards).
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=keep_as_is,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def check_local_shards(urls: Sequence[str]) -> None:
    """Fail at once on a mistyped path, rather than training on nothing with a log full of skips."""
    missing = [url for url in urls if (path := local_path(url)) is not None and not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]!r}; "
                                "check DataConfig.shards (brace patterns: data/train-{000..009}.tar)")
