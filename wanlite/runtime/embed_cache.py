"""Prompt-embedding cache: in memory (LRU) and on disk, keyed by model, prompt and length.

A repeated prompt, and the default negative prompt, skip the text encoder entirely -- the
encoder is the largest part of the model (umT5-XXL, 5.7 B parameters).  Entries hold the
encoder output at the prompt's real tokens only ([n, d_model], before zero-padding to 512).

The key covers everything the values depend on: the text encoder's files (path, size,
modification time), the quantization and compute dtype, the cleaned prompt and the maximum
length.  Disk entries are written atomically (temp file + rename) under
``<cache dir>/embeddings/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..paths import cache_dir

log = logging.getLogger(__name__)
MEMORY_ENTRIES = 64


class EmbeddingCache:
    def __init__(self, files: list[Path], quant: str, dtype: torch.dtype, disk: bool = True):
        """``files``: the text encoder's (a folder's ``text_encoder/`` or a single file);
        ``quant``: the quantization of the text encoder that actually runs (as stored)."""
        stats = sorted(
            (str(Path(p).resolve()), Path(p).stat().st_size, int(Path(p).stat().st_mtime))
            for p in files
        )
        ident = {"files": stats, "quant": quant, "dtype": str(dtype)}
        self.model_key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()
        self.dtype = dtype
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.folder = cache_dir() / "embeddings" if disk else None
        self.hits = self.misses = 0

    def _key(self, text: str, max_length: int) -> str:
        return hashlib.sha256(f"{self.model_key}\0{max_length}\0{text}".encode()).hexdigest()

    def get(self, text: str, max_length: int = 512) -> torch.Tensor | None:
        key = self._key(text, max_length)
        if key in self.memory:
            self.memory.move_to_end(key)
            self.hits += 1
            return self.memory[key]
        if self.folder is not None and (self.folder / f"{key}.safetensors").is_file():
            try:
                value = load_file(self.folder / f"{key}.safetensors")["embedding"]
            except Exception as e:  # a damaged entry is a miss, not an error
                log.warning("ignoring unreadable embedding cache entry %s: %s", key[:12], e)
            else:
                self._remember(key, value)
                self.hits += 1
                return value
        self.misses += 1
        return None

    def put(self, text: str, value: torch.Tensor, max_length: int = 512) -> None:
        key = self._key(text, max_length)
        value = value.to("cpu", self.dtype).contiguous()
        self._remember(key, value)
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".part")
            os.close(fd)
            save_file({"embedding": value}, tmp)
            os.replace(tmp, self.folder / f"{key}.safetensors")
        except OSError as e:  # a read-only or full cache disk only costs speed
            log.warning("could not write the embedding cache: %s", e)

    def _remember(self, key: str, value: torch.Tensor) -> None:
        self.memory[key] = value
        self.memory.move_to_end(key)
        while len(self.memory) > MEMORY_ENTRIES:
            self.memory.popitem(last=False)
