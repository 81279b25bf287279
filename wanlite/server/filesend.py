"""Sending a result file from one open handle, so a delete cannot cut a download short.

Design
------
* Starlette's ``FileResponse`` looks the path up twice (``stat`` for the headers, then ``open``
  to send): a ``DELETE`` or a retention purge between the two gave a 500, or a 200 whose
  ``Content-Length`` promised bytes that never came.  Here the route opens the file once
  (:func:`open_result`: None, so a 404, if it is gone), and the response takes its size from
  that handle (``fstat``) and sends from it: on POSIX an unlinked file stays readable through
  an open handle, so a download that started ends whole.
* ``HEAD`` and one byte range (``Range: bytes=a-b``, ``a-``, ``-n``; 206, or 416 outside the
  file) are answered as ``FileResponse`` did, for ``<video>`` seeking; several ranges get the
  whole file (a 200 is always allowed).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

import anyio
from starlette.responses import Response

CHUNK = 64 * 1024
_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})", re.ASCII)


def open_result(results_dir: Path, name: str) -> BinaryIO | None:
    """The result file ``name`` directly in ``results_dir``, opened; None if it is not there."""
    path = Path(results_dir) / name
    if path.parent.resolve() != Path(results_dir).resolve() or path.name != name:
        return None
    try:
        f = open(path, "rb")  # noqa: SIM115 - the response closes it
    except OSError:  # gone (deleted meanwhile), a folder, unreadable: no such result
        return None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        return None
    return f


def byte_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """The inclusive (first, last) byte of a single ``Range`` header; None: send everything;
    False: not satisfiable (416)."""
    m = _RANGE.fullmatch(header.strip()) if header else None
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # the last n bytes
        n = int(m.group(2))
        return (max(size - n, 0), size - 1) if n > 0 and size > 0 else False
    first = int(m.group(1))
    last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    return (first, last) if first <= last else False


class OpenFileResponse(Response):
    """A file sent from an open handle (closed when sent, or when the client left)."""

    def __init__(self, f: BinaryIO, media_type: str, filename: str, method: str, range_: str):
        self.file, self.send_body = f, method != "HEAD"
        size = os.fstat(f.fileno()).st_size
        self.status_code, self.background = 200, None
        self.first, self.length = 0, size
        headers = [
            (b"content-type", media_type.encode("latin-1")),
            (b"content-disposition", f'attachment; filename="{filename}"'.encode("latin-1")),
            (b"accept-ranges", b"bytes"),
        ]
        span = byte_range(range_, size)
        if span is False:
            self.status_code, self.length = 416, 0
            headers.append((b"content-range", f"bytes */{size}".encode()))
        elif span is not None:
            self.status_code, (self.first, last) = 206, span
            self.length = last - self.first + 1
            headers.append((b"content-range", f"bytes {self.first}-{last}/{size}".encode()))
        headers.append((b"content-length", str(self.length).encode()))
        self.raw_headers = headers

    async def __call__(self, scope, receive, send) -> None:
        try:
            start = {"type": "http.response.start", "status": self.status_code}
            await send({**start, "headers": self.raw_headers})
            left = self.length if self.send_body else 0
            if left:
                await anyio.to_thread.run_sync(self.file.seek, self.first)
            while left > 0:
                chunk = await anyio.to_thread.run_sync(self.file.read, min(CHUNK, left))
                if not chunk:  # the file shrank under us: end the body short (never hang)
                    break
                left -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
            if left != 0 or not self.send_body or not self.length:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.file.close()
