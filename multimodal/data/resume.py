"""Exact mid-epoch resume: which data the training loop has consumed, saved in the checkpoint.

Every Batch carries its reader's position right after it (reader.ReaderState): the shard and
offset of every source, every buffer as references to samples, every RNG, the skip counts. The
DataLoader's prefetching means the newest position a worker produced is not what training has
consumed, so the position is recorded where a Batch is trained on (`DataPosition.consumed`, called
by the training step) and saved from there. On resume, `ResumePlan` tells each reader where to go
on from, and which reader the DataLoader must ask first so that the readers' round-robin order is
the original one: the Batches after the checkpoint are then exactly those of an uninterrupted run.

A resume needs the same ranks and DataLoader workers as the run that saved (they define which
shards each reader reads); anything else is refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from multimodal.data.reader import ReaderState


class ResumeMismatch(ValueError):
    """A resumed run asks for settings that the checkpoint's saved state cannot carry over to."""


@dataclass
class ResumePlan:
    """Where one rank's readers go on from in `epoch`: the saved state of each reader (by reader
    index; a reader without one starts the epoch afresh) and the reader whose Batch comes next."""

    epoch: int
    world_size: int
    num_workers: int
    states: dict[int, ReaderState] = field(default_factory=dict)
    next_reader: int = 0

    def reader_of(self, worker: int) -> int:
        """The reader that DataLoader worker `worker` runs: rotated so worker 0 runs the next one."""
        return (worker + self.next_reader) % max(1, self.num_workers)

    def check(self, world_size: int, num_workers: int) -> None:
        if (world_size, max(1, num_workers)) != (self.world_size, max(1, self.num_workers)):
            raise ResumeMismatch(
                f"the checkpoint's data position is for {self.world_size} ranks x {self.num_workers} DataLoader "
                f"workers, this run has {world_size} x {num_workers}: these decide which shards each reader "
                "reads, so the position cannot carry over. Resume with the same ranks and data.num_workers, or "
                "set data.train.resume: false to start the epoch's data afresh (what the epoch already saw will "
                "be seen again)")


@dataclass
class DataPosition:
    """What one rank has trained on so far in the current epoch: each reader's state after its last
    consumed Batch, and the reader whose Batch comes next in the DataLoader's round-robin order."""

    epoch: int = -1
    world_size: int = 1
    num_workers: int = 1
    states: dict[int, ReaderState] = field(default_factory=dict)
    next_reader: int = 0

    def consumed(self, position: Mapping[str, Any] | None) -> None:
        """Record the position a Batch carried (None: a Batch from elsewhere, nothing to record)."""
        if position is None:
            return
        if position["epoch"] != self.epoch:
            self.epoch, self.states = position["epoch"], {}
        self.world_size, self.num_workers = position["world_size"], position["num_workers"]
        self.states[position["worker"]] = position["state"]
        self.next_reader = (position["worker"] + 1) % self.num_workers

    def plan(self) -> ResumePlan | None:
        if self.epoch < 0:
            return None
        return ResumePlan(self.epoch, self.world_size, self.num_workers, dict(self.states), self.next_reader)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "world_size": self.world_size, "num_workers": self.num_workers,
                "states": {str(k): v.to_dict() for k, v in self.states.items()}, "next_reader": self.next_reader}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "DataPosition":
        return cls(state["epoch"], state["world_size"], state["num_workers"],
                   {int(k): ReaderState.from_dict(v) for k, v in state["states"].items()}, state["next_reader"])
