"""Exact mid-epoch resume of the data path: cut an epoch after any Batch, save the consumed position,
go on from it in a new dataset, and get exactly the Batches the uninterrupted epoch produced next
(same keys, same token ids, labels and pixels, same skip counts and sources), with bad samples,
several sources, shuffling, packing and 0 or 2 DataLoader workers."""

import hashlib
import io

import pytest
import torch
from webdataset import TarWriter

from multimodal.data import DataConfig, SourceConfig, build_dataset, build_loader
from multimodal.data.resume import DataPosition
from tests.multimodal.data.helpers import image_bytes, model_parts, write_shards

OPTIONS = {"max_tokens": 256, "rows_per_batch": 1, "shuffle_buffer": 12, "pack_buffer": 4,
           "max_skip_fraction": None}


@pytest.fixture
def parts(tokenizer):
    return model_parts(tokenizer)


@pytest.fixture
def sources(tmp_path):
    """Two sources; the first has a shard with bad samples among good ones."""
    captions, _ = write_shards(tmp_path / "a", num_samples=30, num_shards=3, name="cap")
    bad = tmp_path / "a" / "cap-bad.tar"
    with TarWriter(str(bad)) as writer:
        writer.write({"__key__": "bad_zero_byte", "png": b"", "txt": b"a caption"})
        writer.write({"__key__": "good_x1", "png": image_bytes((10, 20, 30)), "txt": b"a blue square"})
        writer.write({"__key__": "bad_no_caption", "png": image_bytes((1, 2, 3))})
        writer.write({"__key__": "good_x2", "png": image_bytes((40, 50, 60)), "txt": b"a red circle"})
    texts, _ = write_shards(tmp_path / "b", num_samples=16, num_shards=2, start=500, name="txt")
    return [SourceConfig("captions", captions + [str(bad)], 0.7), SourceConfig("text", texts, 0.3)]


def read(parts, sources, num_workers, plan=None, epoch=0, **options):
    dataset = build_dataset(DataConfig(sources=sources, **{**OPTIONS, **options}), parts.tokenizer, parts.transform,
                            parts.image_token_id, parts.num_image_tokens)
    dataset.set_epoch(epoch)
    dataset.resume_from(plan)
    return list(build_loader(dataset, num_workers, world_size=1))


def fingerprint(batch):
    digest = hashlib.sha1()
    for tensor in (batch.input_ids, batch.labels, batch.pixels):
        digest.update(tensor.numpy().tobytes())
    return batch.keys, batch.skipped, batch.sources, digest.hexdigest()


def resume_after(batches, cut):
    """The position a training loop that consumed the first `cut` Batches would save, through a
    checkpoint's round trip (torch.save, then torch.load with weights_only=True)."""
    position = DataPosition()
    for batch in batches[:cut]:
        position.consumed(batch.position)
    buffer = io.BytesIO()
    torch.save({"data_position": position.state_dict()}, buffer)
    buffer.seek(0)
    return DataPosition.from_state_dict(torch.load(buffer, weights_only=True)["data_position"]).plan()


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mode", ["once", "resampled", "unshuffled"])
def test_resume_after_any_batch_goes_on_exactly(parts, sources, mode, num_workers):
    options = {"once": {}, "resampled": {"resampled": True, "batches_per_epoch": 9},
               "unshuffled": {"shuffle_buffer": 0}}[mode]
    full = read(parts, sources, num_workers, epoch=1, **options)
    expected = [fingerprint(batch) for batch in full]
    assert len(full) >= 8
    assert any(batch.skipped for batch in full) or mode == "resampled"
    # Every cut in-process; with workers, cuts where each of the two readers is next, and the end.
    cuts = range(1, len(full) + 1) if num_workers == 0 else [1, 2, 3, len(full) // 2, len(full) - 1, len(full)]
    for cut in cuts:
        resumed = read(parts, sources, num_workers, plan=resume_after(full, cut), epoch=1, **options)
        assert [fingerprint(batch) for batch in resumed] == expected[cut:], f"cut after batch {cut}"


def test_a_second_resume_in_the_same_epoch(parts, sources):
    full = read(parts, sources, 2)
    first = read(parts, sources, 2, plan=resume_after(full, 3))
    second = read(parts, sources, 2, plan=resume_after(full[:3] + first, 6))
    assert [fingerprint(b) for b in second] == [fingerprint(b) for b in full[6:]]


def test_the_plan_holds_only_for_its_epoch(parts, sources):
    full = read(parts, sources, 0)
    plan = resume_after(full, 4)
    next_epoch = read(parts, sources, 0, epoch=1)
    dataset = build_dataset(DataConfig(sources=sources, **OPTIONS), parts.tokenizer, parts.transform,
                            parts.image_token_id, parts.num_image_tokens)
    dataset.resume_from(plan)
    assert [fingerprint(b) for b in build_loader(dataset, 0, world_size=1)] == [fingerprint(b) for b in full[4:]]
    dataset.set_epoch(1)
    assert [fingerprint(b) for b in build_loader(dataset, 0, world_size=1)] == [fingerprint(b) for b in next_epoch]


def test_other_ranks_or_workers_are_refused(parts, sources):
    plan = resume_after(read(parts, sources, 2), 3)
    dataset = build_dataset(DataConfig(sources=sources, **OPTIONS), parts.tokenizer, parts.transform,
                            parts.image_token_id, parts.num_image_tokens)
    dataset.resume_from(plan)
    with pytest.raises(ValueError, match="2 DataLoader workers, this run has 1 x 1"):
        build_loader(dataset, 1, world_size=1)


def test_a_position_saved_in_another_format_is_refused_when_the_checkpoint_loads(parts, sources):
    full = read(parts, sources, 0)
    position = DataPosition()
    position.consumed(full[0].position)
    saved = position.state_dict()
    reader_state = saved["states"]["0"]
    reader_state["shuffler"] = reader_state.pop("shuffle")  # as a data path of another version might write it
    with pytest.raises(ValueError, match="another version.*resume: false"):
        DataPosition.from_state_dict(saved)


def test_a_changed_shard_is_an_error_not_a_silent_skip(parts, sources, tmp_path):
    full = read(parts, sources, 0, shuffle_buffer=0)
    plan = resume_after(full, 2)
    for path in sources[0].shards + sources[1].shards:  # every shard now empty
        with TarWriter(path):
            pass
    with pytest.raises(RuntimeError, match="changed since the checkpoint"):
        read(parts, sources, 0, plan=plan, shuffle_buffer=0)
