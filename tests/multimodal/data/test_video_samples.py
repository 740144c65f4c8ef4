"""Videos in the data path (anyres layout, a model with a video token): a video file (lossless ffv1
in Matroska, read with PyAV up to the layout's frames_upbound), a video given as its frames (numbered
images and `"video": true`), an image beside a video, two videos marked by content parts, and every
bad video as one counted skip with its own reason. Every Batch holds, for each video, a placeholder
run of the model's own video_token_counts and frames that are exactly layouts.views.video_views of
the frames read_video gives (the model's own preprocess), and the model runs on it; a too-long
video sample is refused as early as its frame count is known; exact resume holds."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal.data import (DataConfig, SampleSettings, SkipSample, build_loader, dataset_for_model,
                             make_batch, to_tokenized_sample)
from multimodal.data.decode import (BAD_VIDEO_NAMES, NO_VIDEO_TOKEN, PLACEHOLDER_MISMATCH, TOO_LONG, VIDEO_CAPTION,
                                    VIDEO_MIXED_SIZES, VIDEO_NO_FRAMES, VIDEO_UNDECODABLE, decode_image)
from multimodal.data.samples import image_fields, video_fields
from multimodal.layouts.inputs import ImageInputs
from multimodal.layouts.views import video_views
from multimodal.video import read_video, uniform_frame_indices
from tests.multimodal.data.helpers import ANYRES_SIZES, encoded, split_rows, textured_image, write_sample_shards
from tests.multimodal.data.test_anyres_batches import placeholder_runs, raw_samples
from tests.multimodal.data.test_resume import resume_after
from tests.multimodal.layouts.tiny_onevision import build_tiny_onevision_vlm
from tests.multimodal.tiny import build_tiny_vlm
from tests.multimodal.video_helpers import mixed_sizes_bytes, sound_only_bytes, video_bytes

MAX_TOKENS = 4096
UPBOUND = 4  # the test model's frames_upbound: 6 frames give 0, 1, 3, 5; 5 give 0, 1, 2, 4
FRAME = (48, 64)  # (height, width) of the videos' frames
OPTIONS = {"max_tokens": MAX_TOKENS, "rows_per_batch": 2, "shuffle_buffer": 6, "pack_buffer": 3,
           "max_skip_fraction": None}


@pytest.fixture(scope="module")
def onevision(tokenizer):
    model = build_tiny_onevision_vlm(tokenizer).eval()
    model.layout = dataclasses.replace(model.layout, frames_upbound=UPBOUND)
    return model


def settings_for(model, max_tokens: int = MAX_TOKENS, video: bool = True) -> SampleSettings:
    return SampleSettings(model.tokenizer, None, model.image_token_id, None, max_tokens=max_tokens,
                          anyres=model.anyres, video_token_id=model.video_token_id if video else None)


def frames(count: int, seed: int, size: tuple[int, int] = FRAME) -> list[np.ndarray]:
    """`count` different textured frames of `size` (height, width)."""
    return [np.asarray(textured_image(size, seed * 100 + index)) for index in range(count)]


def messages(user, answer: str, **extra) -> bytes:
    """A `messages` json; `user` is a text or a list of content parts."""
    return json.dumps({**extra, "messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}).encode()


def frame_images(arrays: list[np.ndarray], jpeg: tuple[int, ...] = ()) -> dict[str, bytes]:
    """0.png, 1.png, ... (0.jpg for the indices in `jpeg`): one video's frames given as images."""
    return {f"{i}.{'jpg' if i in jpeg else 'png'}": encoded(Image.fromarray(array), "JPEG" if i in jpeg else "PNG")
            for i, array in enumerate(arrays)}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, bytes]:
    """The video files of the samples, by name."""
    root = tmp_path_factory.mktemp("videos")
    return {
        "six": video_bytes(root, "six.mkv", frames(6, 1)),
        "three": video_bytes(root, "three.mkv", frames(3, 2)),
        "two": video_bytes(root, "two.mkv", frames(2, 3)),
        "four": video_bytes(root, "four.mkv", frames(4, 4)),
        "sound": sound_only_bytes(root),
        "mixed": mixed_sizes_bytes(root, frames(3, 5), frames(3, 6, (96, 128))),
    }


def good_samples(videos) -> list[dict[str, bytes]]:
    small = encoded(textured_image(ANYRES_SIZES["small"], 7))
    return [
        # A file, its marker in a LLaVA conversation: 6 frames, 4 kept.
        {"__key__": "file", "mkv": videos["six"], "json": json.dumps({"conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Colours move, file."}]}
        ).encode()},
        # Frames as images, no marker (the video goes to the start of the first user turn): 5 frames, 4 kept.
        {"__key__": "frames", **frame_images(frames(5, 8), jpeg=(4,)),
         "json": messages("What moves?", "Stripes, frames.", video=True)},
        {"__key__": "text", "txt": b"Plain text between videos."},
        # An image and a video, no markers: the image first, then the video.
        {"__key__": "both", "png": small, "mp4": videos["three"], "json": messages("Compare.", "Alike, both.")},
        # An image and two videos (numbered files, the second a .webm name), marked by content parts.
        {"__key__": "two", "0.png": small, "0.mkv": videos["two"], "1.webm": videos["four"],
         "json": messages([{"type": "image"}, {"type": "text", "text": " then "}, {"type": "video"},
                           {"type": "text", "text": " and "}, {"type": "video"}], "Three things, two.")},
        # Frames as images under a <video> marker; 3 frames, all kept.
        {"__key__": "frames2", **frame_images(frames(3, 9)), "json": json.dumps({"video": True, "conversations": [
            {"from": "human", "value": "Watch: <video> What now?"}, {"from": "gpt", "value": "Nothing, frames2."}]}
        ).encode()},
    ]


def bad_samples(videos) -> dict[str, tuple[dict[str, bytes], str]]:
    """key -> (sample, the reason it is skipped for) in a model with a video token."""
    ask = messages("<video>\nWhat happens?", "Something.")
    return {
        "undecodable": ({"mp4": b"not a video at all" * 10, "json": ask}, VIDEO_UNDECODABLE),
        "sound_only": ({"mkv": videos["sound"], "json": ask}, VIDEO_NO_FRAMES),
        "no_frame_images": ({"json": messages("What happens?", "Nothing.", video=True)}, VIDEO_NO_FRAMES),
        "mixed_file": ({"mov": videos["mixed"], "json": ask}, VIDEO_MIXED_SIZES),
        "mixed_frames": ({**frame_images(frames(2, 10)), "2.png": encoded(textured_image((64, 48), 11)),
                          "json": messages("What happens?", "Something.", video=True)}, VIDEO_MIXED_SIZES),
        # Six videos of 4 frames: 6 x 785 tokens > MAX_TOKENS.
        "too_long": ({**{f"{i}.mkv": videos["four"] for i in range(6)}, "json": messages("Six.", "Six clips.")},
                     TOO_LONG),
        "two_markers": ({"mkv": videos["two"], "json": messages("<video> or <video>?", "One.")}, PLACEHOLDER_MISMATCH),
        "stray_marker": ({"json": messages("<video> is not here.", "Right.")}, PLACEHOLDER_MISMATCH),
        "caption": ({"mkv": videos["two"], "txt": b"A short clip."}, VIDEO_CAPTION),
        "two_unnumbered": ({"mp4": videos["two"], "mkv": videos["two"], "json": ask}, BAD_VIDEO_NAMES),
        "file_and_frames": ({**frame_images(frames(2, 12)), "mp4": videos["two"],
                             "json": messages("What happens?", "Something.", video=True)}, BAD_VIDEO_NAMES),
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory, videos) -> list[str]:
    root = tmp_path_factory.mktemp("video-shards")
    good, bad = good_samples(videos), [{"__key__": key, **sample} for key, (sample, _) in bad_samples(videos).items()]
    return write_sample_shards(root, "video", [good[:3] + bad[:6], good[3:] + bad[6:]])


def read(model, shards: list[str], num_workers: int = 0, plan=None, **options):
    dataset = dataset_for_model(DataConfig(shards, **{**OPTIONS, **options}), model)
    dataset.resume_from(plan)
    return list(build_loader(dataset, num_workers, world_size=1))


def expected_media(raw: dict[str, bytes], upbound: int) -> tuple[list[Image.Image], list[list[Image.Image]]]:
    """The images and each video's frames the model should see for a raw sample, found without the
    data path: a video file's frames from read_video, frames given as images sampled alike."""
    record = json.loads(raw["json"]) if "json" in raw else {}
    if record.get("video") is True:
        given = [decode_image(raw[name]) for name in image_fields(raw)]
        return [], [[given[i] for i in uniform_frame_indices(len(given), upbound)]]
    return ([decode_image(raw[name]) for name in image_fields(raw)],
            [read_video(raw[name], upbound) for name in video_fields(raw)])


def check_batch(batch, model, raw: dict[str, dict[str, bytes]]) -> list[str]:
    """Image and video placeholder runs, frames and views of every sample of `batch`; its keys."""
    inputs = batch.pixels
    assert inputs is None or isinstance(inputs, ImageInputs)
    tile, mean, std = model.encoder.image_size, model.encoder.mean, model.encoder.std
    view, frame, video, keys = 0, 0, 0, []
    for row_keys, row_samples in zip(batch.keys, split_rows(batch.input_ids, batch.layout)):
        for key, ids in zip(row_keys, row_samples):
            keys.append(key)
            images, clips = expected_media(raw[key], model.layout.frames_upbound)
            sizes = [(image.height, image.width) for image in images]
            assert placeholder_runs(ids, model.image_token_id) == model.image_token_counts(sizes), key
            assert placeholder_runs(ids, model.video_token_id) == model.video_token_counts([len(c) for c in clips]), key
            if images and clips:  # images before videos, also when placed without markers
                assert ids.index(model.image_token_id) < ids.index(model.video_token_id), key
            if not images and not clips:
                continue
            own = model.preprocess(images, clips)  # the model's own preprocessing of the sample
            views = 0 if own.pixels is None else own.pixels.shape[0]
            assert torch.equal(inputs.pixels[view:view + views], own.pixels), key
            view += views
            for clip in clips:
                want = video_views(clip, tile, mean, std)
                assert inputs.frames_per_video[video] == len(clip), key
                assert torch.equal(inputs.frames[frame:frame + len(clip)], want), key
                frame, video = frame + len(clip), video + 1
            if clips:
                assert torch.equal(own.frames, inputs.frames[frame - own.frames.shape[0]:frame]), key
    assert view == (0 if inputs is None else inputs.pixels.shape[0])
    assert video == (0 if inputs is None else inputs.num_videos)
    return keys


def test_video_batches_hold_each_videos_count_and_frames_and_the_model_runs(onevision, shards, videos):
    raw = raw_samples(shards)
    batches = read(onevision, shards, rows_per_batch=1, pack_buffer=1)
    seen = []
    for batch in batches:
        seen += check_batch(batch, onevision, raw)
        with torch.no_grad():
            loss, _ = onevision(batch)  # both placeholder checks pass
        assert torch.isfinite(loss)
    bad = bad_samples(videos)
    assert sorted(seen) == sorted(key for key in raw if key not in bad)
    # A Batch with a video and no image (pixels of 0 views), one with an image and three videos.
    assert [(len(b.pixels), b.pixels.num_videos) for b in batches] == [(0, 1), (1, 3), (1, 2)]
    skipped = sum((Counter(batch.skipped) for batch in batches), Counter())
    assert skipped == Counter(reason for _, reason in bad.values())
    # The kept frames are the file's frames 0, 1, 3, 5, pixel for pixel (lossless video).
    written = frames(6, 1)
    assert [np.asarray(f).tolist() for f in read_video(raw["file"]["mkv"], UPBOUND)] == [
        written[i].tolist() for i in (0, 1, 3, 5)]
    counts = {key: onevision.video_token_counts([len(c) for c in expected_media(raw[key], UPBOUND)[1]])
              for key in seen}
    assert counts["file"] == counts["frames"] == [4 * 196 + 1] and counts["frames2"] == [3 * 196 + 1]
    assert counts["two"] == [2 * 196 + 1, 4 * 196 + 1] and counts["both"] == [3 * 196 + 1]


@pytest.mark.parametrize("key", ["undecodable", "sound_only", "no_frame_images", "mixed_file", "mixed_frames",
                                 "too_long", "two_markers", "stray_marker", "caption", "two_unnumbered",
                                 "file_and_frames"])
def test_each_bad_video_is_skipped_with_its_reason(onevision, videos, key):
    sample, reason = bad_samples(videos)[key]
    with pytest.raises(SkipSample) as skip:
        to_tokenized_sample({"__key__": key, **sample}, settings_for(onevision))
    assert skip.value.reason == reason, skip.value


def test_a_model_without_a_video_token_skips_video_samples(onevision, tokenizer, shards, videos):
    settings = settings_for(onevision, video=False)
    for sample in good_samples(videos):
        if sample["__key__"] == "text":
            continue
        with pytest.raises(SkipSample, match=NO_VIDEO_TOKEN):
            to_tokenized_sample(sample, settings)
    # The fixed layout (no video token possible) through the whole pipeline: every sample with a
    # video is skipped as no_video_token; names that cannot be ordered are found first.
    fixed = build_tiny_vlm(tokenizer).eval()
    batches = read(fixed, shards)
    skipped = sum((Counter(batch.skipped) for batch in batches), Counter())
    # 5 good samples with videos and 8 bad ones; two_unnumbered and file_and_frames are bad names.
    assert skipped == {NO_VIDEO_TOKEN: 13, BAD_VIDEO_NAMES: 2}
    assert sorted(key for batch in batches for row in batch.keys for key in row) == ["stray_marker", "text"]
    with pytest.raises(ValueError, match="anyres"):
        SampleSettings(tokenizer, fixed.image_transform, fixed.image_token_id, fixed.num_image_tokens, 100,
                       video_token_id=tokenizer.reserved_token_id(2))


def test_too_long_is_refused_as_soon_as_the_frame_count_is_known(onevision, videos, monkeypatch):
    decoded, read_videos = [], []
    monkeypatch.setattr("multimodal.data.samples.decode_image", lambda data, **o: decoded.append(data))
    real_read = read_video
    monkeypatch.setattr("multimodal.video.read_video", lambda data, upbound: read_videos.append(data)
                        or real_read(data, upbound))
    # Frames as images: counted from the images' headers, refused before any is decoded (785 > 600).
    given = {"__key__": "f", **frame_images(frames(5, 8)), "json": messages("What?", "This.", video=True)}
    with pytest.raises(SkipSample, match=TOO_LONG):
        to_tokenized_sample(given, settings_for(onevision, max_tokens=600))
    assert decoded == []
    # A file: with one frame it would take 197 tokens; 150 refuses it before decoding.
    file = {"__key__": "v", "mkv": videos["six"], "json": messages("<video>What?", "This.")}
    with pytest.raises(SkipSample, match=TOO_LONG):
        to_tokenized_sample(file, settings_for(onevision, max_tokens=150))
    assert read_videos == []
    # 600 lets one frame in: the file is decoded, then refused with its 4 frames (785 tokens).
    with pytest.raises(SkipSample, match=TOO_LONG):
        to_tokenized_sample(file, settings_for(onevision, max_tokens=600))
    assert len(read_videos) == 1
    monkeypatch.undo()
    sample = to_tokenized_sample(file, settings_for(onevision, max_tokens=900))
    assert placeholder_runs(sample.input_ids, onevision.video_token_id) == [785]
    assert [f.shape for f in sample.video_frames] == [(4, 3, 384, 384)] and sample.images == []


def test_make_batch_puts_the_frames_beside_the_images(onevision, videos):
    settings = settings_for(onevision)
    samples = {sample["__key__"]: to_tokenized_sample(sample, settings) for sample in good_samples(videos)}
    only_video = make_batch([[samples["file"], samples["text"]], [samples["frames"]]], MAX_TOKENS, pad_id=0)
    inputs = only_video.pixels
    assert len(inputs) == 0 and inputs.pixels.shape == (0, 3, 384, 384) and inputs.frames_per_video == [4, 4]
    assert torch.equal(inputs.frames, torch.cat([*samples["file"].video_frames, *samples["frames"].video_frames]))
    mixed = make_batch([[samples["two"]], [samples["both"]]], MAX_TOKENS, pad_id=0).pixels
    # An image beside videos is alone among the sample's images: its base view and tiles (1x1 here).
    assert mixed.views == [2, 2] and mixed.sizes == [ANYRES_SIZES["small"]] * 2
    assert mixed.frames_per_video == [2, 4, 3]
    assert torch.equal(mixed.pixels, torch.cat([*samples["two"].images, *samples["both"].images]))


def fingerprint(batch):
    inputs = batch.pixels
    pixels = None if inputs is None else (inputs.pixels.numpy().tobytes(), inputs.sizes, inputs.views,
                                          None if inputs.frames is None else inputs.frames.numpy().tobytes(),
                                          inputs.frames_per_video)
    return batch.keys, batch.skipped, batch.input_ids.tolist(), batch.labels.tolist(), pixels


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_goes_on_exactly_with_videos(onevision, shards, num_workers):
    options = {"rows_per_batch": 1, "pack_buffer": 1}  # more, smaller Batches: more places to cut
    full = read(onevision, shards, num_workers, **options)
    expected = [fingerprint(batch) for batch in full]
    assert len(full) >= 3
    cuts = [1, len(full) - 1] if num_workers else range(1, len(full))
    for cut in cuts:
        resumed = read(onevision, shards, num_workers, plan=resume_after(full, cut), **options)
        assert [fingerprint(batch) for batch in resumed] == expected[cut:], f"cut after batch {cut}"
