"""The generated video: frames in memory and MP4 writing (H.264 through PyAV, 16 fps).

Writing goes to a temporary file beside the target and is renamed into place only when the
encoder has finished, so an error (or Ctrl-C) never leaves a half-written MP4 behind.

H.264 in 4:2:0 needs even sizes; a video with an odd height or width is written in 4:4:4
(``yuv444p``) so the file keeps exactly the requested size.  Every decoder that follows the
standard (ffmpeg, VLC, Chrome) plays it; some hardware players only play 4:2:0.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FPS = 16


def pixel_format(height: int, width: int) -> str:
    return "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"


def file_mode() -> int:
    """The mode a new file gets from ``open()``: 0o666 under the process umask.  ``mkstemp``
    makes its file 0600, which would keep the video from other users and web servers."""
    try:  # read without changing it: os.umask() sets the process-wide mask, a race in threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_mp4(
    path: str | os.PathLike, chunks: Iterable[np.ndarray], height: int, width: int, fps: int = FPS
) -> Path:
    """Encode uint8 frame chunks ``[n, height, width, 3]`` to ``path`` atomically."""
    import av  # imported here: decoding a video should not need the encoder at import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4.part", dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = width, height
            stream.pix_fmt = pixel_format(height, width)
            stream.options = {"crf": "17", "preset": "medium"}
            for chunk in chunks:
                for frame in chunk:
                    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                    container.mux(stream.encode(vf))
            container.mux(stream.encode())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode an MP4 into uint8 ``[frames, height, width, 3]`` (for tests and tools)."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames)


@dataclass
class Video:
    frames: np.ndarray  # uint8 [num_frames, height, width, 3]
    seed: int
    fps: int = FPS
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    peak_memory: dict[str, int] = field(default_factory=dict)  # bytes per phase
    params: dict | None = None
    latents: Any = None  # final fp32 latents [1, 16, F', h, w] (a torch.Tensor)
    path: Path | None = None  # set when the frames were streamed to a file
    stats: dict[str, Any] = field(default_factory=dict)  # DiT forwards run / skipped, CFG mode
    # Of the phases' time, seconds spent reading and preparing weights: the first call's
    # loading (``wanlite.load`` reads headers only), and every call's with offload on.
    weights_seconds: float = 0.0

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]

    def save(self, path: str | os.PathLike) -> Path:
        return write_mp4(path, [self.frames], self.height, self.width, self.fps)
