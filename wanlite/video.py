"""The generated video: frames in memory and MP4 writing (H.264 through PyAV, 16 fps).

Writing goes to a temporary file beside the target and is renamed into place only when the
encoder has finished, so an error (or Ctrl-C) never leaves a half-written MP4 behind.

H.264 in 4:2:0 needs even sizes; a video with an odd height or width is written in 4:4:4
(``yuv444p``) so the file keeps exactly the requested size.  Every decoder that follows the
standard (ffmpeg, VLC, Chrome) plays it; some hardware players only play 4:2:0.

How a video was made (``Video.metadata``: the request with the seed used, the model, wanlite's
version; ``made_by``) goes into the MP4's container tags: ``title`` the prompt, ``comment`` the
whole dict as JSON.  Those two are standard MP4 (iTunes-style) tags that ffmpeg's muxer keeps
without ``movflags=use_metadata_tags`` (which would move every tag to QuickTime ``mdta`` keys
that players do not show as a title), so ``ffprobe`` and PyAV's ``container.metadata`` show
them, and ``read_metadata`` gives the dict back.  ``encoder`` cannot carry it: libavformat
overwrites that tag with its own name.
"""

from __future__ import annotations

import json
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


def made_by(params: dict[str, Any], seed: int, model: str | None = None) -> dict[str, Any]:
    """How a video was made, as ``Video.metadata`` holds it: the request (``params``, from
    ``GenerationParams.to_dict()``) with the ``seed`` used, the ``model`` and wanlite's version."""
    from . import __version__  # here: the package imports this module

    out = {**params, "seed": seed}
    if model:
        out["model"] = model
    return out | {"wanlite": __version__}


def mp4_tags(metadata: dict[str, Any]) -> dict[str, str]:
    """The MP4 container tags for ``metadata``: ``title`` (the prompt) and ``comment`` (JSON)."""
    if not metadata:
        return {}
    tags = {"comment": json.dumps(metadata, ensure_ascii=False, default=str)}  # a Path: str
    if isinstance(metadata.get("prompt"), str):
        tags["title"] = metadata["prompt"]
    return tags


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``Video.metadata`` as written into the MP4 at ``path`` ({} for an MP4 without it)."""
    import av

    with av.open(str(path)) as container:
        comment = container.metadata.get("comment", "")
    try:
        out = json.loads(comment)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def move_into_place(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = True) -> None:
    """Rename ``src`` to ``dst`` (in the same folder).  ``overwrite=False`` never replaces a
    file, even one made a moment ago by another process: the name is first taken with
    ``O_EXCL`` (FileExistsError if it exists), then atomically replaced by ``src``."""
    if not overwrite:
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.replace(src, dst)
    except BaseException:
        if not overwrite:  # the empty file that held the name
            Path(dst).unlink(missing_ok=True)
        raise


def write_mp4(
    path: str | os.PathLike,
    chunks: Iterable[np.ndarray],
    height: int,
    width: int,
    fps: int = FPS,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Encode uint8 frame chunks ``[n, height, width, 3]`` to ``path`` atomically, with
    ``metadata`` in its tags (``mp4_tags``).  ``overwrite=False``: FileExistsError, before any
    encoding, if ``path`` exists (and at the end if it appeared meanwhile)."""
    import av  # imported here: decoding a video should not need the encoder at import time

    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists (not replaced)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4.part", dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            _encode(container, chunks, height, width, fps, metadata, live=False)
        os.chmod(tmp, file_mode())
        move_into_place(tmp, path, overwrite)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# A fragmented MP4: an empty 'moov' first, then one 'moof'+'mdat' fragment per frame, each
# written out when the next frame arrives (the muxer needs it for the frame's duration).  A
# reader (a player, MediaSource in a browser) can play the fragments written so far, and a file
# cut off by a crash plays up to its last whole fragment.
FRAGMENTED = {"movflags": "frag_every_frame+empty_moov+default_base_moof", "flush_packets": "1"}


def write_fragmented_mp4(
    path: str | os.PathLike,
    chunks: Iterable[np.ndarray],
    height: int,
    width: int,
    fps: int = FPS,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Encode frame chunks to ``path`` *in place* as they arrive, one fragment per frame (a
    keyframe at each chunk; no encoder look-ahead, so a chunk is on disk, all but its last
    frame, as soon as it is given): the file is playable while it grows and after an
    interruption.  The name is taken first (``overwrite=False``: FileExistsError if it exists,
    never replaced)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    os.close(os.open(path, flags, file_mode()))
    with av.open(str(path), mode="w", format="mp4", options=FRAGMENTED) as container:
        _encode(container, chunks, height, width, fps, metadata, live=True)
    return path


def _encode(container, chunks, height: int, width: int, fps: int, metadata, live: bool) -> None:
    """H.264 in ``container``; ``live``: a keyframe at each chunk and no look-ahead or B-frames
    (x264's zerolatency), so each chunk leaves the encoder with its last frame."""
    import av

    container.metadata.update(mp4_tags(metadata or {}))
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = width, height
    stream.pix_fmt = pixel_format(height, width)
    stream.options = {"crf": "17", "preset": "medium"}
    if live:
        stream.options |= {"tune": "zerolatency", "x264-params": "forced-idr=1"}
    for chunk in chunks:
        for i, frame in enumerate(chunk):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if live and i == 0:
                vf.pict_type = av.video.frame.PictureType.I
            container.mux(stream.encode(vf))
    container.mux(stream.encode())


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode an MP4 into uint8 ``[frames, height, width, 3]`` (for tests and tools)."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames)


def frames_uint8(frames) -> np.ndarray:
    """uint8 [F, H, W, 3] from the frames of any ``output_type``: uint8 or float [0, 1] arrays
    [F, H, W, 3], a float tensor [F, 3, H, W] ("pt") or a list of PIL images ("pil")."""
    if isinstance(frames, list):
        return np.stack([np.asarray(im.convert("RGB")) for im in frames])
    if not isinstance(frames, np.ndarray):  # a torch tensor [F, 3, H, W]
        frames = frames.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    if frames.dtype != np.uint8:
        frames = (frames.astype(np.float32) * 255).round().clip(0, 255).astype(np.uint8)
    return frames


def frame_size(frames) -> tuple[int, int]:
    """(height, width) of the frames of any ``output_type`` (see ``frames_uint8``)."""
    if isinstance(frames, list):
        return frames[0].height, frames[0].width
    if not isinstance(frames, np.ndarray):  # a torch tensor [F, 3, H, W]
        return tuple(frames.shape[2:4])
    return frames.shape[1], frames.shape[2]


@dataclass
class Video:
    # uint8 [num_frames, height, width, 3]; with generate(output_type=...) "np": float32
    # [F, H, W, 3] in [0, 1], "pt": a float tensor [F, 3, H, W], "pil": a list of PIL images
    frames: Any
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
    # Blocks streamed from disk (offload "blocks"): seconds the prefetch thread spent reading
    # them, beside the compute (not part of the phases' time), and seconds the compute waited
    # for a block that was not read yet (part of them).
    prefetch_seconds: float = 0.0
    prefetch_wait_seconds: float = 0.0
    # How it was made (``made_by``: request, seed, model, wanlite version; filled by the
    # pipeline), written into the MP4's tags by ``save``; add keys of your own if you like.
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def height(self) -> int:
        return frame_size(self.frames)[0]

    @property
    def width(self) -> int:
        return frame_size(self.frames)[1]

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write an MP4 (H.264) carrying ``metadata``; ``overwrite=False`` refuses to replace
        an existing file (FileExistsError)."""
        chunks, h, w = [frames_uint8(self.frames)], self.height, self.width
        return write_mp4(path, chunks, h, w, self.fps, self.metadata, overwrite)
