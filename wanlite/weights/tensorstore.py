"""Read tensors from safetensors files: plain reads, casts through a memory map, or in place.

Three ways, each for one use:

- ``get(key)``: a plain read into a new tensor.  For streaming weights (the text encoder a layer
  at a time, DiT blocks just in time) we want exactly the bytes asked for in anonymous memory,
  freed as soon as the tensor is dropped, with the page cache (not RSS) holding the file.  A
  memory map (``safe_open``) would keep every page it touched in the process's RSS until closed.
- ``get(key, dtype)`` with another floating dtype: the cast reads straight from a memory map of
  the file (one pass, no full-precision copy in anonymous memory), and the mapped range is then
  dropped from the process (``MADV_DONTNEED``; the page cache keeps it).
- ``view(key)``: the tensor *in place* in a private memory map, no copy at all, for weights used
  as stored by a resident module.  Its pages count in RSS once touched (as a copy would), but
  they are clean file pages the kernel can reclaim; ``unmap()`` drops them.

Format (safetensors): 8-byte little-endian header size N, N bytes of JSON
``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then data.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """(entries by key, metadata) of one safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    entries = {}
    for key, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path.name}:{key}: unsupported dtype {info['dtype']}")
        dtype = DTYPES[info["dtype"]]
        entries[key] = Entry(path, dtype, tuple(info["shape"]), 8 + n + begin, end - begin)
    return entries, meta


class TensorStore:
    """Every tensor of a set of safetensors files, read on demand."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, Entry] = {}
        self.metadata: dict[str, str] = {}
        for path in files:
            entries, meta = read_header(path)
            self.entries.update(entries)
            self.metadata.update(meta)
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            return self._fd_unlocked(path)

    def _read_into(self, e: Entry, out: torch.Tensor, offset: int) -> torch.Tensor:
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(buf):  # pread may return short reads for very large tensors
            n = os.preadv(self._fd(e.path), [buf[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{e.path}: unexpected end of file")
            done += n
        return out

    def _map(self, path: Path) -> mmap.mmap:
        with self._lock:
            if path not in self._maps:  # private (copy-on-write): torch wants a writable buffer
                self._maps[path] = mmap.mmap(self._fd_unlocked(path), 0, access=mmap.ACCESS_COPY)
            return self._maps[path]

    def _fd_unlocked(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def view(self, key: str) -> torch.Tensor:
        """The tensor in place in the file's memory map (no copy; see the module docstring)."""
        e = self.entries[key]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        self._populate(e)
        n = e.nbytes // e.dtype.itemsize
        flat = torch.frombuffer(self._map(e.path), dtype=e.dtype, count=n, offset=e.offset)
        return flat.view(e.shape)

    @contextlib.contextmanager
    def mapped(self, key: str):
        """``view(key)`` for one pass (merging a LoRA into it): its pages are dropped from the
        process afterwards, as after a cast (the page cache keeps them)."""
        try:
            yield self.view(key)
        finally:
            self.drop(key)

    def drop(self, key: str) -> None:
        """Drop ``key``'s mapped pages from this process (after a one-pass use of its view)."""
        self._drop(self.entries[key])

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new tensor: as stored, or cast to the floating ``dtype`` while it is read."""
        e = self.entries[key]
        if dtype is None or dtype == e.dtype or not (_is_float(dtype) and _is_float(e.dtype)):
            return self._read_into(e, torch.empty(e.shape, dtype=e.dtype), e.offset)
        out = self.view(key).to(dtype)
        self._drop(e)
        return out

    def _populate(self, e: Entry) -> None:
        """Map ``e``'s pages in one call (Linux ``MADV_POPULATE_READ``) instead of one page
        fault per 4 KiB on first touch: in a new process, faulting a large tensor page by page
        took several times as long as the cast that reads it.  Skipped where unsupported."""
        if not sys.platform.startswith("linux"):
            return
        page = mmap.PAGESIZE
        start = e.offset // page * page
        with contextlib.suppress(OSError, ValueError):  # kernels before 5.14: plain faults
            self._map(e.path).madvise(MADV_POPULATE_READ, start, e.offset + e.nbytes - start)

    def _drop(self, e: Entry) -> None:
        """Unmap the whole pages of ``e``'s bytes from this process (the page cache keeps them)."""
        page = mmap.PAGESIZE
        start = -(-e.offset // page) * page
        end = (e.offset + e.nbytes) // page * page
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._map(e.path).madvise(mmap.MADV_DONTNEED, start, end - start)

    def unmap(self) -> None:
        """Close the memory maps: tensors from ``view`` must no longer be in use."""
        with self._lock:
            for m in self._maps.values():
                with contextlib.suppress(BufferError):  # a view still exported: it stays
                    m.close()
            self._maps.clear()

    def get_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """Rows of a 2-D tensor (e.g. token embeddings) without reading the rest."""
        e = self.entries[key]
        row_bytes = e.nbytes // e.shape[0]
        out = torch.empty((len(rows), *e.shape[1:]), dtype=e.dtype)
        for i, r in enumerate(rows):
            if not 0 <= r < e.shape[0]:
                raise IndexError(f"{key}: row {r} out of range [0, {e.shape[0]})")
            self._read_into(e, out[i], e.offset + r * row_bytes)
        return out

    def close(self) -> None:
        self.unmap()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux's value


def _is_float(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)


_LIBC = None


def drop_pages(address: int, nbytes: int) -> None:
    """Drop the whole pages of ``[address, address + nbytes)`` -- part of a *file* mapping that
    was only read -- from this process (``MADV_DONTNEED``: they come back from the file if
    touched again; the page cache keeps them).  For maps we do not own as ``mmap`` objects
    (``torch.load(mmap=True)``, numpy memmaps).  A no-op where madvise is not available."""
    global _LIBC
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    if end <= start:
        return
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _LIBC.madvise(start, end - start, mmap.MADV_DONTNEED)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component: from the shard index if there is one."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{folder}: several shard indexes {[p.name for p in indexes]}")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ValueError(f"{indexes[0]}: shard files missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        what = "no" if not files else "several unindexed"
        raise ValueError(f"{folder}: {what} .safetensors weight files ({[p.name for p in files]})")
    return files
