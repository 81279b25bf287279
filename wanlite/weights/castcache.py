"""A copy of a component's weights already cast to the compute dtype, kept in the cache folder.

Why: the diffusers repo ships the DiT in fp32 (5.68 GB) while it runs in bf16 (on GPUs, and on
CPUs with AMX / AVX512-BF16).  Casting on every load reads twice the bytes it keeps and writes
every weight once more: in a one-shot CLI call on a 2-core CPU that was the largest single cost
of the denoising phase.  So the first load that needs a *narrowing* cast (fp32 -> bf16 / fp16)
writes the cast tensors once to ``<cache>/cast/<component>-<key>.safetensors``; later loads use
them where they lie in that file's memory map (``TensorStore.view``: no copy) or read them with
plain reads (streamed blocks, GPUs) -- half the bytes of the fp32 source.

What it is and is not:

- The values are exactly what the cast gives (``fp32.to(bf16)``: round to nearest even), so a
  cached load is bit-identical to an uncached one.  Widening casts (a bf16 umT5 run in fp32)
  are never cached: that would only double the bytes to read.
- The key is a hash of the source files (absolute path, size, mtime) and of each tensor's
  target dtype, with a format version: a changed checkpoint or dtype gets a new file.  Old files
  are not pruned; they are named after the component, and deleting them is always safe.
- Not used for weights quantized in RAM (they are quantized from the full-precision source).
  A weight a LoRA changes is merged from its cached cast copy (summed with its deltas in fp32,
  then rounded again: half the bytes of the fp32 source to read, and the same double rounding
  as diffusers' bf16 ``fuse_lora``); with the cache off, from the fp32 source.
- Written to a temporary name and renamed into place, so a crash or a concurrent writer never
  leaves a partial file under the real name.  Skipped (with one log line) when the disk has too
  little room; ``Options(cast_cache="off")`` / ``--cast-cache off`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .tensorstore import DTYPES, TensorStore

__all__ = ["cached_casts", "plan", "MIN_BYTES"]
log = logging.getLogger(__name__)
VERSION = 1
MIN_BYTES = 256 * 2**20  # below this a cast costs too little to be worth a file
HEADROOM = 2 * 2**30  # disk left free after writing
_NAMES = {v: k for k, v in DTYPES.items()}


def _narrowing(stored: torch.dtype, target: torch.dtype) -> bool:
    floats = (torch.float32, torch.bfloat16, torch.float16)
    return stored in floats and target in floats and target.itemsize < stored.itemsize


def _key(component: str, store, casts: dict[str, tuple[str, torch.dtype]]) -> str | None:
    """A hash of the source files and the casts, or None when a source is not a plain file."""
    files = sorted({str(getattr(e, "path", "")) for e in store.entries.values()})
    stats = []
    for f in files:
        p = Path(f)
        if not f or not p.is_file():
            return None
        st = p.stat()
        stats.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    spec = {n: [k, str(t)] for n, (k, t) in sorted(casts.items())}
    blob = json.dumps([VERSION, component, stats, spec], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def plan(
    component: str, store, names: dict[str, str], target: Callable[[str], torch.dtype], root: Path
) -> tuple[Path, dict[str, tuple[str, torch.dtype]]] | None:
    """(cache file, {our name: (``store`` key, target dtype)}) for the parameters of ``names``
    (ours -> ``store`` key) whose stored dtype their ``target`` dtype narrows; None when there
    is too little to cast or a source is not a plain file."""
    casts = {}
    for name, key in names.items():
        e = store.entries.get(key)
        if e is not None and _narrowing(e.dtype, target(name)):
            casts[name] = (key, target(name))
    if not casts or _nbytes(store, casts) < MIN_BYTES:
        return None
    digest = _key(component, store, casts)
    return None if digest is None else (Path(root) / f"{component}-{digest}.safetensors", casts)


def cached_casts(
    component: str, store, names: dict[str, str], target: Callable[[str], torch.dtype], root: Path
) -> TensorStore | None:
    """The cast tensors of :func:`plan` keyed by our names: opened from the cache file when it
    was written before, else written now (cast tensor by tensor from ``store``).  None when
    there is nothing to cache or the disk is too full."""
    planned = plan(component, store, names, target, root)
    if planned is None:
        return None
    path, casts = planned
    if not path.is_file():
        need = _nbytes(store, casts)
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < need + HEADROOM:
            log.info("%s: no cast cache (%.1f GB free, %.1f GB needed)", component,
                     free / 1e9, (need + HEADROOM) / 1e9)  # fmt: skip
            return None
        t0 = time.perf_counter()
        _write(path, store, casts)
        took = time.perf_counter() - t0
        log.info("%s: wrote its cast weights to %s (%.1f GB, %.1f s); later loads map them "
                 "in place", component, path, need / 1e9, took)  # fmt: skip
    cached = TensorStore([path])
    want = {n: (t, store.entries[k].shape) for n, (k, t) in casts.items()}
    if {n: (e.dtype, e.shape) for n, e in cached.entries.items()} != want:  # a hand edit?
        log.warning("%s: cast cache %s does not match the checkpoint; not used", component, path)
        return None
    return cached


def _cast_nbytes(e, dtype: torch.dtype) -> int:
    return e.nbytes // e.dtype.itemsize * dtype.itemsize


def _nbytes(store, casts: dict[str, tuple[str, torch.dtype]]) -> int:
    return sum(_cast_nbytes(store.entries[k], t) for k, t in casts.values())


def _write(path: Path, store, casts: dict[str, tuple[str, torch.dtype]]) -> None:
    """A safetensors file of the cast tensors, one tensor in memory at a time."""
    header, offset = {}, 0
    for name, (key, dtype) in casts.items():
        e = store.entries[key]
        nbytes = _cast_nbytes(e, dtype)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(e.shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)  # the data starts 64-byte aligned
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for key, dtype in casts.values():
                t = store.get(key, dtype).contiguous()
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
