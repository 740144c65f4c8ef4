"""Video files -> frames (PyAV): uniform sampling, the frames' pixels, and the bad-video matrix."""

import av
import numpy as np
import pytest
from PIL import Image

from multimodal.video import MIXED_SIZES, NO_FRAMES, UNDECODABLE, VideoError, read_video, uniform_frame_indices
from tests.multimodal.video_helpers import write_video


def coloured(n: int, size=(48, 64)) -> list[np.ndarray]:
    return [np.full((*size, 3), (i * 20 % 256, 255 - i * 10 % 256, i * 7 % 256), dtype=np.uint8) for i in range(n)]


def test_uniform_indices_match_llava_next():
    assert uniform_frame_indices(5, 32) == [0, 1, 2, 3, 4]
    assert uniform_frame_indices(100, 4) == [0, 33, 66, 99]
    assert uniform_frame_indices(10, 3) == np.linspace(0, 9, 3, dtype=int).tolist()
    with pytest.raises(ValueError):
        uniform_frame_indices(10, 0)


def test_frames_are_sampled_uniformly_with_their_pixels(tmp_path):
    arrays = coloured(10)
    write_video(tmp_path / "v.mkv", arrays)
    frames = read_video(tmp_path / "v.mkv", frames_upbound=4)
    assert [np.asarray(f).tolist() for f in frames] == [arrays[i].tolist() for i in (0, 3, 6, 9)]
    assert all(isinstance(f, Image.Image) and f.mode == "RGB" for f in frames)
    assert len(read_video((tmp_path / "v.mkv").read_bytes(), frames_upbound=32)) == 10  # bytes too


def test_bad_videos_are_named(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoError) as error:
        read_video(tmp_path / "junk.mp4", 8)
    assert error.value.reason == UNDECODABLE
    with av.open(str(tmp_path / "sound.wav"), "w") as container:  # sound only: no video frame
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoError) as error:
        read_video(tmp_path / "sound.wav", 8)
    assert error.value.reason == NO_FRAMES


def test_frames_of_different_sizes_are_refused(tmp_path):
    # Two MPEG-TS videos of different sizes, their bytes joined: the stream changes size midway.
    parts = []
    for index, size in enumerate([(48, 64), (96, 128)]):
        write_video(tmp_path / f"part{index}.ts", coloured(3, size), codec="mpeg4")
        parts.append((tmp_path / f"part{index}.ts").read_bytes())
    (tmp_path / "mixed.ts").write_bytes(b"".join(parts))
    with pytest.raises(VideoError) as error:
        read_video(tmp_path / "mixed.ts", 8)
    assert error.value.reason == MIXED_SIZES


def test_chat_reads_a_video_file_as_its_frames(tokenizer, tmp_path):
    from tests.multimodal.layouts.tiny_onevision import build_tiny_onevision_vlm

    model = build_tiny_onevision_vlm(tokenizer).eval()
    write_video(tmp_path / "v.mkv", coloured(40))
    frames = read_video(tmp_path / "v.mkv", model.layout.frames_upbound)
    assert len(frames) == 32
    messages = [{"role": "user", "content": "What happens?"}]
    from_file = model.chat(messages, videos=[tmp_path / "v.mkv"], max_new_tokens=4)
    assert from_file == model.chat(messages, videos=[frames], max_new_tokens=4)
    ids, inputs, _ = model._chat_inputs(messages, None, 4, [tmp_path / "v.mkv"])
    assert ids.count(model.video_token_id) == 196 * 32 + 1 and inputs.frames_per_video == [32]
