"""The data path in the anyres layout (LLaVA-OneVision's), with a tiny OneVision-shaped model (384 px,
patch 14: 27x27 tokens a view): images of mixed sizes (smaller than a tile, one tile, wide, tall, a
JPEG turned by its EXIF orientation) and conversations with several images. Every Batch holds, for
each image, a placeholder run of the model's own count for it (image_token_counts of its sample),
and pixels that are exactly the views layouts.views makes of the decoded images (and the model's
own preprocess), and the model runs on it; a sample too long once its images are counted is
skipped before any pixel is decoded; exact resume holds."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from multimodal.data import (AnyresImages, DataConfig, SampleSettings, SkipSample, build_dataset,
                             build_loader, dataset_for_model, make_batch, to_tokenized_sample)
from multimodal.data.decode import TOO_LONG, decode_image, image_size
from multimodal.data.samples import image_fields
from multimodal.layouts import ImageLayout, onevision_pinpoints
from multimodal.layouts.inputs import ImageInputs
from multimodal.layouts.views import sample_views
from tests.multimodal.data.helpers import (ANYRES_SIZES, anyres_sample, encoded, split_rows, textured_image,
                                          write_sample_shards)
from tests.multimodal.data.test_resume import resume_after
from tests.multimodal.layouts.tiny_onevision import build_tiny_onevision_vlm
from tests.multimodal.tiny import build_tiny_vlm

MAX_TOKENS = 4096
OPTIONS = {"max_tokens": MAX_TOKENS, "rows_per_batch": 2, "shuffle_buffer": 6, "pack_buffer": 3,
           "max_skip_fraction": None}


@pytest.fixture(scope="module")
def onevision(tokenizer):
    return build_tiny_onevision_vlm(tokenizer).eval()


def rotated_jpeg(size: tuple[int, int], seed: int, orientation: int) -> bytes:
    """A JPEG stored at `size` (height, width) with an EXIF orientation that viewers apply."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(textured_image(size, seed), "JPEG", exif=exif.tobytes())


def late_exif_png(size: tuple[int, int], seed: int, orientation: int) -> bytes:
    """A PNG with its EXIF block (an orientation) after its pixels: Pillow sees it only on decoding."""
    import struct
    import zlib

    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes().removeprefix(b"Exif\x00\x00")
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    data = encoded(textured_image(size, seed))
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]


def truncated_png(size: tuple[int, int]) -> bytes:
    """A PNG whose header is whole (its size readable) but whose pixels are cut off: undecodable."""
    data = encoded(textured_image(size, 99))
    return data[:len(data) // 3]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("anyres")
    first = [
        anyres_sample("small", [ANYRES_SIZES["small"]], 1),
        anyres_sample("square", [ANYRES_SIZES["square"]], 2, fmt="JPEG"),
        anyres_sample("wide", [ANYRES_SIZES["wide"]], 3),
        {"__key__": "text", "txt": b"Plain text between pictures."},
        anyres_sample("tall", [ANYRES_SIZES["tall"]], 4, fmt="JPEG"),
        anyres_sample("three", [ANYRES_SIZES["wide"], ANYRES_SIZES["small"], ANYRES_SIZES["square"]], 5),
    ]
    second = [
        # Stored wide, shown tall (EXIF orientation 6): its tiles and count follow the shown image.
        {"__key__": "turned", "jpg": rotated_jpeg((300, 900), 6, orientation=6), "txt": b"A turned picture."},
        # 1000x1000 alone: 3x3 tiles, 7371 tokens > MAX_TOKENS. Its pixels are cut off: had they been
        # decoded, the skip would be image_undecodable.
        {"__key__": "huge", "png": truncated_png((1000, 1000)), "txt": b"Far too many tiles."},
        anyres_sample("two", [ANYRES_SIZES["tall"], ANYRES_SIZES["square"]], 7),
        anyres_sample("small2", [ANYRES_SIZES["small"]], 8, fmt="JPEG"),
        anyres_sample("square2", [ANYRES_SIZES["square"]], 9),
    ]
    return write_sample_shards(root, "anyres", [first, second])


def raw_samples(shards: list[str]) -> dict[str, dict[str, bytes]]:
    import webdataset as wds

    samples = {}
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        samples[sample["__key__"]] = sample
    return samples


def decoded_images(raw: dict[str, bytes]) -> list[Image.Image]:
    return [decode_image(raw[name]) for name in image_fields(raw)]


def read(model, shards: list[str], num_workers: int = 0, plan=None, **options):
    dataset = dataset_for_model(DataConfig(shards, **{**OPTIONS, **options}), model)
    dataset.resume_from(plan)
    return list(build_loader(dataset, num_workers, world_size=1))


def placeholder_runs(ids: list[int], token: int) -> list[int]:
    runs, length = [], 0
    for value in [*ids, None]:
        if value == token:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def check_batch(batch, model, raw: dict[str, dict[str, bytes]]) -> list[str]:
    """Placeholder runs, sizes, view counts and views of every sample of `batch`; its keys."""
    inputs = batch.pixels
    assert inputs is None or isinstance(inputs, ImageInputs)
    image, view, keys = 0, 0, []
    for row_keys, row_samples in zip(batch.keys, split_rows(batch.input_ids, batch.layout)):
        for key, ids in zip(row_keys, row_samples):
            keys.append(key)
            images = decoded_images(raw[key])
            sizes = [(im.height, im.width) for im in images]
            assert placeholder_runs(ids, model.image_token_id) == model.image_token_counts(sizes), key
            if not images:
                continue
            expected = sample_views(images, model.layout, model.encoder.image_size, model.encoder.mean,
                                    model.encoder.std)
            # The data path's views are the model's own preprocessing of the sample's images.
            assert torch.equal(torch.cat(expected), model.preprocess(images).pixels), key
            for want, size in zip(expected, sizes):
                assert inputs.sizes[image] == size and inputs.views[image] == want.shape[0], key
                assert torch.equal(inputs.pixels[view:view + want.shape[0]], want), key
                image, view = image + 1, view + want.shape[0]
    assert image == (0 if inputs is None else len(inputs)) and view == (0 if inputs is None else inputs.pixels.shape[0])
    return keys


def test_batches_hold_each_images_own_count_and_views_and_the_model_runs(onevision, shards):
    raw = raw_samples(shards)
    batches = read(onevision, shards)
    seen = []
    for batch in batches:
        seen += check_batch(batch, onevision, raw)
        with torch.no_grad():
            loss, _ = onevision(batch)  # the placeholder check passes
        assert torch.isfinite(loss)
    assert sorted(seen) == sorted(key for key in raw if key != "huge")
    skipped = sum((Counter(batch.skipped) for batch in batches), Counter())
    assert skipped == {TOO_LONG: 1}
    # Several samples per row: samples of different counts pack together.
    assert any(len(lengths) > 1 for batch in batches for lengths in batch.layout.seq_lens)
    counts = {key: onevision.image_token_counts([(im.height, im.width) for im in decoded_images(raw[key])])
              for key in seen}
    assert counts["small"] == [1317] and counts["square"] == [1485] and counts["three"] == [730] * 3
    assert counts["turned"] == counts["tall"] != counts["wide"]


def test_trimmed_rows_hold_the_same_samples_and_give_the_same_loss(onevision, shards):
    fixed, trimmed = read(onevision, shards), read(onevision, shards, trim_rows=True)
    assert [batch.keys for batch in trimmed] == [batch.keys for batch in fixed]
    assert any(batch.input_ids.shape[1] < MAX_TOKENS for batch in trimmed)
    for short, full in zip(trimmed, fixed):
        length = short.input_ids.shape[1]
        assert length % 64 == 0 and length >= max(sum(row) for row in short.layout.seq_lens)
        assert torch.equal(short.input_ids, full.input_ids[:, :length]) and short.layout == full.layout
        assert torch.equal(short.pixels.pixels, full.pixels.pixels)
        with torch.no_grad():
            (loss_short, _), (loss_full, _) = onevision(short), onevision(full)
        # Padding never reaches a sample: the same loss, up to the summation order of other shapes.
        assert torch.allclose(loss_short, loss_full, rtol=1e-5, atol=0), (loss_short, loss_full)


def test_worker_settings_count_like_the_model(onevision, tokenizer):
    settings = onevision.anyres
    assert settings == AnyresImages(onevision.layout, 384, 27, (0.5,) * 3, (0.5,) * 3)
    # The reference table of transformers' LlavaOnevisionProcessor (docs: onevision.md 1.3).
    table = {(384, 384): 1485, (480, 640): 2929, (640, 480): 2943, (300, 1000): 2779, (1000, 300): 2835,
             (1024, 899): 6561, (1080, 1920): 7269, (2304, 2304): 7371, (1000, 1000): 7371}
    for size, tokens in table.items():
        assert settings.token_counts([size]) == onevision.image_token_counts([size]) == [tokens], size
    pair = [(480, 640), (1080, 1920)]
    assert settings.token_counts(pair) == onevision.image_token_counts(pair) == [730, 730]
    assert build_tiny_vlm(tokenizer).anyres is None


def test_image_size_reads_the_header_as_decoding_shows_it():
    image = textured_image((30, 70), 0)
    cases = {
        "png": encoded(image), "jpeg": encoded(image, "JPEG"), "webp": encoded(image, "WEBP", lossless=True),
        "gif": encoded(image.convert("P"), "GIF"),
    }
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        cases[f"jpeg_exif{orientation}"] = rotated_jpeg((30, 70), 0, orientation)
        cases[f"png_exif{orientation}"] = encoded(image, exif=exif.tobytes())
        cases[f"webp_exif{orientation}"] = encoded(image, "WEBP", exif=exif.tobytes())
    for name, data in cases.items():
        decoded = decode_image(data)
        assert image_size(data) == (decoded.height, decoded.width), name
    assert image_size(cases["jpeg_exif6"]) == (70, 30)
    # The header alone: a file whose pixels are cut off still has its size.
    assert image_size(truncated_png((50, 60))) == (50, 60)
    with pytest.raises(SkipSample, match="image_undecodable"):
        decode_image(truncated_png((50, 60)))
    # The same header checks as decode_image.
    with pytest.raises(SkipSample, match="image_too_small"):
        image_size(encoded(textured_image((4, 40), 0)), min_side=8)
    with pytest.raises(SkipSample, match="image_undecodable"):
        image_size(b"not an image")


def test_too_long_is_decided_from_the_headers(onevision, monkeypatch):
    settings = SampleSettings(onevision.tokenizer, None, onevision.image_token_id, None, max_tokens=2000,
                              anyres=onevision.anyres)
    calls = []
    monkeypatch.setattr("multimodal.data.samples.decode_image", lambda data, **options: calls.append(data))
    # 900x300 alone: 2835 tokens > 2000. Two of them: 730 each, which fits.
    tall = encoded(textured_image(ANYRES_SIZES["tall"], 0))
    with pytest.raises(SkipSample, match=TOO_LONG):
        to_tokenized_sample({"__key__": "x", "png": tall, "txt": b"Tall."}, settings)
    assert calls == []
    monkeypatch.undo()
    sample = to_tokenized_sample(anyres_sample("y", [ANYRES_SIZES["tall"]] * 2, 0), settings)
    assert placeholder_runs(sample.input_ids, onevision.image_token_id) == [730, 730]
    assert sample.image_sizes == [ANYRES_SIZES["tall"]] * 2 and [v.shape[0] for v in sample.images] == [1, 1]


def test_an_orientation_seen_only_on_decoding_recounts_the_tokens(onevision):
    settings = SampleSettings(onevision.tokenizer, None, onevision.image_token_id, None, max_tokens=MAX_TOKENS,
                              anyres=onevision.anyres)
    data = late_exif_png(ANYRES_SIZES["wide"], 3, orientation=6)
    assert image_size(data) == ANYRES_SIZES["wide"]  # the header: stored wide
    decoded = decode_image(data)
    assert (decoded.height, decoded.width) == ANYRES_SIZES["tall"]  # decoding turns it
    sample = to_tokenized_sample({"__key__": "late", "png": data, "txt": b"Turned late."}, settings)
    assert sample.image_sizes == [ANYRES_SIZES["tall"]]
    assert placeholder_runs(sample.input_ids, onevision.image_token_id) == onevision.image_token_counts(
        [ANYRES_SIZES["tall"]]) != onevision.image_token_counts([ANYRES_SIZES["wide"]])
    assert torch.equal(torch.cat(sample.images), onevision.preprocess([decoded]).pixels)


def test_anyres_settings_are_checked(onevision, tokenizer, shards):
    anyres = onevision.anyres
    with pytest.raises(ValueError, match="pad_to_square"):
        dataset_for_model(DataConfig(shards, max_tokens=MAX_TOKENS, pad_to_square=True), onevision)
    with pytest.raises(ValueError, match="leaves no room"):
        dataset_for_model(DataConfig(shards, max_tokens=730), onevision)
    with pytest.raises(ValueError, match="as None"):
        build_dataset(DataConfig(shards), tokenizer, None, onevision.image_token_id, 16, anyres=anyres)
    with pytest.raises(ValueError, match="decodes images in full"):
        SampleSettings(tokenizer, None, 1, None, 100, decode_size=384, anyres=anyres)
    with pytest.raises(ValueError, match="anyres layout"):
        AnyresImages(ImageLayout(), 384, 27, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="multiples"):
        AnyresImages(ImageLayout.anyres(grid_pinpoints=onevision_pinpoints(100)), 384, 27, (0.5,) * 3, (0.5,) * 3)
    # The fixed layout takes the model's own count.
    fixed = build_tiny_vlm(tokenizer)
    dataset = dataset_for_model(DataConfig(shards, max_tokens=MAX_TOKENS), fixed)
    assert dataset.settings.num_image_tokens == fixed.num_image_tokens and dataset.settings.anyres is None


def test_make_batch_concatenates_the_samples_pieces_and_refuses_a_mix(onevision):
    settings = SampleSettings(onevision.tokenizer, None, onevision.image_token_id, None, max_tokens=MAX_TOKENS,
                              anyres=onevision.anyres)
    a = to_tokenized_sample(anyres_sample("a", [ANYRES_SIZES["wide"]], 1), settings)
    b = to_tokenized_sample({"__key__": "b", "txt": b"Only words."}, settings)
    c = to_tokenized_sample(anyres_sample("c", [ANYRES_SIZES["small"], ANYRES_SIZES["tall"]], 2), settings)
    batch = make_batch([[a, b], [c]], MAX_TOKENS, pad_id=0)
    assert batch.pixels.sizes == [ANYRES_SIZES["wide"], ANYRES_SIZES["small"], ANYRES_SIZES["tall"]]
    assert batch.pixels.views == [4, 1, 1]
    assert torch.equal(batch.pixels.pixels, torch.cat([*a.images, *c.images]))
    assert make_batch([[b]], MAX_TOKENS, pad_id=0).pixels is None
    fixed = b.__class__("f", [1, 2], [1, 2], [torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="cannot mix"):
        make_batch([[a, fixed]], MAX_TOKENS, pad_id=0)


def fingerprint(batch):
    inputs = batch.pixels
    pixels = None if inputs is None else (inputs.pixels.numpy().tobytes(), inputs.sizes, inputs.views)
    return batch.keys, batch.skipped, batch.input_ids.tolist(), batch.labels.tolist(), pixels


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_goes_on_exactly(onevision, shards, num_workers):
    full = read(onevision, shards, num_workers)
    expected = [fingerprint(batch) for batch in full]
    assert len(full) >= 3
    cuts = [1, len(full) - 1] if num_workers else range(1, len(full))
    for cut in cuts:
        resumed = read(onevision, shards, num_workers, plan=resume_after(full, cut))
        assert [fingerprint(batch) for batch in resumed] == expected[cut:], f"cut after batch {cut}"
