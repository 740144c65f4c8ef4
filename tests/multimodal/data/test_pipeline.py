import io
import json
import logging
import os
import tarfile
from collections import Counter

import pytest
from webdataset import TarWriter

from multimodal.data import DataConfig, build_dataset, build_loader, padding_waste
from tests.multimodal.data.helpers import (
    check_batch,
    colour,
    image_bytes,
    make_sample,
    model_parts,
    write_shards,
)


@pytest.fixture
def parts(tokenizer):
    return model_parts(tokenizer)


def read_epoch(parts, shards, num_workers=0, epoch=0, **options):
    """All (batch, keys) of one epoch through a DataLoader."""
    options = {"max_tokens": 256, "rows_per_batch": 2, "shuffle_buffer": 16, "pack_buffer": 8, **options}
    dataset = build_dataset(DataConfig(shards, **options), parts.tokenizer, parts.transform,
                            parts.image_token_id, parts.num_image_tokens)
    dataset.set_epoch(epoch)
    return [(batch, batch.keys) for batch in build_loader(dataset, num_workers)]


def keys_of(batches):
    return [key for _, keys in batches for row in keys for key in row]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_every_sample_once_per_epoch_with_images_next_to_their_text(parts, tmp_path, num_workers):
    _, expected = write_shards(tmp_path, num_samples=48, num_shards=4)
    batches = read_epoch(parts, str(tmp_path / "train-{000..003}.tar"), num_workers)
    keys = keys_of(batches)
    assert sorted(keys) == sorted(expected), "a sample was lost or read twice"
    for batch, batch_keys in batches:
        check_batch(batch, batch_keys, expected, parts)
        assert batch.num_samples == sum(len(row) for row in batch_keys)
        assert batch.skipped == {}
        assert batch.input_ids.shape[1] == 256 and 0 <= padding_waste(batch) < 1


def test_ranks_and_workers_partition_the_shards(parts, tmp_path, monkeypatch):
    _, expected = write_shards(tmp_path, num_samples=40, num_shards=5)
    per_rank = []
    for rank in range(2):
        # webdataset reads the rank from these variables (as torchrun sets them) before torch.distributed.
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(keys_of(read_epoch(parts, str(tmp_path / "train-{000..004}.tar"), num_workers=2)))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(expected)


def test_shard_specs_lists_joined_patterns_and_pipes(parts, tmp_path):
    paths, expected = write_shards(tmp_path, num_samples=12, num_shards=3)
    specs = [
        paths,
        f"{paths[0]}::{tmp_path}/train-{{001..002}}.tar",
        [paths[0], f"pipe:cat {paths[1]}", f"file:{paths[2]}"],
    ]
    for spec in specs:
        assert sorted(keys_of(read_epoch(parts, spec))) == sorted(expected), spec
    with pytest.raises(FileNotFoundError, match="do not exist"):
        read_epoch(parts, str(tmp_path / "train-{000..009}.tar"))


def test_epochs_reshuffle_reproducibly_and_validation_keeps_order(parts, tmp_path):
    paths, expected = write_shards(tmp_path, num_samples=40, num_shards=4)
    first = keys_of(read_epoch(parts, paths, epoch=0))
    assert keys_of(read_epoch(parts, paths, epoch=0)) == first
    assert keys_of(read_epoch(parts, paths, epoch=1)) != first
    ordered = keys_of(read_epoch(parts, paths, shuffle_buffer=0, pack_buffer=1, rows_per_batch=1))
    assert ordered == sorted(expected)  # tar order, shard order, one sample a row


def bad_samples(start: int) -> list[tuple[dict, str]]:
    """(files, reason) of samples that must be skipped; keys b{start+i}."""
    conversation = {"conversations": [{"from": "human", "value": "<image> <image>\nCompare."},
                                      {"from": "gpt", "value": "Same."}]}
    cases = [
        ({"png": image_bytes(colour(1))[:50], "txt": b"truncated image"}, "image_undecodable"),
        ({"png": image_bytes(colour(2))}, "missing_text"),
        ({"png": image_bytes(colour(3)), "json": b'{"conversations": [', "txt": b"x"}, "invalid_json"),
        ({"png": image_bytes(colour(4)), "json": json.dumps(conversation).encode()}, "placeholder_mismatch"),
        ({"txt": " ".join(["palabra"] * 400).encode()}, "too_long"),
        ({"png": image_bytes(colour(5)), "txt": b"\xc3\x28 bad utf-8"}, "not_utf8"),
        ({"png": image_bytes(colour(6)), "txt": b"\n"}, "empty_text"),
        ({"json": b'{"messages": [{"role": "robot", "content": "x"}]}'}, "bad_conversation"),
    ]
    return [({"__key__": f"b{start + i:04d}", **files}, reason) for i, (files, reason) in enumerate(cases)]


def test_bad_samples_are_skipped_and_counted_while_neighbours_arrive_intact(parts, tmp_path):
    expected, reasons, paths = {}, Counter(), []
    for shard in range(2):
        path = tmp_path / f"mixed-{shard}.tar"
        bad = bad_samples(100 * shard)
        with TarWriter(str(path)) as writer:
            for i in range(16):  # good and bad interleaved, so a skip sits between good neighbours
                files, exp = make_sample(shard * 16 + i)
                writer.write(files)
                expected[exp.key] = exp
                if i < len(bad):
                    writer.write(bad[i][0])
                    reasons[bad[i][1]] += 1
        paths.append(str(path))
    batches = read_epoch(parts, paths, num_workers=2)
    assert sorted(keys_of(batches)) == sorted(expected)
    for batch, keys in batches:
        check_batch(batch, keys, expected, parts)
    skipped = Counter()
    for batch, _ in batches:
        skipped.update(batch.skipped)
    assert skipped == reasons


def write_raw_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_broken_tars(parts, tmp_path):
    good = [(f"g{i}.{suffix}", data) for i in range(3) for suffix, data in
            (("png", image_bytes(colour(i))), ("txt", f"caption g{i}".encode()))]
    # A key whose files are not contiguous, and a file name twice in one sample.
    write_raw_tar(tmp_path / "split.tar", [("s.png", image_bytes(colour(7))), *good[:2], ("s.txt", b"other text"),
                                           ("d.png", image_bytes(colour(8))), ("d.txt", b"one"), ("d.txt", b"two"),
                                           *good[2:]])
    # A shard cut in the middle of its fourth sample's image: what came before arrives, that sample does not.
    full = [(f"t{i}.{suffix}", data) for i in range(6) for suffix, data in
            (("txt", f"caption t{i}".encode()), ("png", image_bytes(colour(20 + i)) + bytes(2000)))]
    write_raw_tar(tmp_path / "full.tar", full)
    blob = (tmp_path / "full.tar").read_bytes()
    cut = blob.index(b"caption t3") + 1200  # inside t3's png
    (tmp_path / "cut.tar").write_bytes(blob[:cut])
    os.remove(tmp_path / "full.tar")

    shards = [str(tmp_path / "split.tar"), str(tmp_path / "cut.tar"), f"pipe:cat {tmp_path}/none.tar"]
    batches = read_epoch(parts, shards, shuffle_buffer=0, pack_buffer=1, rows_per_batch=1)
    keys = keys_of(batches)
    skipped = Counter()
    for batch, _ in batches:
        skipped.update(batch.skipped)
    # "s": first group (image only) is missing_text, the second (text only) a split sample;
    # "d": duplicate txt. The cut shard and the failing command: one shard_error each.
    assert skipped == {"missing_text": 1, "split_sample": 1, "duplicate_file": 1, "shard_error": 2}
    assert keys == ["g0", "g1", "g2", "t0", "t1", "t2"]


def test_skip_log_is_rate_limited(parts, tmp_path, caplog):
    with TarWriter(str(tmp_path / "bad.tar")) as writer:
        for i in range(200):
            writer.write({"__key__": f"x{i:03d}", "png": b"garbage", "txt": b"caption"})
        writer.write(make_sample(0)[0])
    with caplog.at_level(logging.WARNING, logger="multimodal.data"):
        batches = read_epoch(parts, str(tmp_path / "bad.tar"))
    assert sum(batch.skipped.get("image_undecodable", 0) for batch, _ in batches) == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "multimodal.data"]
    assert 1 <= len(messages) <= 6
    assert "bad.tar key x" in messages[0] and "image_undecodable" in messages[0]


def test_config_and_build_checks(parts, tmp_path):
    paths, _ = write_shards(tmp_path, num_samples=4, num_shards=1)
    with pytest.raises(ValueError, match="max_tokens"):
        build_dataset(DataConfig(paths, max_tokens=16), parts.tokenizer, parts.transform,
                      parts.image_token_id, parts.num_image_tokens)
    with pytest.raises(ValueError, match="pad_to_square"):
        build_dataset(DataConfig(paths, pad_to_square=True), parts.tokenizer, lambda image: image,
                      parts.image_token_id, parts.num_image_tokens)
    with pytest.raises(ValueError, match="default_language"):
        DataConfig(paths, default_language="ja")  # not one of Salamandra's 35 languages
    assert DataConfig(paths, default_language="fr").default_language == "fr"
    with pytest.raises(ValueError, match="rows_per_batch"):
        DataConfig(paths, rows_per_batch=0)
    dataset = build_dataset(DataConfig(paths, pad_to_square=True), parts.tokenizer, parts.transform,
                            parts.image_token_id, parts.num_image_tokens)
    assert dataset.settings.image_transform.pad_to_square
    batch = next(iter(build_loader(dataset, 0)))
    assert type(batch).__name__ == "Batch" and batch.num_samples == 4
