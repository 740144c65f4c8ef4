"""Video files written by the tests (PyAV): lossless, so decoded frames equal what was written."""

from __future__ import annotations

import av
import numpy as np


def write_video(path, frames: list[np.ndarray], codec: str = "ffv1") -> None:
    """A lossless video (ffv1 in Matroska), so decoded frames equal what was written."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=4)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_bytes(directory, name: str, frames: list[np.ndarray], codec: str = "ffv1") -> bytes:
    """The bytes of write_video's file `directory / name` (ffv1: Matroska; mpeg4: name it .ts)."""
    path = directory / name
    write_video(path, frames, codec)
    return path.read_bytes()


def sound_only_bytes(directory) -> bytes:
    """A WAV file: a container PyAV opens, without any video stream."""
    path = directory / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path.read_bytes()


def mixed_sizes_bytes(directory, frames_a: list[np.ndarray], frames_b: list[np.ndarray]) -> bytes:
    """Two MPEG-TS videos of different sizes, their bytes joined: the stream changes size midway."""
    return b"".join(video_bytes(directory, f"part{index}.ts", frames, codec="mpeg4")
                    for index, frames in enumerate((frames_a, frames_b)))
