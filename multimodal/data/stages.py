"""The stages of one reader, from a source's shards to tokenized samples:
- `SourceReader` reads one source's shards in turn (shards.read_shard) and knows its shard and offset.
- `Mixer`: with several sources, each next sample comes from a source drawn by weight.
- `Shuffler`: a shuffle buffer over raw samples (bytes are small; decoded images would not be).
- `tokenized_samples`: samples.to_tokenized_sample, or a counted and logged skip.
Packing follows (packing.Packer, packing.Grouper), and reader.py wires them all together.

Every stage keeps what it holds (buffers, RNGs, offsets) on its object rather than in a generator's
locals, and hands it out with `state()` as plain values, its samples as references (source index,
url index, key); `restore()` puts a saved state back, given a way to turn a reference into the
sample again. That is how a reader's exact position is saved with each Batch (reader.ReaderState).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from multimodal.data.config import Source
from multimodal.data.decode import UNEXPECTED_ERROR, SkipSample
from multimodal.data.samples import SampleSettings, TokenizedSample, to_tokenized_sample
from multimodal.data.shards import read_shard
from multimodal.data.skips import SkipCounter

logger = logging.getLogger("multimodal.data")

Ref = tuple  # where a sample is: (source index, url index, key)


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

    def state(self) -> dict[str, Any]:
        return {"active": list(self.active), "rng": rng_state(self.rng)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.active = list(state["active"])
        set_rng_state(self.rng, state["rng"])


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

    def state(self, ref: Callable[[Any], Ref]) -> dict[str, Any]:
        """The buffer as references (`ref` names an item's sample) and the RNG."""
        return {"buffer": [ref(item) for item in self.buffer], "rng": rng_state(self.rng)}

    def restore(self, state: Mapping[str, Any], item: Callable[[Ref], Any]) -> None:
        """Back to a saved state; `item` turns a saved reference into the item again."""
        self.buffer = [item(tuple(saved)) for saved in state["buffer"]]
        set_rng_state(self.rng, state["rng"])


def tokenized_samples(raw: Iterator[tuple[str, Mapping[str, Any]]], settings: SampleSettings,
                      skips: SkipCounter) -> Iterator[tuple[Ref, TokenizedSample]]:
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
