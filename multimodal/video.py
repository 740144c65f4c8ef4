"""Video files -> frames: decoded with PyAV (`pip install "salamandra-vision[video]"`), sampled
uniformly over the whole video up to a number of frames (LLaVA-OneVision's `frames_upbound`: the
frames at `linspace(0, total - 1, upbound)`, rounded down; every frame when there are fewer)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

UNDECODABLE = "video_undecodable"
NO_FRAMES = "video_no_frames"
MIXED_SIZES = "video_mixed_sizes"


class VideoError(ValueError):
    """A video that cannot be used; `reason` is one of UNDECODABLE, NO_FRAMES, MIXED_SIZES."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def uniform_frame_indices(total: int, upbound: int) -> list[int]:
    """Which of `total` frames to keep: all of them, or `upbound` spread evenly from first to last."""
    if upbound < 1:
        raise ValueError(f"frames_upbound must be >= 1, got {upbound}")
    if total <= upbound:
        return list(range(total))
    return np.linspace(0, total - 1, upbound, dtype=int).tolist()


def read_video(source: str | Path | bytes, frames_upbound: int) -> list[Image.Image]:
    """The RGB frames of a video file (a path, or its bytes), sampled uniformly up to
    `frames_upbound`. VideoError when it cannot be decoded, has no frame, or its frames differ in size."""
    try:
        import av
    except ImportError as error:
        raise ImportError('reading video files needs PyAV: pip install "salamandra-vision[video]"') from error
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        total = _count_frames(av, source)
        if total == 0:
            raise VideoError(NO_FRAMES, f"{name}: the file has no video frame")
        keep = set(uniform_frame_indices(total, frames_upbound))
        frames, size = [], None
        with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if size is None:
                    size = (frame.width, frame.height)
                elif (frame.width, frame.height) != size:
                    raise VideoError(MIXED_SIZES, f"{name}: frame {index} is {frame.width}x{frame.height}, "
                                                  f"the first was {size[0]}x{size[1]}")
                if index in keep:
                    frames.append(frame.to_image().convert("RGB"))
    except VideoError:
        raise
    except (av.FFmpegError, IndexError, ValueError, OSError) as error:
        raise VideoError(UNDECODABLE, f"{name}: cannot decode the video: {error}") from None
    return frames


def _count_frames(av, source: str | Path | bytes) -> int:
    """Frames of the first video stream, decoded and counted (a container's own count may be absent
    or wrong, and sampling needs the true one)."""
    with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as container:
        if not container.streams.video:
            return 0
        return sum(1 for _ in container.decode(video=0))
