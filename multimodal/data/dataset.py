"""The data path as a torch IterableDataset, and the DataLoader over it.

Per epoch, every rank and DataLoader worker runs one reader (reader.Reader) over its own share of
the shards, and the DataLoader takes their Batches in turn:
1. shards.shards_for_worker deals each source's shards out by rank and worker (build_loader
   refuses fewer shards than readers); in resampled mode each reader instead draws shards at
   random, with replacement, forever.
2. shards.read_shard reads samples out of the tars; stages.SourceReader goes from shard to shard.
3. stages.Mixer mixes the sources by weight; stages.Shuffler shuffles raw samples.
4. samples.to_tokenized_sample, or a counted and logged skip (skips.py); past the skip budget, an error.
5. packing: first-fit rows, grouped into Batches that carry the skip counts since the last one,
   the number of samples from each source, their keys and the reader's position after them
   (reader.ReaderState), from which a resumed run goes on exactly (resume.py).

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

import ctypes
import functools
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from webdataset.utils import pytorch_worker_info

from multimodal.batch import Batch
from multimodal.data.config import DataConfig, Source
from multimodal.data.reader import Reader
from multimodal.data.resume import ResumePlan
from multimodal.data.samples import SampleSettings


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


def reader_quota(batches_per_epoch: int | None, worker: int, num_workers: int) -> int | None:
    """This worker's share of its rank's batches_per_epoch (the shares add up to it exactly)."""
    if batches_per_epoch is None:
        return None
    return batches_per_epoch // num_workers + (1 if worker < batches_per_epoch % num_workers else 0)


def iterate_batches(config: DataConfig, settings: SampleSettings, sources: Sequence[Source], epoch: int,
                    placed: tuple[int, int] | None = None, resume: ResumePlan | None = None) -> Iterator[Batch]:
    """The Batches of this reader (rank x DataLoader worker) for one epoch.

    The rank is `placed` (rank, world size) when given, else it comes from RANK / WORLD_SIZE
    when set (torchrun), else from the torch.distributed process group.

    Every Batch carries `position`: the reader's state right after it (reader.ReaderState). With
    `resume`, each DataLoader worker takes over the reader the plan gives it and goes on from its
    saved state, so that the Batches that follow are exactly those an uninterrupted run would have
    produced.
    """
    rank, world_size, worker, num_workers = pytorch_worker_info()
    if placed is not None:  # found by build_loader in the main process
        rank, world_size = placed
    state = None
    if resume is not None:
        # Workers are rotated so that the reader whose Batch comes next runs in worker 0, the one
        # the DataLoader asks first: the round-robin order of readers is then the original one.
        worker = resume.reader_of(worker)
        state = resume.states.get(worker)
    quota = reader_quota(config.batches_per_epoch, worker, num_workers)
    if quota == 0 or (state is not None and state.finished):
        return
    reader = Reader(config, settings, sources, epoch, rank, world_size, worker, num_workers)
    if state is not None:
        reader.restore(state)
    yield from reader.batches(quota)


class ShardDataset(torch.utils.data.IterableDataset):
    """The data path as a torch IterableDataset: iterating it (in each DataLoader worker) yields
    that reader's Batches for the current epoch. Call `set_epoch` before each epoch to reshuffle;
    with non-persistent workers (build_loader's choice) the new epoch reaches every worker."""

    def __init__(self, config: DataConfig, settings: SampleSettings, sources: Sequence[Source]) -> None:
        super().__init__()
        self.config = config
        self.settings = settings
        self.sources = list(sources)
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

    def __iter__(self) -> Iterator[Batch]:
        # The plan holds only for its own epoch; the epochs after it start afresh.
        resume = self.resume if self.resume is not None and self.resume.epoch == self.epoch else None
        return iterate_batches(self.config, self.settings, self.sources, self.epoch, self.placed, resume)


def keep_as_is(item: Any) -> Any:
    """The DataLoader's collate: a Batch is already a batch (module-level so workers can pickle it)."""
    return item


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _kill_on_parent_death() -> bool:
    """Linux: has the kernel SIGKILL this process when its parent dies. False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


def die_with_parent(trainer: int, worker_id: int) -> None:
    """A DataLoader worker's worker_init_fn (with the PID of the process that built the loader,
    `trainer`): the worker dies as soon as its parent does, even when the parent was SIGKILLed.

    Torch's own watchdog only looks at the parent between two fetches, and a worker whose parent
    died can hang in its exit for good (its data queue's pipe is still held open by its siblings),
    holding its memory. On Linux the kernel sends the worker SIGKILL when its parent dies
    (PR_SET_PDEATHSIG); elsewhere a daemon thread checks the parent every second.
    """
    # The parent is the trainer itself (fork, spawn) or, under forkserver, the fork server, which
    # exits as soon as the trainer does. If the trainer is gone already, so is the parent, and the
    # death signal would never come.
    parent = os.getppid()
    if parent != trainer and not _alive(trainer):
        os._exit(1)
    # The death signal comes when the *thread* that forked the worker ends, not its process: the
    # DataLoader's iterator forks its workers from the thread that starts iterating it, which is the
    # main thread in Lightning (and the fork server's only thread under forkserver); a loader first
    # iterated from a short-lived thread of one's own would lose its workers when that thread ends.
    if not _kill_on_parent_death():
        threading.Thread(target=_exit_when_orphaned, args=(parent,), name="die-with-parent", daemon=True).start()
    elif os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


def build_loader(dataset: ShardDataset, num_workers: int, world_size: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` that passes its Batches through unchanged.

    Checks first that every reader (world_size ranks x num_workers) gets shards (check_readers);
    The rank and world_size (unless given) come from RANK / WORLD_SIZE or the torch.distributed
    process group, else 0 and 1, and are stored on the dataset for its workers.
    Workers are not persistent, so each epoch's `set_epoch` reaches them (a worker process costs
    little next to a pass over the shards), and each dies with the process that built the loader,
    even one SIGKILLed (die_with_parent), rather than living on, orphaned, with its memory.
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
        # This is the loader's only worker_init_fn: one passed to build_loader would have to be called
        # from it, after die_with_parent, not passed instead. (With it set, Lightning does not add its
        # pl_worker_init_function, which only reseeds the global RNGs; the data path uses its own.)
        worker_init_fn=functools.partial(die_with_parent, os.getpid()),
    )

