"""Shards -> raw samples -> tokenized samples -> packed Batches, in each DataLoader worker.

Per epoch, every rank and worker (a "reader") runs the same steps on its own share of the shards:
1. `shards_for_worker`: each source's shard list is shuffled with a seed that every rank shares (so
   all agree on the order), then dealt out by rank and by worker, so each shard is read by exactly
   one reader and no sample is seen twice (build_loader refuses fewer shards than readers).
   In resampled mode each reader instead draws shards at random, with replacement, forever.
2. `read_shard`: webdataset opens the URL (local path, `pipe:`, http, ...) and iterates the tar;
   files are grouped into samples by key within one shard only, so a sample can never take a file
   from a neighbour or from another shard.
   `SourceReader` reads one source's shards in turn and knows its shard and offset.
3. `Mixer`: with several sources, each next sample comes from a source drawn by weight.
4. `Shuffler`: a shuffle buffer over raw samples (bytes are small; decoded images would not be).
5. `samples.to_tokenized_sample`, or a counted and logged skip; past the skip budget, an error.
6. `packing`: first-fit rows, grouped into Batches that carry the skip counts since the last one,
   the number of samples from each source, their keys and the reader's position after them.

Every stage keeps its state (buffers, RNGs, offsets) on an object rather than in a generator's
locals, so the reader's exact position can be saved with each Batch and restored (data.resume).

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
from multimodal.data.packing import Grouper, Packer, make_batch
from multimodal.data.resume import ResumePlan
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
    resume: when training resumes from a checkpoint saved mid-epoch, go on from the data position it
      saved (exactly the Batches an uninterrupted run would have seen next; needs the same ranks
      and DataLoader workers); False: start that epoch's data afresh.
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

    def state(self) -> dict[str, Any]:
        """The counts (not the log's rate limiting), as plain dicts for a checkpoint."""
        return {name: dict(getattr(self, name)) for name in COUNTER_FIELDS} | {
            "skipped": self.skipped, "accepted": self.accepted}

    def restore(self, state: Mapping[str, Any]) -> None:
        for name in COUNTER_FIELDS:
            setattr(self, name, Counter(state[name]))
        self.skipped, self.accepted = state["skipped"], state["accepted"]


COUNTER_FIELDS = ("since_batch", "total", "by_shard", "accepted_by_shard")


# --- 2. raw samples from a shard -----------------------------------------------------------------


def read_shard(url: str, skips: SkipCounter, skip_first: int = 0) -> Iterator[dict[str, Any]]:
    """The samples of one shard in tar order: {"__key__", "__url__", suffix: bytes, ...}.

    A file's key is its name up to the first dot ("a/b.0.jpg" -> key "a/b", suffix "0.jpg"), as in
    webdataset. Unlike webdataset's own grouping, a sample never spans two shards, and a key that
    comes back later in the shard, or a suffix twice in one sample, is skipped rather than merged:
    either would pair one sample's image with another one's text. An unreadable shard or a tar that
    breaks off is counted once (shard_error); the sample being read when it broke is dropped.

    `skip_first` (resuming): the first samples are read past without being handed on, and skips met
    before them are not counted again (the saved counts hold them); a shard that now has fewer
    samples than that has changed since the checkpoint: RuntimeError.
    """
    handed = 0

    def report(reason: str, key: str | None, detail: str) -> None:
        if handed >= skip_first:
            skips.skip(reason, url, key, detail)

    def complete(sample: dict[str, Any]) -> Iterator[dict[str, Any]]:
        # The sample, or nothing (a counted skip) if grouping found it broken.
        nonlocal handed
        if "__skip__" in sample:
            reason, detail = sample["__skip__"]
            report(reason, sample["__key__"], detail)
            return
        if handed >= skip_first:
            handed += 1
            yield sample
        else:
            handed += 1

    try:
        stream = webdataset.gopen(url)
    except Exception as error:  # missing file, failed command, refused connection, ...
        report(SHARD_ERROR, None, f"cannot open: {type(error).__name__}: {error}")
        stream = None
    if stream is not None:
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
                        yield from complete(current)
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
            report(SHARD_ERROR, None, f"tar stream broke off: {type(error).__name__}: {error}")
            current = None
        finally:
            try:
                stream.close()
            except Exception as error:  # a pipe: command closed early exits non-zero; nothing to do
                logger.debug("closing %s: %s", url, error)
        if current is not None:
            yield from complete(current)
            if not has_end_of_archive(url):
                report(SHARD_ERROR, None, "the tar has no end-of-archive marker: it was cut short after its "
                                          "last complete file, and what followed is lost")
    if handed < skip_first:
        raise RuntimeError(f"{url} now holds {handed} readable samples, but the checkpoint had read {skip_first} "
                           "of them: the shard changed since the checkpoint was written")


def has_end_of_archive(url: str) -> bool:
    """False when a local, uncompressed .tar lacks the two zero blocks every tar writer puts at its
    end: a tar cut exactly between two members reads without error, so this is the only sign that
    samples were lost. Other URLs and compressed shards cannot be checked this way: True."""
    path = local_path(url)
    if path is None or not path.endswith(".tar"):
        return True
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        if size < 1024:
            return False
        file.seek(size - 1024)
        return not any(file.read(1024))


@dataclass
class SourceReader:
    """One reader's samples of one source, shard after shard, and where it is: the current shard
    and how many of its samples were handed on (what a checkpoint saves to continue from).

    Default mode: `order` lists this reader's shards (indices into source.urls) and `shard` is the
    position in it. Resampled: `rng` draws each next shard with replacement and `shard` is the
    drawn url's index. From an endless (resampled) stream, a run of `give_up` shards that give no
    sample at all (empty or unreadable) is an error rather than a silent endless loop.
    """

    index: int                       # the source's position in the reader's source list
    source: Source
    order: list[int] | None          # None: resampled
    rng: random.Random | None = None
    shard: int = -1                  # -1: no shard opened yet
    taken: int = 0
    empty_in_a_row: int = 0
    done: bool = False
    give_up: int = 1000

    def samples(self, skips: SkipCounter) -> Iterator[dict[str, Any]]:
        if self.shard >= 0 and not self.done:  # resuming inside a shard
            yield from self._read(skips, skip_first=self.taken)
        while not self.done:
            if self.order is None:
                self.shard = self.rng.randrange(len(self.source.urls))
            else:
                self.shard += 1
                if self.shard >= len(self.order):
                    self.done = True
                    return
            self.taken = 0
            yield from self._read(skips)

    def _read(self, skips: SkipCounter, skip_first: int = 0) -> Iterator[dict[str, Any]]:
        url_index = self.shard if self.order is None else self.order[self.shard]
        url = self.source.urls[url_index]
        before = skips.skipped + skips.accepted
        got = False
        for sample in read_shard(url, skips, skip_first):
            got = True
            self.taken += 1
            sample["__ref__"] = (self.index, url_index, sample["__key__"])
            yield sample
        if got or skip_first or skips.skipped + skips.accepted > before:
            self.empty_in_a_row = 0
        else:
            self.empty_in_a_row += 1
            if self.empty_in_a_row >= self.give_up:
                raise RuntimeError(f"source {self.source.name!r}: {self.give_up} shards in a row held no sample, "
                                   f"e.g. {url}")

    def state(self) -> dict[str, Any]:
        return {"shard": self.shard, "taken": self.taken, "empty_in_a_row": self.empty_in_a_row,
                "done": self.done, "rng": rng_state(self.rng)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.shard, self.taken = state["shard"], state["taken"]
        self.empty_in_a_row, self.done = state["empty_in_a_row"], state["done"]
        set_rng_state(self.rng, state["rng"])


def rng_state(rng: random.Random | None) -> list | None:
    """A random.Random's state as plain lists (it goes into checkpoints)."""
    if rng is None:
        return None
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random | None, state: list | None) -> None:
    if rng is not None and state is not None:
        rng.setstate((state[0], tuple(state[1]), state[2]))


# --- 3. several sources, mixed by weight ------------------------------------------------------------


@dataclass
class Mixer:
    """(source name, item): each from a source drawn by weight among those not yet run out; a
    source that runs out drops out and the rest go on, until all have run out."""

    weights: dict[str, float]
    rng: random.Random
    active: list[str] = field(default_factory=list)

    def mix(self, streams: Mapping[str, Iterator[Any]]) -> Iterator[tuple[str, Any]]:
        while self.active:
            active = self.active
            name = active[0] if len(active) == 1 else self.rng.choices(active, weights=[self.weights[n] for n in active])[0]
            try:
                item = next(streams[name])
            except StopIteration:
                active.remove(name)
                continue
            yield name, item


# --- 4. the shuffle buffer ----------------------------------------------------------------------------


@dataclass
class Shuffler:
    """webdataset's shuffle buffer (the same draws from the same RNG, so the same order), with the
    buffer held here so that a checkpoint can save which samples it holds."""

    size: int
    rng: random.Random
    initial: int = 100
    buffer: list[Any] = field(default_factory=list)

    def shuffle(self, items: Iterator[Any]) -> Iterator[Any]:
        initial = min(self.initial, self.size)
        for item in items:
            self.buffer.append(item)
            if len(self.buffer) < self.size:
                try:
                    self.buffer.append(next(items))
                except StopIteration:
                    pass
            if len(self.buffer) >= initial:
                yield self._pick()
        while self.buffer:
            yield self._pick()

    def _pick(self) -> Any:
        k = self.rng.randint(0, len(self.buffer) - 1)
        item = self.buffer[k]
        self.buffer[k] = self.buffer[-1]
        self.buffer.pop()
        return item


# --- 5. tokenized samples -------------------------------------------------------------------------


def tokenized_samples(raw: Iterator[tuple[str, Mapping[str, Any]]], settings: SampleSettings,
                      skips: SkipCounter) -> Iterator[tuple[tuple, TokenizedSample]]:
    """(reference, tokenized sample) of each (source name, raw sample) that is not skipped; the
    reference (source index, url index, key) says where to read the sample again."""
    for _, sample in raw:
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
        yield sample["__ref__"], tokenized


# --- all steps, in one reader ----------------------------------------------------------------------


def reader_quota(batches_per_epoch: int | None, worker: int, num_workers: int) -> int | None:
    """This worker's share of its rank's batches_per_epoch (the shares add up to it exactly)."""
    if batches_per_epoch is None:
        return None
    return batches_per_epoch // num_workers + (1 if worker < batches_per_epoch % num_workers else 0)


def iterate_batches(config: DataConfig, settings: SampleSettings, sources: Sequence[Source] | Sequence[str],
                    epoch: int, config_rank: tuple[int, int] | None = None,
                    resume: ResumePlan | None = None) -> Iterator[Batch | tuple[Batch, list[list[str]]]]:
    """The Batches of this reader (rank x DataLoader worker) for one epoch.

    The rank is `config_rank` (rank, world size) when given, else it comes from RANK / WORLD_SIZE
    when set (torchrun), else from the torch.distributed process group.

    Every Batch carries `position`: the reader's state right after it (every stage's buffers as
    references to samples, every RNG, the shard and offset of every source, the skip counts). With
    `resume`, each DataLoader worker takes over the reader the plan gives it and goes on from its
    saved state, so that the Batches that follow are exactly those an uninterrupted run would have
    produced.
    """
    if sources and isinstance(sources[0], str):
        sources = [Source(SINGLE_SOURCE, 1.0, tuple(sources))]
    rank, world_size, worker, num_workers = pytorch_worker_info()
    if config_rank is not None:  # found by build_loader in the main process (see ShardDataset.placed)
        rank, world_size = config_rank
    state = None
    if resume is not None:
        # Workers are rotated so that the reader whose Batch comes next runs in worker 0, the one
        # the DataLoader asks first: the round-robin order of readers is then the original one.
        worker = resume.reader_of(worker)
        state = resume.states.get(worker)
    reader = f"rank {rank} worker {worker}"
    quota = reader_quota(config.batches_per_epoch, worker, num_workers)
    if quota == 0 or (state is not None and state["finished"]):
        return
    shuffle = config.shuffle_buffer > 0
    skips = SkipCounter(max_fraction=config.max_skip_fraction, min_samples=config.skip_budget_min_samples,
                        reader=reader)
    readers: list[SourceReader] = []
    for index, source in enumerate(sources):
        if config.resampled:
            rng = random.Random(f"resample:{config.seed}:{epoch}:{rank}:{worker}:{source.name}")
            readers.append(SourceReader(index, source, None, rng))
        else:
            order = shards_for_worker(range(len(source.urls)), config.seed, epoch, shuffle, rank, world_size,
                                      worker, num_workers)
            if not order:
                logger.warning("%s has no shard of source %r: %d shards for %d ranks x %d workers; "
                               "use more shards or fewer workers", reader, source.name, len(source.urls),
                               world_size, num_workers)
            readers.append(SourceReader(index, source, order))
    mixer = Mixer({source.name: source.weight for source in sources},
                  random.Random(f"mix:{config.seed}:{epoch}:{rank}:{worker}"),
                  [r.source.name for r in readers if r.order is None or r.order])
    # Each reader its own stream of random numbers, reproducible from (seed, epoch, reader).
    shuffler = Shuffler(config.shuffle_buffer, random.Random(f"samples:{config.seed}:{epoch}:{rank}:{worker}"))
    packer = Packer(config.max_tokens, config.pack_buffer, length=lambda item: len(item[1]))
    grouper = Grouper(config.rows_per_batch)
    pending: list[list[tuple[tuple, TokenizedSample]]] | None = None
    batches, from_source = 0, Counter()
    if state is not None:
        pending = restore_reader(state, settings, sources, readers, skips, mixer, shuffler, packer, grouper)
        batches, from_source = state["batches"], Counter(state["from_source"])
    if not mixer.active and pending is None and not packer.rows and not grouper.group and not shuffler.buffer:
        return
    raw = mixer.mix({r.source.name: r.samples(skips) for r in readers})
    if shuffle:
        raw = shuffler.shuffle(raw)
    samples = tokenized_samples(raw, settings, skips)
    groups = grouper.groups(packer.pack(samples))
    names = [source.name for source in sources]

    def finish(group: list[list[tuple[tuple, TokenizedSample]]], finished: bool) -> Batch | tuple[Batch, list[list[str]]]:
        batch = make_batch([[sample for _, sample in row] for row in group], config.max_tokens,
                           settings.tokenizer.pad_id, skips.take())
        batch.sources = dict(Counter(names[ref[0]] for row in group for ref, _ in row))
        batch.keys = [[sample.key for _, sample in row] for row in group]
        from_source.update(batch.sources)
        batch.position = {"worker": worker, "workers": max(1, num_workers), "rank": rank, "world_size": world_size,
                          "epoch": epoch, "state": {
            "sources": [r.state() for r in readers],
            "mixer": {"active": list(mixer.active), "rng": rng_state(mixer.rng)},
            "shuffle": {"buffer": [sample["__ref__"] for _, sample in shuffler.buffer], "rng": rng_state(shuffler.rng)},
            "packer": {"rows": [[ref for ref, _ in row] for row in packer.rows], "room": list(packer.room),
                       "held": packer.held},
            "group": [[ref for ref, _ in row] for row in grouper.group],
            "pending": None if finished or pending is None else [[ref for ref, _ in row] for row in pending],
            "skips": skips.state(), "batches": batches, "from_source": dict(from_source), "finished": finished}}
        return (batch, batch.keys) if config.with_keys else batch

    # One group is held back until the next is ready (or the data ends), so skips found after the
    # last full batch, at the tail of the last shard, still reach the training loop on a Batch.
    # Each round starts with the quota check, the point a restored reader starts from.
    while not (quota is not None and pending is not None and batches + 1 == quota):
        group = next(groups, None)
        if group is None:
            break
        if pending is not None:
            ready, pending = pending, group
            batches += 1
            yield finish(ready, finished=False)
        else:
            pending = group
    if pending is not None:
        ready, pending = pending, None
        batches += 1
        yield finish(ready, finished=True)
    if quota is not None and batches < quota:
        logger.warning("%s produced %d of its %d batches (batches_per_epoch %d): its data ran out; ranks with "
                       "unequal batch counts can hang DDP; lower batches_per_epoch or use resampled mode",
                       reader, batches, quota, config.batches_per_epoch)
    if batches == 0 and skips.total:
        logger.warning("%s produced no batch from %s; every sample was skipped: %s",
                       reader, [source.name for source in sources], dict(skips.total))
    else:
        total = sum(from_source.values()) or 1
        achieved = ", ".join(f"{source.name} {from_source[source.name] / total:.3f} (weight {source.weight:g})"
                             for source in sources)
        logger.info("%s: %d batches, %d samples, skipped %s; sources: %s",
                    reader, batches, sum(from_source.values()), dict(skips.total), achieved)


def restore_reader(state: Mapping[str, Any], settings: SampleSettings, sources: Sequence[Source],
                   readers: Sequence[SourceReader], skips: SkipCounter, mixer: Mixer, shuffler: Shuffler,
                   packer: Packer, grouper: Grouper) -> list[list[tuple[tuple, TokenizedSample]]] | None:
    """Put a reader's stages back into a saved state; returns the pending group. The samples the
    buffers held are read again from their shards and tokenized again (both deterministic)."""
    for reader, saved in zip(readers, state["sources"], strict=True):
        reader.restore(saved)
    mixer.active = list(state["mixer"]["active"])
    set_rng_state(mixer.rng, state["mixer"]["rng"])
    set_rng_state(shuffler.rng, state["shuffle"]["rng"])
    skips.restore(state["skips"])
    rows = [*state["packer"]["rows"], *state["group"], *(state["pending"] or [])]
    refs = [tuple(ref) for ref in state["shuffle"]["buffer"]] + [tuple(ref) for row in rows for ref in row]
    raw = read_samples(sources, refs)
    tokenized = {ref: to_tokenized_sample(raw[ref], settings) for row in rows for ref in map(tuple, row)}
    names = [source.name for source in sources]
    shuffler.buffer = [(names[ref[0]], raw[ref]) for ref in map(tuple, state["shuffle"]["buffer"])]
    restore_rows = lambda saved: [[(tuple(ref), tokenized[tuple(ref)]) for ref in row] for row in saved]  # noqa: E731
    packer.rows, packer.room, packer.held = restore_rows(state["packer"]["rows"]), list(state["packer"]["room"]), state["packer"]["held"]
    grouper.group = restore_rows(state["group"])
    return None if state["pending"] is None else restore_rows(state["pending"])


def read_samples(sources: Sequence[Source], refs: Iterable[tuple]) -> dict[tuple, dict[str, Any]]:
    """The raw samples named by (source index, url index, key) references, each shard read once."""
    wanted: dict[tuple[int, int], set[str]] = {}
    for source_index, url_index, key in refs:
        wanted.setdefault((source_index, url_index), set()).add(key)
    found: dict[tuple, dict[str, Any]] = {}
    quiet = SkipCounter(log_first=0, log_every_s=float("inf"))  # skips here were counted the first time
    for (source_index, url_index), keys in wanted.items():
        url = sources[source_index].urls[url_index]
        for sample in read_shard(url, quiet):
            if sample["__key__"] in keys:
                sample["__ref__"] = (source_index, url_index, sample["__key__"])
                found[sample["__ref__"]] = sample
        missing = sorted(keys - {key for (s, u, key) in found if (s, u) == (source_index, url_index)})
        if missing:
            raise RuntimeError(f"resuming: {url} no longer holds the samples {missing[:3]} that the checkpoint's "
                               "buffers held; the data changed since the checkpoint was written")
    return found


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
        self.resume: ResumePlan | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, plan: ResumePlan | None) -> None:
        """Go on from a checkpoint's data position: its epoch, each reader from its saved state."""
        self.resume = plan
        if plan is not None:
            self.epoch = plan.epoch

    def check_readers(self, world_size: int, num_workers: int) -> None:
        """ValueError (or, resampled, a warning) when some reader would get no shard of a source."""
        check_readers(self.sources, self.config.resampled, world_size, num_workers)

    def __iter__(self) -> Iterator[Batch | tuple[Batch, list[list[str]]]]:
        # The plan holds only for its own epoch; the epochs after it start afresh.
        resume = self.resume if self.resume is not None and self.resume.epoch == self.epoch else None
        return iterate_batches(self.config, self.settings, self.sources, self.epoch, self.placed, resume)


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
    if dataset.resume is not None:
        dataset.resume.check(world_size, num_workers)
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
