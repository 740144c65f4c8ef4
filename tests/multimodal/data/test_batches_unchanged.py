"""A regression fixture for the data path: the Batches of a fixed set of shards, under several
settings, must stay exactly what they were when fixtures/batch_hashes.json was written.

This guards refactors of multimodal/data (which must not change a single Batch) against a record
made by the code before them. Each setting reads shards this test writes itself (two sources with
weights, bad samples, several image formats and sizes) and hashes every Batch: token ids, labels,
pixels, layout (sample lengths per row), keys, skip counts, source counts and sample count.
Settings: two sources mixed by weight with shuffling and packing on 0 and 2 DataLoader workers,
resampled mode (0 and 2 workers), one source read unshuffled (a brace pattern, pad_to_square,
another default language), one source shuffled over 2 workers with 3 rows per Batch, and resumes
from mid-epoch positions (through a checkpoint's torch.save/torch.load round trip).

Portability: the pixels are hashed as the float32 bytes the data path produces. They are exact on
every CPU: Pillow decodes and resizes 8-bit images in integer arithmetic, and the transform's float
work (div by 255, sub mean, div std) is elementwise IEEE arithmetic, correctly rounded whatever
vector unit torch picks (checked under ATEN_CPU_CAPABILITY=default, avx2 and avx512). The
tokenizer is built here from a fixed character vocabulary rather than trained, so the ids do not
depend on the tokenizers library's BPE trainer either.

Regenerate (only when a change of Batches is intended), running the whole file:
    SALAMANDRA_REGEN_BATCH_HASHES=1 python -m pytest tests/multimodal/data/test_batches_unchanged.py
The variable may instead name the JSON file to write. To record another commit's Batches, check it
out in a worktree, copy this file into it and run it there with the variable set to the fixture's
absolute path (the fixture was first recorded that way from commit 4e1801c, before the data path
was split into modules).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import string
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from webdataset import TarWriter

from encoders.transforms import image_transform
from lm.tokenizer import BYTE_TOKENS, CHATML_TEMPLATE, SPECIAL_IDS, SPECIAL_TOKENS, Tokenizer
from multimodal.data import DataConfig, SourceConfig, build_dataset, build_loader
from tests.multimodal.data.helpers import image_bytes, write_shards
# In test_resume.py at 4e1801c too, so this file still runs when copied into that commit.
from tests.multimodal.data.test_resume import resume_after

FIXTURE = Path(__file__).parent / "fixtures" / "batch_hashes.json"
REGEN = os.environ.get("SALAMANDRA_REGEN_BATCH_HASHES")
NUM_IMAGE_TOKENS = 16
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def fixed_tokenizer() -> Tokenizer:
    """A Salamandra-shaped tokenizer with a fixed vocabulary (special tokens, byte fallback, one
    piece per ASCII letter, digit and punctuation mark, and no merges): the same ids everywhere."""
    pieces = [*SPECIAL_TOKENS, *BYTE_TOKENS, "▁", *string.ascii_letters, *string.digits, *string.punctuation]
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS[SPECIAL_IDS.unk],
                                       byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(backend, chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, object]:
    """Source "mixed" (every sample kind of helpers.make_sample, plus a shard with bad samples and
    images that need resizing) and source "text" (from index 500 on)."""
    root = tmp_path_factory.mktemp("unchanged")
    mixed, _ = write_shards(root / "a", num_samples=120, num_shards=4, name="mixed")
    odd = root / "a" / "mixed-odd.tar"
    with TarWriter(str(odd)) as writer:
        writer.write({"__key__": "bad_zero_byte", "png": b"", "txt": b"a caption"})
        writer.write({"__key__": "wide", "png": _solid_image((40, 24), (200, 30, 90)), "txt": b"a wide one"})
        writer.write({"__key__": "bad_no_text", "png": image_bytes((1, 2, 3))})
        writer.write({"__key__": "tall", "jpg": _solid_image((20, 50), (15, 160, 240), "JPEG"), "txt": b"a tall one"})
        writer.write({"__key__": "bad_json", "json": b"{not json"})
        writer.write({"__key__": "big", "webp": _solid_image((64, 64), (90, 90, 10), "WEBP"), "txt": b"a big one"})
    text, _ = write_shards(root / "b", num_samples=48, num_shards=2, start=500, name="text")
    return {"mixed": mixed + [str(odd)], "text": text,
            "pattern": str(root / "a" / "mixed-{000..003}.tar") + "::" + str(odd)}


def _solid_image(size: tuple[int, int], rgb: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


BASE = {"max_tokens": 320, "rows_per_batch": 2, "shuffle_buffer": 12, "pack_buffer": 4, "max_skip_fraction": None}

# name: (data: "mix" (both sources, weights 0.7 and 0.3), or "pattern" / "mixed" (source "mixed" alone,
# as a brace pattern joined by "::" / as a list), DataConfig options, DataLoader workers, epoch, and
# None or the number of Batches after which a checkpoint is taken and the epoch resumed from it)
SETTINGS = {
    "mix_shuffled_w0": ("mix", {}, 0, 0, None),
    "mix_shuffled_w2_epoch1": ("mix", {}, 2, 1, None),
    "mix_seed7_rows1_w0": ("mix", {"seed": 7, "rows_per_batch": 1, "pack_buffer": 2}, 0, 0, None),
    "resampled_w0_epoch2": ("mix", {"resampled": True, "batches_per_epoch": 30}, 0, 2, None),
    "resampled_w2": ("mix", {"resampled": True, "batches_per_epoch": 31}, 2, 0, None),
    "one_source_unshuffled_w0": ("pattern", {"shuffle_buffer": 0, "rows_per_batch": 1, "pack_buffer": 8,
                                             "pad_to_square": True, "default_language": "es"}, 0, 0, None),
    "one_source_shuffled_w2": ("mixed", {"rows_per_batch": 3, "shuffle_buffer": 30}, 2, 0, None),
    "resume_mix_shuffled_w0_after_5": ("mix", {}, 0, 0, 5),
    "resume_mix_shuffled_w2_epoch1_after_7": ("mix", {}, 2, 1, 7),
    "resume_resampled_w2_after_12": ("mix", {"resampled": True, "batches_per_epoch": 31}, 2, 0, 12),
    "resume_unshuffled_w0_after_9": ("pattern", {"shuffle_buffer": 0, "rows_per_batch": 1, "pack_buffer": 8,
                                                 "pad_to_square": True, "default_language": "es"}, 0, 0, 9),
}


def read(shards, data: str, options: dict, num_workers: int, epoch: int, plan=None) -> list:
    if data == "mix":
        where = {"sources": [SourceConfig("mixed", shards["mixed"], 0.7), SourceConfig("text", shards["text"], 0.3)]}
    else:
        where = {"shards": shards[data]}
    tokenizer = fixed_tokenizer()
    transform = image_transform(32, CLIP_MEAN, CLIP_STD, resize_mode="shortest", interpolation="bicubic")
    dataset = build_dataset(DataConfig(**where, **{**BASE, **options}), tokenizer, transform,
                            tokenizer.reserved_token_id(1), NUM_IMAGE_TOKENS)
    dataset.set_epoch(epoch)
    dataset.resume_from(plan)
    return list(build_loader(dataset, num_workers, world_size=1))


def tensor_hash(tensor: torch.Tensor | None) -> str:
    digest = hashlib.sha256()
    if tensor is not None:
        tensor = tensor.contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def text_hash(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def batch_hashes(batch) -> dict[str, str]:
    seq_lens = None if batch.layout is None else [list(row) for row in batch.layout.seq_lens]
    return {
        "input_ids": tensor_hash(batch.input_ids),
        "labels": tensor_hash(batch.labels),
        "pixels": tensor_hash(batch.pixels),
        "layout": text_hash(seq_lens),
        "keys": text_hash(batch.keys),
        "counts": text_hash({"skipped": batch.skipped, "sources": batch.sources, "num_samples": batch.num_samples}),
    }


def setting_hashes(shards, name: str) -> list[dict[str, str]]:
    data, options, num_workers, epoch, cut = SETTINGS[name]
    batches = read(shards, data, options, num_workers, epoch)
    if cut is not None:
        assert 0 < cut < len(batches), (name, len(batches))
        batches = read(shards, data, options, num_workers, epoch, plan=resume_after(batches, cut))
    return [batch_hashes(batch) for batch in batches]


@pytest.fixture(scope="module")
def recorded() -> dict:
    if REGEN:
        return {}
    if not FIXTURE.exists():
        pytest.fail(f"{FIXTURE} is missing; write it with SALAMANDRA_REGEN_BATCH_HASHES=1 (see the module docstring)")
    return json.loads(FIXTURE.read_text())


_regenerated: dict[str, list] = {}


def fixture_text(settings: dict[str, list[dict[str, str]]]) -> str:
    """JSON with one line per Batch, so that a diff of the fixture shows which Batches changed."""
    blocks = [f" {json.dumps(name)}: [\n" + ",\n".join(f"  {json.dumps(batch, sort_keys=True)}" for batch in batches)
              + "\n ]" for name, batches in sorted(settings.items())]
    return "{\n" + ",\n".join(blocks) + "\n}\n"


@pytest.mark.parametrize("name", list(SETTINGS))
def test_batches_are_unchanged(shards, recorded, name):
    got = setting_hashes(shards, name)
    if REGEN:
        _regenerated[name] = got
        if len(_regenerated) == len(SETTINGS):
            path = FIXTURE if REGEN == "1" else Path(REGEN)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(fixture_text(_regenerated))
        return
    want = recorded[name]
    for index, (a, b) in enumerate(zip(got, want)):
        assert a == b, (f"{name}: Batch {index} differs in {sorted(k for k in a if a[k] != b.get(k))} "
                        f"(of {len(want)} Batches)")
    assert len(got) == len(want), f"{name}: {len(got)} Batches, the fixture has {len(want)}"
