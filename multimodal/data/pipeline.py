"""Shards -> raw samples -> tokenized samples -> packed Batches, in each DataLoader worker.

Per epoch, every rank and worker (a "reader") runs the same steps on its own share of the shards:
1. `shards_for_worker`: each source's shard list is shuffled with a seed that every rank shares (so
   all agree on the order), then dealt out by rank and by worker, so each shard is read by exactly
   one reader and no sample is seen twice (build_loader refuses fewer shards than readers).
   In resampled mode each reader instead draws shards at random, with replacement, forever.
2. `read_shard`: webdataset opens the URL (local path, `pipe:`, http, ...) and iterates the tar;
   files are grouped into samples by key within one shard only, so a sample can never take a file
   from a neighbour or from another shard.
3. `mix_sources`: with several sources, each next sample comes from a source drawn by weight.
4. a shuffle buffer over raw samples (bytes are small; decoded images would not be).
5. `samples.to_tokenized_sample`, or a counted and logged skip; past the skip budget, an error.
6. `packing`: first-fit rows, grouped into Batches that carry the skip counts since the last one
   and the number of samples from each source.

What an epoch is:
- default (`resampled: false`): every sample of every source exactly once across all ranks and
  workers. With several sources, a source that runs out drops out and the others go on by their
  weights, so the weights hold until the first source (relative to its weight) is used up.
- `resampled: true`: shards are drawn with replacement, so the stream never ends and the weights
  hold throughout; `batches_per_epoch` (per rank) ends each epoch, else the run ends at max_steps.
- `batches_per_epoch`, in either mode, is the number of Batches each rank yields per epoch (split
  across its workers). Lightning's DDP needs the same number of batches on every rank or it can
  hang at epoch end: with several ranks, use resampled mode with batches_per_epoch (the rule), or
  non-resampled mode with batches_per_epoch no larger than what the smallest reader produces.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    shuffle_buffer: raw samples each worker shuffles over; 0 turns shuffling (samples and shards)
      off, for validation.
    pack_buffer: the most samples the packer holds in open rows; more gives fuller rows.
    seed: shard order, sample shuffle and caption prompts all derive from it.
    default_language: the language of captions whose json names none (img2dataset's output).
    pad_to_square: pad images to a square (LLaVA's expand2square) before the encoder's transform.
    with_keys: yield (Batch, keys) with each row's sample keys, for tests and debugging.
    resampled: draw shards with replacement, forever (see the module docstring for epochs).
    batches_per_epoch: Batches per rank per epoch (split across its DataLoader workers); None: the
      epoch ends when the data does (never, in resampled mode).
    max_skip_fraction: stop with SkipBudgetExceeded, naming the worst shards, when a reader has
      skipped more than this fraction of its samples (after skip_budget_min_samples samples);
      None: never stop.
    """

    shards: str | list[str] | None = None
    max_tokens: int = 2048
    rows_per_batch: int = 1
    shuffle_buffer: int = 1000
    pack_buffer: int = 64
    seed: int = 0
    default_language: str = "en"
    pad_to_square: bool = False
    with_keys: bool = False
    sources: list[SourceConfig] | None = None
    resampled: bool = False
    batches_per_epoch: int | None = None
    max_skip_fraction: float | None = 0.1
    skip_budget_min_samples: int = 1000

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


def resampled_shards(urls: Sequence[str], rng: random.Random) -> Iterator[str]:
    """Shards drawn at random with replacement, forever."""
    while True:
        yield rng.choice(urls)


def check_readers(sources: Sequence[Source], resampled: bool, world_size: int, num_workers: int) -> None:
    """Before training: in the default mode every reader (rank x worker) needs at least one shard of
    every source, else it would have nothing to read (and a rank with fewer batches than the others
    can hang DDP): ValueError. In resampled mode readers then share shards: a warning."""
    readers = world_size * max(1, num_workers)
    for source in sources:
        if len(source.urls) >= readers:
            continue
        message = (f"source {source.name!r} has {len(source.urls)} shards for {world_size} ranks x "
                   f"{max(1, num_workers)} workers = {readers} readers")
        if resampled:
            warnings.warn(message + "; in resampled mode readers will often read the same shards", stacklevel=2)
        else:
            raise ValueError(message + ": every reader needs at least one shard, or some would get no data. "
                             "Use more (smaller) shards, fewer DataLoader workers, or resampled: true")


# --- skips: counted by reason, logged without flooding ------------------------------------------


class SkipBudgetExceeded(RuntimeError):
    """Too many samples were skipped: the data (or the code reading it) is broken."""


@dataclass
class SkipCounter:
    """Counts skipped samples by reason and by shard and logs them: the first `log_first` of each
    reason one by one (with shard and key), then at most one summary per reason every `log_every_s`
    seconds, so a broken shard of ten thousand samples writes a few lines, not ten thousand.

    The skip budget: once `min_samples` samples were seen (accepted + skipped), more than
    `max_fraction` of them skipped raises SkipBudgetExceeded naming the worst shards."""

    log_first: int = 5
    log_every_s: float = 60.0
    max_fraction: float | None = None
    min_samples: int = 1000
    reader: str = ""
    since_batch: Counter = field(default_factory=Counter)
    total: Counter = field(default_factory=Counter)
    unlogged: Counter = field(default_factory=Counter)
    last_log: dict[str, float] = field(default_factory=dict)
    by_shard: Counter = field(default_factory=Counter)
    accepted_by_shard: Counter = field(default_factory=Counter)
    skipped: int = 0
    accepted: int = 0

    def accept(self, shard: str) -> None:
        """A sample that became a tokenized sample."""
        self.accepted += 1
        self.accepted_by_shard[shard] += 1
        self.check_budget()

    def check_budget(self) -> None:
        seen = self.skipped + self.accepted
        if self.max_fraction is None or seen < self.min_samples or self.skipped <= self.max_fraction * seen:
            return
        worst = ", ".join(f"{shard} ({count} skipped, {self.accepted_by_shard[shard]} read)"
                          for shard, count in self.by_shard.most_common(3))
        raise SkipBudgetExceeded(
            f"{self.reader or 'reader'}: skipped {self.skipped} of {seen} samples "
            f"({self.skipped / seen:.1%} > max_skip_fraction {self.max_fraction:.1%}); worst shards: {worst}; "
            f"reasons: {dict(self.total)}")

    def skip(self, reason: str, shard: str, key: str | None, detail: str = "") -> None:
        self.since_batch[reason] += 1
        self.total[reason] += 1
        self.by_shard[shard] += 1
        self.skipped += 1
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
        self.check_budget()

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
    except SkipBudgetExceeded:
        raise
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


def read_shards(urls: Iterable[str], skips: SkipCounter, name: str = SINGLE_SOURCE) -> Iterator[dict[str, Any]]:
    """The samples of the shards in turn. From an endless (resampled) shard stream, a run of
    shards that give no sample at all (empty or unreadable) longer than `give_up` is an error
    rather than a silent endless loop."""
    empty_in_a_row, give_up = 0, 1000
    for url in urls:
        before = skips.skipped + skips.accepted
        got = False
        for sample in read_shard(url, skips):
            got = True
            yield sample
        if got or skips.skipped + skips.accepted > before:
            empty_in_a_row = 0
        else:
            empty_in_a_row += 1
            if empty_in_a_row >= give_up:
                raise RuntimeError(f"source {name!r}: {give_up} shards in a row held no sample, e.g. {url}")


# --- 3. several sources, mixed by weight ------------------------------------------------------------


def mix_sources(streams: Mapping[str, Iterator[Any]], weights: Mapping[str, float],
                rng: random.Random) -> Iterator[tuple[str, Any]]:
    """(source name, item): each from a source drawn by weight among those not yet run out; a
    source that runs out drops out and the rest go on, until all have run out."""
    active = list(streams)
    while active:
        name = active[0] if len(active) == 1 else rng.choices(active, weights=[weights[n] for n in active])[0]
        try:
            item = next(streams[name])
        except StopIteration:
            active.remove(name)
            continue
        yield name, item


# --- 4. tokenized samples -------------------------------------------------------------------------


def tokenized_samples(raw: Iterator[tuple[str, Mapping[str, Any]]], settings: SampleSettings,
                      skips: SkipCounter) -> Iterator[tuple[str, TokenizedSample]]:
    """(source name, tokenized sample) of each (source name, raw sample) that is not skipped."""
    for source, sample in raw:
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
        skips.accept(sample["__url__"])
        yield source, tokenized


# --- all steps, in one reader ----------------------------------------------------------------------


def reader_quota(batches_per_epoch: int | None, worker: int, num_workers: int) -> int | None:
    """This worker's share of its rank's batches_per_epoch (the shares add up to it exactly)."""
    if batches_per_epoch is None:
        return None
    return batches_per_epoch // num_workers + (1 if worker < batches_per_epoch % num_workers else 0)


def iterate_batches(config: DataConfig, settings: SampleSettings, sources: Sequence[Source] | Sequence[str],
                    epoch: int, config_rank: tuple[int, int] | None = None,
                    ) -> Iterator[Batch | tuple[Batch, list[list[str]]]]:
    """The Batches of this reader (rank x DataLoader worker) for one epoch.

    The rank is `config_rank` (rank, world size) when given, else it comes from RANK / WORLD_SIZE
    when set (torchrun), else from the torch.distributed process group.
    """
    if sources and isinstance(sources[0], str):
        sources = [Source(SINGLE_SOURCE, 1.0, tuple(sources))]
    rank, world_size, worker, num_workers = pytorch_worker_info()
    if config_rank is not None:  # found by build_loader in the main process (see ShardDataset.placed)
        rank, world_size = config_rank
    reader = f"rank {rank} worker {worker}"
    quota = reader_quota(config.batches_per_epoch, worker, num_workers)
    if quota == 0:
        return
    shuffle = config.shuffle_buffer > 0
    skips = SkipCounter(max_fraction=config.max_skip_fraction, min_samples=config.skip_budget_min_samples,
                        reader=reader)
    streams: dict[str, Iterator[dict[str, Any]]] = {}
    shard_counts = {}
    for source in sources:
        if config.resampled:
            rng = random.Random(f"resample:{config.seed}:{epoch}:{rank}:{worker}:{source.name}")
            urls: Iterable[str] = resampled_shards(source.urls, rng)
            shard_counts[source.name] = len(source.urls)
        else:
            urls = shards_for_worker(source.urls, config.seed, epoch, shuffle, rank, world_size, worker, num_workers)
            shard_counts[source.name] = len(urls)
            if not urls:
                logger.warning("%s has no shard of source %r: %d shards for %d ranks x %d workers; "
                               "use more shards or fewer workers", reader, source.name, len(source.urls),
                               world_size, num_workers)
                continue
        streams[source.name] = read_shards(urls, skips, source.name)
    if not streams:
        return
    mix_rng = random.Random(f"mix:{config.seed}:{epoch}:{rank}:{worker}")
    raw = mix_sources(streams, {source.name: source.weight for source in sources}, mix_rng)
    if shuffle:
        # Each reader its own stream of random numbers, reproducible from (seed, epoch, reader).
        rng = random.Random(f"samples:{config.seed}:{epoch}:{rank}:{worker}")
        raw = webdataset.shuffle(config.shuffle_buffer, rng=rng)(raw)
    samples = tokenized_samples(raw, settings, skips)
    rows = pack_samples(samples, config.max_tokens, config.pack_buffer, length=lambda item: len(item[1]))
    from_source: Counter = Counter()

    def finish(group: list[list[tuple[str, TokenizedSample]]]) -> Batch | tuple[Batch, list[list[str]]]:
        batch = make_batch([[sample for _, sample in row] for row in group], config.max_tokens,
                           settings.tokenizer.pad_id, skips.take())
        batch.sources = dict(Counter(name for row in group for name, _ in row))
        from_source.update(batch.sources)
        return (batch, [[sample.key for _, sample in row] for row in group]) if config.with_keys else batch

    # One group is held back until the next is ready (or the data ends), so skips found after the
    # last full batch, at the tail of the last shard, still reach the training loop on a Batch.
    pending, batches = None, 0
    for group in group_rows(rows, config.rows_per_batch):
        if pending is not None:
            yield finish(pending)
            batches += 1
        pending = group
        if quota is not None and batches + 1 == quota:
            break
    if pending is not None:
        yield finish(pending)
        batches += 1
    if quota is not None and batches < quota:
        logger.warning("%s produced %d of its %d batches (batches_per_epoch %d): its data ran out; ranks with "
                       "unequal batch counts can hang DDP; lower batches_per_epoch or use resampled mode",
                       reader, batches, quota, config.batches_per_epoch)
    if batches == 0 and skips.total:
        logger.warning("%s produced no batch from %s shards; every sample was skipped: %s",
                       reader, shard_counts, dict(skips.total))
    else:
        total = sum(from_source.values()) or 1
        achieved = ", ".join(f"{name} {from_source[name] / total:.3f} (weight {source.weight:g})"
                             for source in sources for name in [source.name])
        logger.info("%s: %d batches, %d samples from %s shards, skipped %s; sources: %s",
                    reader, batches, sum(from_source.values()), shard_counts, dict(skips.total), achieved)


class ShardDataset(torch.utils.data.IterableDataset):
    """The data path as a torch IterableDataset: iterating it (in each DataLoader worker) yields
    that reader's Batches for the current epoch. Call `set_epoch` before each epoch to reshuffle;
    with non-persistent workers (build_loader's choice) the new epoch reaches every worker."""

    def __init__(self, config: DataConfig, settings: SampleSettings, sources: Sequence[Source] | Sequence[str]) -> None:
        super().__init__()
        if sources and isinstance(sources[0], str):
            sources = [Source(SINGLE_SOURCE, 1.0, tuple(sources))]
        self.config = config
        self.settings = settings
        self.sources = list(sources)
        self.urls = [url for source in self.sources for url in source.urls]
        self.epoch = 0
        self.placed: tuple[int, int] | None = None  # (rank, world size), set by build_loader

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def check_readers(self, world_size: int, num_workers: int) -> None:
        """ValueError (or, resampled, a warning) when some reader would get no shard of a source."""
        check_readers(self.sources, self.config.resampled, world_size, num_workers)

    def __iter__(self) -> Iterator[Batch | tuple[Batch, list[list[str]]]]:
        return iterate_batches(self.config, self.settings, self.sources, self.epoch, self.placed)


def keep_as_is(item: Any) -> Any:
    """The DataLoader's collate: a Batch is already a batch (module-level so workers can pickle it)."""
    return item


def build_loader(dataset: ShardDataset, num_workers: int, world_size: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` that passes its Batches through unchanged.

    Checks first that every reader (world_size ranks x num_workers) gets shards (check_readers);
    The rank and world_size (unless given) come from RANK / WORLD_SIZE or the torch.distributed
    process group, else 0 and 1, and are stored on the dataset for its workers.
    Workers are not persistent, so each epoch's `set_epoch` reaches them (a worker process costs
    little next to a pass over the shards).
    """
    # The rank is found here, in the main process, and travels with the dataset to the workers: a
    # worker started by spawn or forkserver does not inherit the torch.distributed process group.
    rank, found_world_size = pytorch_worker_info()[:2]
    if world_size is None:
        world_size = found_world_size
    if rank >= world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} ranks")
    dataset.placed = (rank, world_size)
    dataset.check_readers(world_size, num_workers)
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
