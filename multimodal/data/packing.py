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

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch

from lm.attention import SeqLayout
from lm.loss import IGNORE_INDEX
from multimodal.batch import Batch
from multimodal.data.samples import TokenizedSample

Item = TypeVar("Item")


def pack_samples(
    samples: Iterable[Item], max_tokens: int, buffer_size: int, length: Callable[[Item], int] = len
) -> Iterator[list[Item]]:
    """Rows of samples, first-fit: each sample goes into the oldest open row with room for it, or
    opens a new row. A row is emitted when it is exactly full, when the open rows hold more than
    `buffer_size` samples (the oldest row goes), and at the end (all rows, oldest first).

    Samples are never split or reordered within a row; each one is longer than 0 and at most
    `max_tokens` (longer ones must be filtered out before: ValueError).
    """
    if max_tokens <= 0 or buffer_size <= 0:
        raise ValueError(f"max_tokens and buffer_size must be positive, got {max_tokens} and {buffer_size}")
    rows: list[list[Item]] = []  # open rows, oldest first
    room: list[int] = []         # free tokens in each open row
    held = 0
    for sample in samples:
        n = length(sample)
        if not 0 < n <= max_tokens:
            raise ValueError(f"a sample of {n} tokens cannot go into rows of {max_tokens}")
        index = next((i for i, free in enumerate(room) if free >= n), len(rows))
        if index == len(rows):
            rows.append([])
            room.append(max_tokens)
        rows[index].append(sample)
        room[index] -= n
        held += 1
        if room[index] == 0:
            held -= len(rows[index])
            room.pop(index)
            yield rows.pop(index)
        while held > buffer_size:
            held -= len(rows[0])
            room.pop(0)
            yield rows.pop(0)
    yield from rows


def group_rows(rows: Iterable[Item], rows_per_batch: int) -> Iterator[list[Item]]:
    """Consecutive groups of `rows_per_batch` (the last one may be shorter)."""
    group: list[Item] = []
    for row in rows:
        group.append(row)
        if len(group) == rows_per_batch:
            yield group
            group = []
    if group:
        yield group


def make_batch(rows: Sequence[Sequence[TokenizedSample]], max_tokens: int, pad_id: int,
               skipped: dict[str, int] | None = None) -> Batch:
    """A Batch of packed rows, each padded to `max_tokens`.

    Every row has the same fixed length, so the memory a step needs is known from the first step
    (no late out-of-memory on an unlucky batch) and shapes stay static for compiled kernels; the
    cost is the padding, which `padding_waste` measures. The images are concatenated in row-major
    placeholder order, the order VisionLanguageModel splices them in.
    """
    input_ids = [[pad_id] * max_tokens for _ in rows]
    labels = [[IGNORE_INDEX] * max_tokens for _ in rows]
    images: list[torch.Tensor] = []
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            end = start + len(sample)
            if end > max_tokens:
                raise ValueError(f"row {r} holds {end} tokens > max_tokens {max_tokens}")
            input_ids[r][start:end] = sample.input_ids
            labels[r][start:end] = sample.labels
            images.extend(sample.images)
            start = end
    return Batch(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        pixels=torch.stack(images) if images else None,
        layout=SeqLayout.packed([[len(sample) for sample in row] for row in rows]),
        num_samples=sum(len(row) for row in rows),
        skipped=dict(skipped or {}),
    )


def padding_waste(batch: Batch) -> float:
    """Pad tokens / all tokens of a packed batch (0.0: every position holds a sample's token)."""
    total = batch.input_ids.numel()
    if batch.layout is None or not batch.layout.is_packed:
        raise ValueError("padding_waste needs a packed batch (layout with sample lengths)")
    used = sum(sum(row) for row in batch.layout.seq_lens)
    return (total - used) / total if total else 0.0
