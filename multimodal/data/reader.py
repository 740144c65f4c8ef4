"""One reader (a rank x DataLoader worker) for one epoch: its stages wired into a stream of
Batches, and its exact position after each one.

    SourceReader per source -> Mixer -> Shuffler -> tokenized_samples -> Packer -> Grouper -> Batch

Every Batch carries `position`, with the reader's `ReaderState` right after it: each stage's own
`state()` (buffers as references to samples, RNGs, the shard and offset of every source) and the
reader's counts. `Reader.restore` hands each stage its part back; the samples the buffers held are
read again from their shards and tokenized again (both deterministic), so a restored reader goes on
with exactly the Batches the original would have produced next (data.resume).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from multimodal.batch import Batch
from multimodal.data.config import DataConfig, Source
from multimodal.data.packing import TRIM_MULTIPLE, Grouper, Packer, make_batch
from multimodal.data.samples import SampleSettings, TokenizedSample, to_tokenized_sample
from multimodal.data.shards import read_shard, shards_for_worker
from multimodal.data.skips import SkipCounter
from multimodal.data.stages import Mixer, Ref, Shuffler, SourceReader, tokenized_samples

logger = logging.getLogger("multimodal.data")

Packed = tuple[Ref, TokenizedSample]  # what the packer and grouper hold: a sample and where it is
Row = list[Packed]


def row_refs(row: Row) -> list[Ref]:
    return [ref for ref, _ in row]


@dataclass
class ReaderState:
    """A reader's exact position after one of its Batches, in plain values (lists, dicts, numbers,
    strings) so that a checkpoint holds it and torch.load(weights_only=True) reads it back.

    sources, mixer, shuffle, packer, group: the `state()` of the SourceReaders (one per source),
    the Mixer, the Shuffler, the Packer and the Grouper. pending: the rows of the Batch held back
    (Reader.batches says why), or None. skips: SkipCounter.state(). batches: Batches produced so
    far this epoch; from_source: samples produced from each source; finished: no Batch follows.
    """

    sources: list[dict[str, Any]]
    mixer: dict[str, Any]
    shuffle: dict[str, Any]
    packer: dict[str, Any]
    group: list[list[Ref]]
    pending: list[list[Ref]] | None
    skips: dict[str, Any]
    batches: int
    from_source: dict[str, int]
    finished: bool

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> "ReaderState":
        expected = {f.name for f in fields(cls)}
        if set(saved) != expected:
            raise ValueError(
                f"the checkpoint's data position holds a reader state with the fields {sorted(saved)}, this "
                f"version of the data path expects {sorted(expected)}: it was saved by another version and "
                "cannot be continued exactly. Set data.train.resume: false to start the epoch's data afresh "
                "(what the epoch already saw will be seen again)")
        return cls(**saved)


class Reader:
    """The stages of one reader for one epoch, built from (seed, epoch, rank, worker) so that every
    stream of random numbers is reproducible, and the Batches they produce (`batches`)."""

    def __init__(self, config: DataConfig, settings: SampleSettings, sources: Sequence[Source], epoch: int,
                 rank: int, world_size: int, worker: int, num_workers: int) -> None:
        self.config, self.settings, self.sources = config, settings, list(sources)
        self.epoch, self.rank, self.world_size, self.worker, self.num_workers = (
            epoch, rank, world_size, worker, num_workers)
        self.name = f"rank {rank} worker {worker}"
        self.shuffle = config.shuffle_buffer > 0
        self.skips = SkipCounter(max_fraction=config.max_skip_fraction, min_samples=config.skip_budget_min_samples,
                                 reader=self.name)
        self.source_readers: list[SourceReader] = []
        for index, source in enumerate(sources):
            if config.resampled:
                rng = random.Random(f"resample:{config.seed}:{epoch}:{rank}:{worker}:{source.name}")
                self.source_readers.append(SourceReader(index, source, None, rng))
            else:
                order = shards_for_worker(range(len(source.urls)), config.seed, epoch, self.shuffle, rank,
                                          world_size, worker, num_workers)
                if not order:
                    logger.warning("%s has no shard of source %r: %d shards for %d ranks x %d workers; "
                                   "use more shards or fewer workers", self.name, source.name, len(source.urls),
                                   world_size, num_workers)
                self.source_readers.append(SourceReader(index, source, order))
        self.mixer = Mixer({source.name: source.weight for source in sources},
                           random.Random(f"mix:{config.seed}:{epoch}:{rank}:{worker}"),
                           [r.source.name for r in self.source_readers if r.order is None or r.order])
        self.shuffler = Shuffler(config.shuffle_buffer, random.Random(f"samples:{config.seed}:{epoch}:{rank}:{worker}"))
        self.packer = Packer(config.max_tokens, config.pack_buffer, length=lambda item: len(item[1]))
        self.grouper = Grouper(config.rows_per_batch)
        self.pending: list[Row] | None = None
        self.produced = 0
        self.from_source: Counter[str] = Counter()

    def state(self, finished: bool) -> ReaderState:
        return ReaderState(
            sources=[reader.state() for reader in self.source_readers],
            mixer=self.mixer.state(),
            shuffle=self.shuffler.state(ref=lambda item: item[1]["__ref__"]),
            packer=self.packer.state(ref=lambda item: item[0]),
            group=self.grouper.state(ref=row_refs),
            pending=None if self.pending is None else [row_refs(row) for row in self.pending],
            skips=self.skips.state(), batches=self.produced, from_source=dict(self.from_source), finished=finished)

    def restore(self, state: ReaderState) -> None:
        """Put every stage back into a saved state (of a Reader built with the same arguments)."""
        for reader, saved in zip(self.source_readers, state.sources, strict=True):
            reader.restore(saved)
        self.mixer.restore(state.mixer)
        self.skips.restore(state.skips)
        rows = [*state.packer["rows"], *state.group, *(state.pending or [])]
        refs = [tuple(ref) for ref in state.shuffle["buffer"]] + [tuple(ref) for row in rows for ref in row]
        raw = read_samples(self.sources, refs)
        tokenized = {ref: to_tokenized_sample(raw[ref], self.settings) for row in rows for ref in map(tuple, row)}
        names = [source.name for source in self.sources]
        self.shuffler.restore(state.shuffle, item=lambda ref: (names[ref[0]], raw[ref]))
        def packed_row(refs: list) -> list[tuple[tuple, Any]]:
            return [(tuple(ref), tokenized[tuple(ref)]) for ref in refs]

        self.packer.restore(state.packer, sample=lambda ref: packed_row([ref])[0])
        self.grouper.restore(state.group, row=packed_row)
        self.pending = None if state.pending is None else [packed_row(row) for row in state.pending]
        self.produced, self.from_source = state.batches, Counter(state.from_source)

    def batches(self, quota: int | None) -> Iterator[Batch]:
        """The Batches from here to the end of the epoch (of the data, or of this reader's `quota`)."""
        if (not self.mixer.active and self.pending is None and not self.packer.rows and not self.grouper.group
                and not self.shuffler.buffer):
            return
        raw = self.mixer.mix({r.source.name: r.samples(self.skips) for r in self.source_readers})
        if self.shuffle:
            raw = self.shuffler.shuffle(raw)
        samples = tokenized_samples(raw, self.settings, self.skips)
        groups = self.grouper.groups(self.packer.pack(samples))
        # One group is held back until the next is ready (or the data ends), so skips found after the
        # last full batch, at the tail of the last shard, still reach the training loop on a Batch.
        # Each round starts with the quota check, the point a restored reader starts from.
        while not (quota is not None and self.pending is not None and self.produced + 1 == quota):
            group = next(groups, None)
            if group is None:
                break
            if self.pending is not None:
                ready, self.pending = self.pending, group
                self.produced += 1
                yield self.batch(ready, finished=False)
            else:
                self.pending = group
        if self.pending is not None:
            ready, self.pending = self.pending, None
            self.produced += 1
            yield self.batch(ready, finished=True)
        self.log_epoch(quota)

    def batch(self, group: list[Row], finished: bool) -> Batch:
        """The Batch of `group`, with the skips since the previous one and the position after it."""
        batch = make_batch([[sample for _, sample in row] for row in group], self.config.max_tokens,
                           self.settings.tokenizer.pad_id, self.skips.take(),
                           trim_to_multiple=TRIM_MULTIPLE if self.config.trim_rows else None)
        batch.sources = dict(Counter(self.sources[ref[0]].name for row in group for ref, _ in row))
        batch.keys = [[sample.key for _, sample in row] for row in group]
        self.from_source.update(batch.sources)
        batch.position = {"worker": self.worker, "num_workers": max(1, self.num_workers), "rank": self.rank,
                          "world_size": self.world_size, "epoch": self.epoch, "state": self.state(finished)}
        return batch

    def log_epoch(self, quota: int | None) -> None:
        if quota is not None and self.produced < quota:
            logger.warning("%s produced %d of its %d batches (batches_per_epoch %d): its data ran out; ranks with "
                           "unequal batch counts can hang DDP; lower batches_per_epoch or use resampled mode",
                           self.name, self.produced, quota, self.config.batches_per_epoch)
        if self.produced == 0 and self.skips.total:
            logger.warning("%s produced no batch from %s; every sample was skipped: %s",
                           self.name, [source.name for source in self.sources], dict(self.skips.total))
        else:
            total = sum(self.from_source.values()) or 1
            achieved = ", ".join(f"{source.name} {self.from_source[source.name] / total:.3f} (weight {source.weight:g})"
                                 for source in self.sources)
            logger.info("%s: %d batches, %d samples, skipped %s; sources: %s",
                        self.name, self.produced, sum(self.from_source.values()), dict(self.skips.total), achieved)


def read_samples(sources: Sequence[Source], refs: Iterable[Ref]) -> dict[Ref, dict[str, Any]]:
    """The raw samples named by (source index, url index, key) references, each shard read once."""
    wanted: dict[tuple[int, int], set[str]] = {}
    for source_index, url_index, key in refs:
        wanted.setdefault((source_index, url_index), set()).add(key)
    found: dict[Ref, dict[str, Any]] = {}
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
