"""Read tensors from a torch ``.pth`` file (the original ``Wan2.1_VAE.pth``,
``models_t5_umt5-xxl-enc-bf16.pth``) through the ``TensorStore`` interface.

Safety: ``torch.load(weights_only=True)`` -- the restricted unpickler that builds tensors and
plain containers only; a pickle that asks for anything else is refused, never run.

Memory: ``mmap=True`` maps the file instead of reading it, so opening an 11 GB ``.pth`` costs
only its pickle (the key list), and a tensor's bytes are read when it is asked for.  Reads
copy (``get``) or cast (``get(key, dtype)``) out of the map and then drop the pages they
touched from the process (``drop_pages``; the page cache keeps them), as ``TensorStore`` does
for safetensors: a streamed umT5 does not leave the whole file mapped in RSS.  ``view`` hands
out the mapped tensor itself (no copy); ``unmap`` forgets the map (re-opened on next use).

Only the zip format (``torch.save`` since 1.6) can be mapped; a legacy pickle is a
``ValueError`` saying how to re-save it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from .tensorstore import Entry, drop_pages

# A state dict is sometimes saved inside a wrapper dict under one of these keys.
_WRAPPERS = ("state_dict", "model", "module", "model_state_dict")
# Causal (frame-autoregressive) Wan checkpoints keep the DiT under these keys, the EMA weights
# first, as Self-Forcing's inference.py reads them (``generator_ema`` with --use_ema, else
# ``generator``; CausVid saves ``generator``), with Wan's own names under a ``model.`` prefix.
CAUSAL_WRAPPERS = ("generator_ema", "generator")


def causal_wrapper(obj) -> str | None:
    """The key under which a causal checkpoint keeps its DiT, or None."""
    if isinstance(obj, dict):
        for key in CAUSAL_WRAPPERS:
            if isinstance(obj.get(key), dict):
                return key
    return None


def _state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if (key := causal_wrapper(obj)) is not None:
        obj = obj[key]
    elif isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in _WRAPPERS:
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict (found a {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}")
    return obj


class _Name(str):
    """torch.load takes any path ending in ``.safetensors`` for a safetensors file, whatever
    it holds; the content decides here (``formats.container``), never the name."""

    def endswith(self, *args) -> bool:
        return False


def load_mapped(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of ``path`` with every tensor in a memory map of the file."""
    try:
        obj = torch.load(_Name(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "zipfile" in str(e) or "zip" in str(e).lower():
            raise ValueError(
                f"{path}: a legacy (non-zip) torch pickle, which cannot be memory-mapped; "
                "re-save it with torch.save(torch.load(path, weights_only=True), new_path)"
            ) from e
        raise
    except Exception as e:  # UnpicklingError: something other than tensors in the pickle
        raise ValueError(f"{path}: not a loadable weights-only torch file ({e})") from e
    return _state_dict(obj, path)


def is_causal_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a torch pickle holding a causal DiT (``CAUSAL_WRAPPERS``).  Cheap: the
    file is mapped, only its pickle (the key list) is read."""
    try:
        obj = torch.load(_Name(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip torch pickle (a safetensors file, say): not one of these
        return False
    return causal_wrapper(obj) is not None


class PthStore:
    """Every tensor of one ``.pth`` file, read on demand (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._sd: dict[str, torch.Tensor] | None = load_mapped(self.path)
        self.metadata: dict[str, str] = {}
        self.entries = {
            k: Entry(self.path, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
            for k, t in self._sd.items()
        }

    def _mapped(self, key: str) -> torch.Tensor:
        with self._lock:
            if self._sd is None:
                self._sd = load_mapped(self.path)
            return self._sd[key]

    def view(self, key: str) -> torch.Tensor:
        """The tensor in place in the file's map (no copy)."""
        return self._mapped(key)

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new tensor: as stored, or cast to ``dtype`` while read out of the map."""
        t = self._mapped(key)
        out = t.to(dtype, copy=True) if dtype is not None else t.clone()
        _drop(t)
        return out.contiguous()

    def get_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        t = self._mapped(key)
        for r in rows:
            if not 0 <= r < t.shape[0]:
                raise IndexError(f"{key}: row {r} out of range [0, {t.shape[0]})")
        return t[torch.tensor(rows, dtype=torch.long)].contiguous()

    def unmap(self) -> None:
        """Forget the map (tensors from ``view`` keep their part of it alive)."""
        with self._lock:
            self._sd = None

    def close(self) -> None:
        self.unmap()


def _drop(t: torch.Tensor) -> None:
    if t.numel():
        drop_pages(t.data_ptr(), t.numel() * t.element_size())
