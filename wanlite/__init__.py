"""wanlite: a small, fast, low-memory inference engine for Wan2.1 text-to-video 1.3B.

import wanlite
pipe = wanlite.load("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")   # or a local folder, or random:tiny
video = pipe.generate(prompt="a red fox running through snow", seed=42)
video.save("fox.mp4")

Paths may be ``str`` or ``pathlib.Path``, dtypes names or ``torch.dtype``; a bad request or
option raises ``wanlite.ParamError`` (a ValueError whose ``field`` names the culprit).
"""

from .options import Options
from .params import GenerationParams, ParamError, json_schema, validate
from .video import Video

__all__ = [
    "Cancelled",
    "GenerationParams",
    "Options",
    "ParamError",
    "Pipeline",
    "Video",
    "json_schema",
    "load",
    "validate",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline (and torch model code) loads on first use, so `wanlite schema` stays light.
    if name in ("Cancelled", "Pipeline", "load"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'wanlite' has no attribute {name!r}")
