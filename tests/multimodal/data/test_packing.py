import random

import pytest
import torch

from lm.loss import IGNORE_INDEX
from multimodal.data import make_batch, pack_samples, padding_waste
from multimodal.data.packing import group_rows
from multimodal.data.samples import TokenizedSample


def first_fit_reference(lengths, capacity):
    """Textbook offline first-fit: bins in opening order, each item into the first that fits."""
    bins, free = [], []
    for item, n in enumerate(lengths):
        for b in range(len(bins)):
            if free[b] >= n:
                bins[b].append(item)
                free[b] -= n
                break
        else:
            bins.append([item])
            free.append(capacity - n)
    return bins


def random_lengths(rng, count, capacity):
    shape = rng.choice(["uniform", "small", "large", "mixed"])
    if shape == "uniform":
        return [rng.randint(1, capacity) for _ in range(count)]
    if shape == "small":
        return [rng.randint(1, max(1, capacity // 5)) for _ in range(count)]
    if shape == "large":
        return [rng.randint(max(1, capacity // 2), capacity) for _ in range(count)]
    return [rng.choice([1, capacity, max(1, capacity // 3), rng.randint(1, capacity)]) for _ in range(count)]


def test_packing_never_splits_overlaps_loses_or_duplicates():
    rng = random.Random(0)
    for trial in range(400):
        capacity = rng.randint(1, 64)
        lengths = random_lengths(rng, rng.randint(0, 60), capacity)
        buffer_size = rng.randint(1, 20)
        consumed = []

        def source():
            for item in range(len(lengths)):
                consumed.append(item)
                yield item

        emitted, held_max = [], 0
        for row in pack_samples(source(), capacity, buffer_size, length=lambda i: lengths[i]):
            held_max = max(held_max, len(consumed) - len(emitted) - len(row))
            emitted.extend(row)
            assert row, "empty row"
            assert sum(lengths[i] for i in row) <= capacity
            assert row == sorted(row), "a row keeps its samples in arrival order"
        assert sorted(emitted) == list(range(len(lengths))), f"trial {trial}: lost or duplicated samples"
        # Between two samples the packer holds at most buffer_size of them.
        assert held_max <= buffer_size


def test_unbounded_packer_is_first_fit():
    rng = random.Random(1)
    for _ in range(300):
        capacity = rng.randint(1, 50)
        lengths = random_lengths(rng, rng.randint(1, 50), capacity)
        rows = list(pack_samples(range(len(lengths)), capacity, buffer_size=10**9, length=lambda i: lengths[i]))
        # Full rows leave early, so only the set of rows (not their order) is comparable.
        assert sorted(rows) == sorted(first_fit_reference(lengths, capacity))


def test_bounded_packer_places_each_sample_in_the_oldest_open_row_that_fits():
    # A row that received samples both before and after `item` was certainly open when `item`
    # arrived; if it is older than the row `item` went to, it must have lacked room for `item`.
    rng = random.Random(2)
    for _ in range(200):
        capacity = rng.randint(4, 40)
        lengths = random_lengths(rng, 60, capacity)
        rows = list(pack_samples(range(len(lengths)), capacity, buffer_size=rng.randint(1, 8),
                                 length=lambda i: lengths[i]))
        opened = {item: row[0] for row in rows for item in row}  # rows are named by their first sample
        for item, n in enumerate(lengths):
            for row in rows:
                if row[0] < opened[item] and row[0] < item < row[-1]:
                    free = capacity - sum(lengths[i] for i in row if i < item)
                    assert free < n, f"sample {item} ({n} tokens) skipped an older open row with {free} free"


def test_packer_rejects_samples_longer_than_a_row():
    with pytest.raises(ValueError, match="cannot go into rows"):
        list(pack_samples([5, 11], max_tokens=10, buffer_size=4, length=lambda n: n))


def test_group_rows():
    assert list(group_rows(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]


def sample(key, ids, labels=None, images=0):
    return TokenizedSample(key, list(ids), list(labels if labels is not None else ids),
                           [torch.full((3, 2, 2), float(len(key) + i)) for i in range(images)])


def test_make_batch_places_tokens_pads_and_orders_images():
    a = sample("a", [1, 7, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8], images=1)
    b = sample("bb", [1, 9], images=2)
    c = sample("ccc", [1, 5, 5])
    batch = make_batch([[a, b], [c]], max_tokens=8, pad_id=3, skipped={"too_long": 2})
    assert batch.input_ids.tolist() == [[1, 7, 7, 8, 1, 9, 3, 3], [1, 5, 5, 3, 3, 3, 3, 3]]
    assert batch.labels.tolist() == [[-100, -100, -100, 8, 1, 9, -100, -100], [1, 5, 5] + [-100] * 5]
    assert batch.layout.seq_lens == ((4, 2), (3,))
    assert [img[0, 0, 0].item() for img in batch.pixels] == [1.0, 2.0, 3.0]  # a's, then b's two
    assert batch.num_samples == 3 and batch.skipped == {"too_long": 2}
    assert padding_waste(batch) == pytest.approx(7 / 16)
    assert make_batch([[c]], max_tokens=3, pad_id=3).pixels is None


def test_padding_waste_matches_a_count_of_pad_positions():
    rng = random.Random(3)
    for _ in range(50):
        max_tokens = rng.randint(4, 40)
        items = [sample(f"k{i}", [1] * rng.randint(1, max_tokens)) for i in range(rng.randint(1, 30))]
        rows = list(pack_samples(items, max_tokens, buffer_size=6))
        batch = make_batch(rows, max_tokens, pad_id=3)
        pads = int((batch.labels == IGNORE_INDEX).sum())  # every real token here carries a label
        assert padding_waste(batch) == pytest.approx(pads / batch.input_ids.numel())


def test_trimmed_rows_are_the_fixed_rows_cut_after_the_longest_row_rounded_up():
    rng = random.Random(5)
    for _ in range(60):
        max_tokens, multiple = rng.randint(4, 90), rng.choice([1, 8, 64])
        items = [sample(f"k{i}", [rng.randint(4, 99) for _ in range(rng.randint(1, max_tokens))])
                 for i in range(rng.randint(1, 12))]
        for rows in group_rows(pack_samples(items, max_tokens, buffer_size=4), rng.randint(1, 3)):
            fixed = make_batch(rows, max_tokens, pad_id=3)
            trimmed = make_batch(rows, max_tokens, pad_id=3, trim_to_multiple=multiple)
            longest = max(sum(len(s) for s in row) for row in rows)
            length = min(max_tokens, -(-longest // multiple) * multiple)
            assert trimmed.input_ids.shape == (len(rows), length)
            assert torch.equal(trimmed.input_ids, fixed.input_ids[:, :length])
            assert torch.equal(trimmed.labels, fixed.labels[:, :length])
            assert (fixed.input_ids[:, length:] == 3).all() and (fixed.labels[:, length:] == IGNORE_INDEX).all()
            assert trimmed.layout.seq_lens == fixed.layout.seq_lens and trimmed.real_tokens() == fixed.real_tokens()
            assert padding_waste(trimmed) <= padding_waste(fixed)
    with pytest.raises(ValueError, match="trim_to_multiple"):
        make_batch([[sample("a", [1])]], 8, pad_id=3, trim_to_multiple=0)
