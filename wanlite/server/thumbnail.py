"""A JPEG of a result's middle frame (``GET /v1/videos/{id}/content?variant=thumbnail``).

Made on request from the MP4 (PyAV, already a dependency for writing the videos): decoding
stops at the middle frame, so it costs half a decode of one video, and nothing is stored that
retention or a delete would have to clean up.  JPEG needs the full-range ``yuvj`` formats; 4:4:4
keeps odd sizes (which 4:2:0 cannot hold) exact.  The route passes the file it opened (so a
delete meanwhile cannot make it vanish half-read); a path works too.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import BinaryIO


def _middle_frame(source: str | BinaryIO):
    import av

    with av.open(source) as container:
        stream = container.streams.video[0]
        middle = max(stream.frames, 1) // 2  # the MP4 header knows the count
        picked = None
        for i, frame in enumerate(container.decode(stream)):
            picked = frame
            if i >= middle:
                break
        if picked is None:
            raise ValueError("the video has no frames")
        return picked.reformat(format="yuvj444p")


def middle_frame_jpeg(source: str | Path | BinaryIO, quality: int = 3) -> bytes:
    """The JPEG bytes of the middle frame of an MP4 (a path or an open binary file;
    ``quality``: ffmpeg's qscale, 2 best .. 31 worst)."""
    import av

    frame = _middle_frame(str(source) if isinstance(source, (str, Path)) else source)
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height = frame.width, frame.height
    codec.pix_fmt = "yuvj444p"
    codec.time_base = Fraction(1, 16)
    codec.qscale = quality
    frame.pts, frame.time_base = 0, codec.time_base
    packets = [*codec.encode(frame), *codec.encode(None)]
    return b"".join(bytes(p) for p in packets)
