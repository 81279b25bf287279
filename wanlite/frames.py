"""The frames of a request: the size actually generated (``Plan``), its initial noise, and the
decoded video as each output type (``output_type``, diffusers' names).

Sizes that the model cannot make directly are generated at the next valid size and cut back:
height and width round up to a multiple of 16 (VAE stride 8 x patch 2) and are center-cropped;
the frame count rounds up to 4k+1 (VAE temporal stride 4) and the extra frames at the end are
dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .models.configs import ModelConfig
from .params import GenerationParams, ParamError
from .weights.loading import ModelSource

OUTPUT_TYPES = ("frames", "np", "pt", "pil", "latent")  # see the module docstring


@dataclass(frozen=True)
class Plan:
    """The size actually generated for a request, and how it is cut back."""

    height: int
    width: int
    num_frames: int
    latent_shape: tuple[int, int, int, int]  # (channels, frames, height, width)

    @classmethod
    def for_request(cls, p: GenerationParams, cfg: ModelConfig) -> Plan:
        s = cfg.vae.spatial_stride * cfg.dit.patch_size[1]
        ts = cfg.vae.temporal_stride
        h, w = -(-p.height // s) * s, -(-p.width // s) * s
        f = -(-(p.num_frames - 1) // ts) * ts + 1
        vs = cfg.vae.spatial_stride
        shape = (cfg.dit.in_channels, (f - 1) // ts + 1, h // vs, w // vs)
        return cls(h, w, f, shape)


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """fp32 noise from a CPU generator, exactly as diffusers draws it for a CPU generator."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=g, dtype=torch.float32)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] on any device -> uint8 [T, H, W, 3] on the host (x/2 + 0.5,
    clamped, rounded).  The rounding runs on the device; only uint8 crosses to the host."""
    x = (video[0].float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def to_float(video: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> float32 [T, H, W, 3] in [0, 1] on the host (x/2 + 0.5,
    clamped: diffusers' ``VideoProcessor.postprocess_video`` for "np")."""
    x = (video[0].float() / 2 + 0.5).clamp(0, 1)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def _pil_image():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("output_type='pil' needs Pillow: pip install 'wanlite[pil]'") from e
    return Image


def as_output(frames: np.ndarray, output_type: str):
    """Decoded frames (uint8, or float32 for "np" / "pt": [F, H, W, 3]) as ``output_type``."""
    if output_type == "pt":  # [F, 3, H, W], as diffusers' "pt" for one video
        return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    if output_type == "pil":
        image = _pil_image()
        return [image.fromarray(f) for f in frames]  # uint8 [H, W, 3] -> an RGB image
    return frames


def check_output(output_type, save_to) -> None:
    """ParamError (or ImportError for "pil" without Pillow) before any model work."""
    if output_type not in OUTPUT_TYPES:
        msg = f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}"
        raise ParamError(msg, "output_type")
    if save_to is not None and output_type != "frames":
        msg = "save_to writes an MP4 as frames are decoded: it needs output_type 'frames', "
        msg += f"not {output_type!r} (call video.save() on the result instead)"
        raise ParamError(msg, "save_to")
    if output_type == "pil":
        _pil_image()


def counted(chunks, total: int, on_decode: Callable[[int, int], None]):
    """``chunks`` passed through, calling ``on_decode(frames so far, total)`` after each."""
    n = 0
    for c in chunks:
        n += len(c)
        on_decode(n, total)
        yield c


def model_label(source: ModelSource) -> str:
    """A short name of the model for a video's metadata: the hub id of a hub-cache folder
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), else the folder's name, plus the single files' names
    (names only: a path could tell more about the user's disk than the video should)."""
    parts = []
    if source.folder is not None:
        repo = source.folder.parent.parent.name  # .../models--Org--Name/snapshots/<hash>
        hub = source.folder.parent.name == "snapshots" and repo.startswith("models--")
        name = repo.removeprefix("models--").replace("--", "/") if hub else source.folder.name
        parts.append(name)
    parts += [f"{name}={path.name}" for name, path in source.files.items()]
    return " + ".join(parts)
