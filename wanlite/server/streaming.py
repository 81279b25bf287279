"""A causal model's job, served while it grows: the worker's side (the stream file, the chunk
events, the final result) and the HTTP side (a response that follows the growing file).

Design
------
* The worker writes each finished chunk into ``results/.<id>.live.mp4.part`` with
  :func:`wanlite.video.write_fragmented_mp4` (an empty ``moov``, then one ``moof``+``mdat`` per
  frame; 0600 like every server file).  Each attempt of a job writes a new file (a new inode:
  the old name is unlinked first), so a reader of an earlier, killed attempt never sees it
  change under it.  After each chunk it publishes ``media_generation_chunk`` (frames done and
  total, the stream URL, the ``codecs`` string read from the file's ``avcC``).  When the stream
  is complete the file is re-muxed (packets copied, no re-encode) into an ordinary MP4,
  ``results/<id>.mp4``, the result as for any job; the live file is removed once the store
  says succeeded.  A failed, cancelled or interrupted attempt removes its live file.
* ``GET /api/ai/results/<id>.stream.mp4`` (:class:`GrowingFileResponse`): while the job runs,
  the live file's bytes as a chunked body, then more as the worker writes them, **whole
  top-level boxes only** (a fragment cut by a crash is never sent), until the job ends, the
  file is replaced (the job restarted: the body ends, the client asks again), nothing is
  written for :data:`IDLE_SECONDS`, the client leaves, or the server stops.  The response says
  ``X-Wanlite-Stream: partial``: a stream is never the finished video; the result is.  Once
  the job succeeded the same URL serves the finished file (``X-Wanlite-Stream: complete``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import anyio
from starlette.responses import Response

from .private import private_file

log = logging.getLogger("wanlite.server")

CHUNK = "media_generation_chunk"
POLL_SECONDS = 0.1  # how often a reader looks for new bytes
STATE_SECONDS = 0.5  # how often a reader with nothing new asks the store about the job
IDLE_SECONDS = 600.0  # a stream with no new bytes this long ends (the client may ask again)
SEND = 64 * 1024


def live_name(gen_id: str) -> str:
    """The stream file of ``gen_id``: hidden, and a ``.part`` (swept at start after a crash)."""
    return f".{gen_id}.live.mp4.part"


def stream_path(gen_id: str) -> str:
    return f"/api/ai/results/{gen_id}.stream.mp4"


# -- reading the file's boxes -----------------------------------------------------------------
def whole_boxes_end(fd: int, start: int, size: int) -> int:
    """The end of the last complete top-level MP4 box at or after ``start`` (a box boundary)
    within the first ``size`` bytes of ``fd``: what may be sent without cutting a box."""
    end = start
    while end + 8 <= size:
        n, kind = struct.unpack(">I4s", os.pread(fd, 8, end))
        if n == 1:  # a 64-bit size follows the type
            if end + 16 > size:
                break
            n = struct.unpack(">Q", os.pread(fd, 8, end + 8))[0]
        if n < 8 or end + n > size:  # n == 0 ("to the end of file") is never written here
            break
        end += n
    return end


def codecs_of(path: str | os.PathLike) -> str | None:
    """The RFC 6381 codecs string of an H.264 MP4's first track (``avc1.PPCCLL`` from its
    ``avcC`` box: profile, constraint flags, level), for ``MediaSource.isTypeSupported``."""
    with open(path, "rb") as f:
        head = f.read(64 * 1024)  # the moov of an empty_moov file: a few hundred bytes
    i = head.find(b"avcC")
    if i < 0 or i + 8 > len(head):
        return None
    profile, flags, level = head[i + 5], head[i + 6], head[i + 7]  # after configurationVersion
    return f"avc1.{profile:02x}{flags:02x}{level:02x}"


def remux(src: Path, dst: Path) -> None:
    """Copy ``src``'s video packets (a fragmented MP4) into an ordinary MP4 at ``dst``, written
    beside it and renamed into place (0600): the finished result, with its duration in
    ``moov`` for every player."""
    import av

    tmp = dst.with_name(f".{dst.stem}.{os.getpid()}.mp4.part")
    try:
        with av.open(str(src)) as inp, av.open(str(tmp), mode="w", format="mp4") as out:
            out.metadata.update(inp.metadata)
            ins = inp.streams.video[0]
            if hasattr(out, "add_stream_from_template"):  # PyAV >= 14
                outs = out.add_stream_from_template(ins)
            else:  # PyAV 12-13 (pyproject: av>=12)
                outs = out.add_stream(template=ins)
            for packet in inp.demux(ins):
                if packet.dts is None:  # the demuxer's flush packet
                    continue
                packet.stream = outs
                out.mux(packet)
        private_file(tmp)
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)


# -- the worker's side ------------------------------------------------------------------------
def stream_params(pipe, params: dict[str, Any]) -> dict[str, Any]:
    """``pipe.stream``'s arguments for a stored request.  The hosted schema's defaults (30
    steps, guidance 5) are a bidirectional model's: a causal model runs its own step list
    (1-4 steps: a request of more gets all of them) without CFG (guidance is not used)."""
    from wanlite.causal import SELF_FORCING

    steps = params["num_inference_steps"]
    out = {k: params[k] for k in ("prompt", "height", "width", "num_frames", "seed")}
    out["num_inference_steps"] = steps if steps <= len(SELF_FORCING.timesteps) else None
    return out


def unlink_if_ours(path: Path, ino: int | None) -> None:
    """Remove ``path`` if it is still the file this attempt made (another worker that took the
    job over has made its own by now)."""
    with contextlib.suppress(OSError):
        if ino is not None and os.stat(path).st_ino == ino:
            path.unlink()


def run_stream(
    pipe,
    row: dict[str, Any],
    results_dir: Path,
    check: Callable[[], None],
    on_chunk: Callable[[int, int, str | None], None],
) -> tuple[str, Path, int]:
    """Generate ``row`` chunk by chunk into its live file: (result file name, live path, the
    live file's inode).  ``check()`` raises to stop (before each chunk is written);
    ``on_chunk(frames_done, num_frames, codecs)`` runs once a chunk is in the file."""
    from wanlite.frames import model_label
    from wanlite.video import made_by, write_fragmented_mp4

    gen_id, params = row["id"], {**row["params"], "seed": row["seed"]}
    kw = stream_params(pipe, params)
    live = Path(results_dir) / live_name(gen_id)
    live.unlink(missing_ok=True)  # an earlier attempt's: readers keep their own (old) inode
    private_file(live, create=True)
    ino = os.stat(live).st_ino
    total, done, codecs = kw["num_frames"], 0, None

    def written() -> None:
        nonlocal codecs
        codecs = codecs or codecs_of(live)
        on_chunk(done, total, codecs)

    def chunks() -> Iterator:
        nonlocal done
        for chunk in pipe.stream(**kw, progress=False):
            check()
            if done:  # the writer asks for more: the chunk before is muxed and flushed
                written()
            yield chunk
            done += len(chunk)

    try:
        meta = made_by(kw | {"guidance_scale": 1.0}, row["seed"], model_label(pipe.source))
        h, w = kw["height"], kw["width"]
        write_fragmented_mp4(live, chunks(), h, w, metadata=meta, overwrite=True)
        written()  # the last chunk (the encoder flushed at close)
        result = f"{gen_id}.mp4"
        remux(live, Path(results_dir) / result)
    except BaseException:
        unlink_if_ours(live, ino)
        raise
    return result, live, ino


# -- the HTTP side ----------------------------------------------------------------------------
class GrowingFileResponse(Response):
    """The live file of a running job as it grows (see the module docstring).  ``state()`` is
    called (in a thread) when nothing new came: ``"running"``, ``"done"`` (succeeded: send
    the rest and end) or ``"ended"`` (failed, cancelled, gone: end)."""

    def __init__(self, f: BinaryIO, path: Path, state: Callable[[], str], method: str, stop):
        self.file, self.path, self.state, self.stop = f, path, state, stop
        self.send_body = method != "HEAD"
        self.status_code, self.background = 200, None
        self.raw_headers = [
            (b"content-type", b"video/mp4"),
            (b"x-wanlite-stream", b"partial"),
            (b"x-accel-buffering", b"no"),
        ]

    def _replaced(self) -> bool:
        """The live name now holds another attempt's file, or none."""
        try:
            return os.stat(self.path).st_ino != os.fstat(self.file.fileno()).st_ino
        except OSError:
            return True

    async def _follow(self, send) -> None:
        fd, sent = self.file.fileno(), 0
        last_new = checked = time.monotonic()
        final = False
        while True:
            size = os.fstat(fd).st_size
            end = whole_boxes_end(fd, sent, size)
            while sent < end:
                data = await anyio.to_thread.run_sync(os.pread, fd, min(SEND, end - sent), sent)
                sent += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": True})
                last_new = time.monotonic()
            if final or self.stop():
                return
            now = time.monotonic()
            if now - checked >= STATE_SECONDS:
                checked = now
                state = await anyio.to_thread.run_sync(self.state)
                if state == "done":
                    final = True  # one more pass: the rest, to the end of the file
                    continue
                if state == "ended" or now - last_new > IDLE_SECONDS:
                    return
                if self._replaced() and state == "running":  # rerun from the start
                    return
            await anyio.sleep(POLL_SECONDS)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if self.send_body:
                async with anyio.create_task_group() as tg:

                    async def gone() -> None:  # the client hung up: stop following
                        while (await receive())["type"] != "http.disconnect":
                            pass
                        tg.cancel_scope.cancel()

                    tg.start_soon(gone)
                    await self._follow(send)
                    tg.cancel_scope.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.file.close()
