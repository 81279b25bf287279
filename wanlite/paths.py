"""Names of places: the default checkpoint and wanlite's cache folder (no torch here)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # hub id of the checkpoint loaded by default


def cache_dir() -> Path:
    """Random checkpoints, prompt embeddings and cast weights live here: ``$WANLITE_CACHE``
    if set, else ``$XDG_CACHE_HOME/wanlite`` (the XDG base directory spec; an empty or
    relative value is ignored, as the spec says), else ``~/.cache/wanlite``."""
    if os.environ.get("WANLITE_CACHE"):
        return Path(os.environ["WANLITE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "wanlite"
