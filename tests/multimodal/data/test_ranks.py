"""Ranks and workers: every sample once per epoch across 2 ranks of a gloo process group x 2 workers, shard counts
checked before training, resampled epochs of a fixed length, and the skip budget."""

import json
import os
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp
from webdataset import TarWriter

from lm.tokenizer import load_tokenizer
from multimodal.data import DataConfig, SkipBudgetExceeded, SourceConfig, build_dataset, build_loader
from tests.multimodal.data.helpers import make_sample, model_parts, write_shards

OPTIONS = {"max_tokens": 256, "rows_per_batch": 2, "shuffle_buffer": 8, "pack_buffer": 4}


@pytest.fixture
def parts(tokenizer):
    return model_parts(tokenizer)


def keys_of(batches):
    return [key for batch in batches for row in batch.keys for key in row]


def dataset(parts, **options):
    return build_dataset(DataConfig(**{**OPTIONS, **options}), parts.tokenizer, parts.transform,
                         parts.image_token_id, parts.num_image_tokens)


def rank_main(rank: int, world_size: int, root: str, sources: list[dict]) -> None:
    """One rank of a real gloo process group (as DDP on CPU runs it): read one epoch in each mode
    with 2 DataLoader workers, and gather what every rank saw through the group."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                                         world_size=world_size)
    try:
        parts = model_parts(load_tokenizer(os.path.join(root, "tokenizer")))
        # One batch in this process first: imports done here once are inherited by the forked workers.
        next(iter(dataset(parts, sources=[SourceConfig(**s) for s in sources])))
        seen = {}
        for mode, options in (("once", {}), ("resampled", {"resampled": True, "batches_per_epoch": 5})):
            data = dataset(parts, sources=[SourceConfig(**s) for s in sources], **options)
            data.set_epoch(1)
            batches = list(build_loader(data, num_workers=2))  # rank and world size from the group
            seen[mode] = {"keys": keys_of(batches), "batches": len(batches)}
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, seen)
        if rank == 0:
            with open(os.path.join(root, "ranks.json"), "w") as file:
                json.dump(everyone, file)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_two_workers_see_every_sample_exactly_once(tokenizer, tmp_path):
    captions, expected = write_shards(tmp_path / "a", num_samples=40, num_shards=5, name="cap")
    texts, more = write_shards(tmp_path / "b", num_samples=24, num_shards=4, start=500, name="txt")
    expected.update(more)
    tokenizer.save(tmp_path / "tokenizer")
    sources = [{"name": "captions", "shards": captions, "weight": 0.7}, {"name": "text", "shards": texts, "weight": 0.3}]
    mp.spawn(rank_main, args=(2, str(tmp_path), sources), nprocs=2, join=True)
    assert "RANK" not in os.environ  # the ranks learn their place from the process group alone
    seen = json.loads((tmp_path / "ranks.json").read_text())
    union = seen[0]["once"]["keys"] + seen[1]["once"]["keys"]
    assert len(union) == len(set(union)), "a sample was read twice"
    assert set(union) == set(expected), "a sample was lost"
    assert seen[0]["once"]["keys"] and seen[1]["once"]["keys"]
    # Resampled: the same fixed number of batches on every rank (what DDP needs), different data.
    assert [s["resampled"]["batches"] for s in seen] == [5, 5]
    assert seen[0]["resampled"]["keys"] != seen[1]["resampled"]["keys"]


def test_fewer_shards_than_readers_is_an_error_before_reading(parts, tmp_path, monkeypatch):
    paths, _ = write_shards(tmp_path, num_samples=12, num_shards=3)
    with pytest.raises(ValueError, match=r"3 shards for 2 ranks x 2 workers = 4 readers"):
        build_loader(dataset(parts, shards=paths), num_workers=2, world_size=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it: build_loader finds the world size itself
    with pytest.raises(ValueError, match="source 'shards' has 3 shards"):
        build_loader(dataset(parts, shards=paths), num_workers=0)
    monkeypatch.setenv("WORLD_SIZE", "3")
    build_loader(dataset(parts, shards=paths), num_workers=0)  # 3 readers, 3 shards: fine
    # Each source counts on its own: a one-shard source cannot feed two workers.
    small = dataset(parts, sources=[SourceConfig("big", paths), SourceConfig("small", paths[:1])])
    with pytest.raises(ValueError, match="source 'small' has 1 shards"):
        build_loader(small, num_workers=2, world_size=1)


def test_data_module_refuses_too_few_shards_before_training(tokenizer, tmp_path):
    # Imported here: the spawned ranks above import this module and need none of Lightning.
    import lightning as L

    from multimodal.training import ModelSpec, ShardDataModule, StageConfig, VLMModule
    from tests.multimodal.tiny import TINY_CLIP

    tokenizer.save(tmp_path / "tokenizer")
    paths, _ = write_shards(tmp_path / "shards", num_samples=8, num_shards=1)
    spec = ModelSpec(tokenizer=str(tmp_path / "tokenizer"), decoder="tiny", decoder_options={"attention": "sdpa"},
                     encoder={"model_name": TINY_CLIP}, projector={"kind": "mlp", "depth": 2})
    module = VLMModule(spec, StageConfig(train=["projector"], lr={"projector": 1e-3}))
    steps = []

    class Steps(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Steps()])
    with pytest.raises(ValueError, match="1 shards for 1 ranks x 2 workers"):
        trainer.fit(module, datamodule=ShardDataModule(DataConfig(paths, max_tokens=160), num_workers=2))
    assert steps == []


def test_resampled_epochs_have_a_fixed_length(parts, tmp_path):
    paths, expected = write_shards(tmp_path, num_samples=10, num_shards=1)
    data = dataset(parts, shards=paths, resampled=True, batches_per_epoch=7)
    with pytest.warns(UserWarning, match="resampled mode readers will often read the same shards"):
        loader = build_loader(data, num_workers=2, world_size=1)
    for epoch in range(2):
        data.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 7  # 4 + 3 from the two workers, far more than one pass over 10 samples
        keys = keys_of(batches)
        assert set(keys) <= set(expected) and len(keys) > 10
    # The same cap in the default mode ends the epoch early.
    assert len(list(build_loader(dataset(parts, shards=paths, batches_per_epoch=2), 0, world_size=1))) == 2


def write_bad_shard(path, count):
    with TarWriter(str(path)) as writer:
        for i in range(count):
            writer.write({"__key__": f"x{i:03d}", "png": b"garbage", "txt": b"caption"})


@pytest.mark.parametrize("num_workers", [0, 1])
def test_skip_budget_stops_the_run_naming_the_worst_shard(parts, tmp_path, num_workers):
    good, _ = write_shards(tmp_path, num_samples=40, num_shards=2)
    write_bad_shard(tmp_path / "broken.tar", 20)
    shards = [good[0], str(tmp_path / "broken.tar"), good[1]]
    data = dataset(parts, shards=shards, shuffle_buffer=0, max_skip_fraction=0.2, skip_budget_min_samples=30)
    with pytest.raises(SkipBudgetExceeded, match=r"worst shards: \S*broken.tar \(\d+ skipped, 0 read\)"):
        list(build_loader(data, num_workers, world_size=1))


def test_skips_under_the_budget_do_not_stop(parts, tmp_path):
    good, expected = write_shards(tmp_path, num_samples=40, num_shards=1)
    write_bad_shard(tmp_path / "some-bad.tar", 3)
    data = dataset(parts, shards=[*good, str(tmp_path / "some-bad.tar")], max_skip_fraction=0.1,
                   skip_budget_min_samples=30)
    batches = list(build_loader(data, 0, world_size=1))
    assert sorted(keys_of(batches)) == sorted(expected)
    assert sum((Counter(batch.skipped) for batch in batches), Counter()) == {"image_undecodable": 3}
