"""Several sources mixed by weight: proportions, reproducibility, epochs, configuration."""

import math
from collections import Counter

import pytest

from multimodal.data import DataConfig, SourceConfig, build_dataset, build_loader
from tests.multimodal.data.helpers import model_parts, write_shards

WEIGHTS = {"captions": 0.6, "conversations": 0.3, "text": 0.1}
STARTS = {"captions": 0, "conversations": 1000, "text": 2000}  # keys s0000.., s1000.., s2000..


@pytest.fixture
def parts(tokenizer):
    return model_parts(tokenizer)


@pytest.fixture
def sources(tmp_path):
    """Three sources of 2 shards each; a sample's source is readable from its key."""
    configs = []
    for name, weight in WEIGHTS.items():
        paths, _ = write_shards(tmp_path / name, num_samples=40, num_shards=2, start=STARTS[name], name=name)
        configs.append(SourceConfig(name, paths, weight))
    return configs


def source_of(key: str) -> str:
    return next(name for name, start in sorted(STARTS.items(), key=lambda kv: -kv[1]) if int(key[1:]) >= start)


def read(parts, num_workers=0, epoch=0, **options):
    options = {"max_tokens": 256, "rows_per_batch": 4, "shuffle_buffer": 16, "pack_buffer": 8, **options}
    dataset = build_dataset(DataConfig(**options), parts.tokenizer, parts.transform,
                            parts.image_token_id, parts.num_image_tokens)
    dataset.set_epoch(epoch)
    return [(batch, batch.keys) for batch in build_loader(dataset, num_workers, world_size=1)]


def keys_of(batches):
    return [key for _, keys in batches for row in keys for key in row]


def test_resampled_mix_follows_the_weights(parts, sources):
    batches = read(parts, sources=sources, resampled=True, batches_per_epoch=100)
    keys = keys_of(batches)
    n = len(keys)
    counts = Counter(source_of(key) for key in keys)
    # Batch.sources reports the same counts as the keys say, batch by batch.
    for batch, batch_keys in batches:
        assert batch.sources == dict(Counter(source_of(k) for row in batch_keys for k in row))
    assert n >= 600
    for name, weight in WEIGHTS.items():
        # Each sample's source is a draw with probability weight: the count is binomial(n, weight),
        # standard error sqrt(w(1-w)/n) (~0.012 for 0.1 at n=600). 4 standard errors: a correct mixer
        # fails with probability < 1e-4 (and the seed is fixed, so never flaky); a mixer that ignored
        # the weights (1/3 each) would be off by >= 10 standard errors.
        tolerance = 4 * math.sqrt(weight * (1 - weight) / n)
        assert abs(counts[name] / n - weight) < tolerance, (name, counts[name] / n, weight, tolerance)


def test_mix_is_reproducible_per_epoch_and_worker(parts, sources):
    first = keys_of(read(parts, sources=sources, resampled=True, batches_per_epoch=6))
    assert keys_of(read(parts, sources=sources, resampled=True, batches_per_epoch=6)) == first
    assert keys_of(read(parts, sources=sources, resampled=True, batches_per_epoch=6, epoch=1)) != first
    assert keys_of(read(parts, sources=sources, resampled=True, batches_per_epoch=6, seed=1)) != first
    two_workers = keys_of(read(parts, num_workers=2, sources=sources, resampled=True, batches_per_epoch=6))
    assert two_workers == keys_of(read(parts, num_workers=2, sources=sources, resampled=True, batches_per_epoch=6))


def test_default_mode_reads_every_sample_of_every_source_once(parts, sources):
    batches = read(parts, num_workers=2, sources=sources)
    keys = keys_of(batches)
    assert len(keys) == len(set(keys)) == 120
    assert Counter(source_of(k) for k in keys) == {name: 40 for name in WEIGHTS}
    # While all three sources last, the draws follow the weights: the text source (0.1) is far
    # from used up when the captions (0.6) are, so the first samples are mostly captions.
    early = Counter(source_of(k) for k in keys[:30])
    assert early["captions"] > early["text"] * 2, early


def test_single_source_config_is_unchanged(parts, tmp_path):
    paths, expected = write_shards(tmp_path, num_samples=12, num_shards=2)
    batches = read(parts, shards=paths)
    assert sorted(keys_of(batches)) == sorted(expected)
    assert sum(batch.sources["shards"] for batch, _ in batches) == 12
    assert DataConfig(paths).source_list() == [SourceConfig("shards", paths, 1.0)]


def test_source_config_checks(tmp_path):
    paths, _ = write_shards(tmp_path, num_samples=2, num_shards=1)
    from_yaml = DataConfig(sources=[{"name": "a", "shards": paths, "weight": 2}, {"name": "b", "shards": paths}])
    assert from_yaml.source_list() == [SourceConfig("a", paths, 2), SourceConfig("b", paths, 1.0)]
    with pytest.raises(ValueError, match="either shards or sources"):
        DataConfig(paths, sources=[SourceConfig("a", paths)])
    with pytest.raises(ValueError, match="distinct"):
        DataConfig(sources=[SourceConfig("a", paths), SourceConfig("a", paths)])
    with pytest.raises(ValueError, match="weight"):
        DataConfig(sources=[SourceConfig("a", paths, 0.0)])
    with pytest.raises(ValueError, match="shards is empty"):
        DataConfig()
    with pytest.raises(ValueError, match="batches_per_epoch"):
        DataConfig(paths, batches_per_epoch=0)
    with pytest.raises(ValueError, match="max_skip_fraction"):
        DataConfig(paths, max_skip_fraction=1.5)
