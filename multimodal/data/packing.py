"""Packing: tokenized samples -> rows of `max_tokens` -> Batches.

Samples of very different lengths (a short caption, a long conversation) are packed first-fit into
rows of `max_tokens` tokens. Attention stays within each sample (the row's sample lengths become a
packed SeqLayout) and positions restart at 0 for each one, as if every sample had a row to itself,
while almost no compute goes to padding.

The packer streams: it keeps a bounded number of samples in open rows, so memory stays flat
however long the data set is, and a row leaves as soon as it is full or is the oldest when the
buffer overflows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from lm.attention import SeqLayout
from lm.loss import IGNORE_INDEX
from multimodal.batch import Batch
from multimodal.data.samples import TokenizedSample
from multimodal.layouts.inputs import ImageInputs

Item = TypeVar("Item")


@dataclass
class Packer:
    """First-fit packing of samples into rows of `max_tokens`, with its open rows held here (not in
    a generator's locals) so that a reader can save them and continue exactly where it was.

    Each sample goes into the oldest open row with room for it, or opens a new row. A row is emitted
    when it is exactly full, when the open rows hold more than `buffer_size` samples (the oldest row
    goes), and at the end (all rows, oldest first). Samples are never split or reordered within a
    row; each one is longer than 0 and at most `max_tokens` (longer ones must be filtered out
    before: ValueError).
    """

    max_tokens: int
    buffer_size: int
    length: Callable[[Any], int] = len
    rows: list[list[Any]] = field(default_factory=list)  # open rows, oldest first
    room: list[int] = field(default_factory=list)        # free tokens in each open row
    held: int = 0                                         # samples in open rows

    def __post_init__(self) -> None:
        if self.max_tokens <= 0 or self.buffer_size <= 0:
            raise ValueError(f"max_tokens and buffer_size must be positive, got {self.max_tokens} and {self.buffer_size}")

    def pack(self, samples: Iterable[Item]) -> Iterator[list[Item]]:
        samples = iter(samples)
        # The overflow check comes first in each round, so a Packer restored from a saved state
        # (which was saved at one of these yields) goes on exactly as the original would have.
        while True:
            while self.held > self.buffer_size:
                yield self._emit(0)
            sample = next(samples, _END)
            if sample is _END:
                break
            n = self.length(sample)
            if not 0 < n <= self.max_tokens:
                raise ValueError(f"a sample of {n} tokens cannot go into rows of {self.max_tokens}")
            index = next((i for i, free in enumerate(self.room) if free >= n), len(self.rows))
            if index == len(self.rows):
                self.rows.append([])
                self.room.append(self.max_tokens)
            self.rows[index].append(sample)
            self.room[index] -= n
            self.held += 1
            if self.room[index] == 0:
                yield self._emit(index)
        while self.rows:
            yield self._emit(0)

    def _emit(self, index: int) -> list[Any]:
        self.room.pop(index)
        row = self.rows.pop(index)
        self.held -= len(row)
        return row

    def state(self, ref: Callable[[Any], Any]) -> dict[str, Any]:
        """The open rows, with each sample as `ref(sample)` (a plain value for a checkpoint)."""
        return {"rows": [[ref(sample) for sample in row] for row in self.rows], "room": list(self.room),
                "held": self.held}

    def restore(self, state: Mapping[str, Any], sample: Callable[[Any], Any]) -> None:
        """Back to a saved state; `sample` turns a saved reference into the sample again."""
        self.rows = [[sample(saved) for saved in row] for row in state["rows"]]
        self.room, self.held = list(state["room"]), state["held"]


_END = object()


def pack_samples(
    samples: Iterable[Item], max_tokens: int, buffer_size: int, length: Callable[[Item], int] = len
) -> Iterator[list[Item]]:
    """Rows of samples, packed first-fit (see Packer)."""
    return Packer(max_tokens, buffer_size, length).pack(samples)


@dataclass
class Grouper:
    """Consecutive groups of `rows_per_batch` rows (the last one may be shorter), with the group
    being filled held here so that it can be saved."""

    rows_per_batch: int
    group: list[Any] = field(default_factory=list)

    def groups(self, rows: Iterable[Item]) -> Iterator[list[Item]]:
        for row in rows:
            self.group.append(row)
            if len(self.group) == self.rows_per_batch:
                group, self.group = self.group, []
                yield group
        if self.group:
            group, self.group = self.group, []
            yield group

    def state(self, ref: Callable[[Any], Any]) -> list[Any]:
        """The group being filled, each row as `ref(row)`."""
        return [ref(row) for row in self.group]

    def restore(self, state: Sequence[Any], row: Callable[[Any], Any]) -> None:
        """Back to a saved state; `row` turns a saved row into the row again."""
        self.group = [row(saved) for saved in state]


def group_rows(rows: Iterable[Item], rows_per_batch: int) -> Iterator[list[Item]]:
    """Consecutive groups of `rows_per_batch` (the last one may be shorter)."""
    return Grouper(rows_per_batch).groups(rows)


# Trimmed rows are padded to a multiple of this: few distinct shapes for compiled blocks, and
# lengths that suit GPU matrix tiles.
TRIM_MULTIPLE = 64


def make_batch(rows: Sequence[Sequence[TokenizedSample]], max_tokens: int, pad_id: int,
               skipped: dict[str, int] | None = None, trim_to_multiple: int | None = None) -> Batch:
    """A Batch of packed rows, each padded to `max_tokens`, or, with `trim_to_multiple`, to the
    longest row's length rounded up to that multiple (at most `max_tokens`).

    By default every row has the same fixed length, so the memory a step needs is known from the
    first step (no late out-of-memory on an unlucky batch) and shapes stay static for compiled
    kernels; the cost is the padding, which `padding_waste` measures. Trimming removes the padding
    that no row of the Batch needs (DataConfig.trim_rows). The images are concatenated in row-major
    placeholder order, the order VisionLanguageModel splices them in: a [N, 3, H, W] tensor in the
    fixed layout; in the anyres layout (samples with image_sizes) one ImageInputs, every sample's
    views, sizes and view counts one after another, and every video's frames in video placeholder
    order (frames_per_video) beside them.
    """
    if trim_to_multiple is not None:
        if trim_to_multiple < 1:
            raise ValueError(f"trim_to_multiple must be >= 1, got {trim_to_multiple}")
        longest = max((sum(len(sample) for sample in row) for row in rows), default=0)
        length = min(max_tokens, -(-max(longest, 1) // trim_to_multiple) * trim_to_multiple)
    else:
        length = max_tokens
    input_ids = [[pad_id] * length for _ in rows]
    labels = [[IGNORE_INDEX] * length for _ in rows]
    images: list[torch.Tensor] = []
    pieces: list[TokenizedSample] = []  # anyres samples
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            end = start + len(sample)
            if end > length:
                raise ValueError(f"row {r} holds {end} tokens > max_tokens {max_tokens}")
            input_ids[r][start:end] = sample.input_ids
            labels[r][start:end] = sample.labels
            if sample.image_sizes is not None:
                pieces.append(sample)
            elif sample.video_frames:
                raise ValueError(f"sample {sample.key} has videos but no image_sizes: videos are for the anyres layout")
            else:
                images.extend(sample.images)
            start = end
    if pieces and images:
        raise ValueError("a Batch cannot mix samples of the fixed layout ([3, H, W] images) and the anyres layout "
                         "(views and sizes)")
    return Batch(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        pixels=anyres_inputs(pieces) if pieces else (torch.stack(images) if images else None),
        layout=SeqLayout.packed([[len(sample) for sample in row] for row in rows]),
        num_samples=sum(len(row) for row in rows),
        skipped=dict(skipped or {}),
    )


def anyres_inputs(samples: Sequence[TokenizedSample]) -> ImageInputs | None:
    """The images and videos of anyres samples, one after another, as one ImageInputs (None for
    none; videos without images: pixels of 0 views)."""
    views = [image for sample in samples for image in sample.images]
    videos = [frames for sample in samples for frames in sample.video_frames]
    if not views and not videos:
        return None
    pixels = torch.cat(views) if views else videos[0].new_zeros(0, *videos[0].shape[1:])
    return ImageInputs(pixels, [size for sample in samples for size in sample.image_sizes],
                       [image.shape[0] for image in views], torch.cat(videos) if videos else None,
                       [frames.shape[0] for frames in videos])


def padding_waste(batch: Batch) -> float:
    """Pad tokens / all tokens of a packed batch (0.0: every position holds a sample's token)."""
    total = batch.input_ids.numel()
    if batch.layout is None or not batch.layout.is_packed:
        raise ValueError("padding_waste needs a packed batch (layout with sample lengths)")
    return (total - batch.real_tokens()) / total if total else 0.0
