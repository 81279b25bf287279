"""Names of places: the default checkpoint and wanlite's cache folder (no torch here)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # hub id of the checkpoint loaded by default


def cache_dir() -> Path:
    """Random checkpoints and prompt embeddings live here (``WANLITE_CACHE`` overrides)."""
    return Path(os.environ.get("WANLITE_CACHE", Path.home() / ".cache" / "wanlite"))
