"""Live previews of a generation: the current x0 prediction as frames, every k steps.

At step ``i`` the model's flow prediction ``v`` at ``x_i`` (sigma ``s_i``) gives the clean
video it currently aims at, ``x0 = x_i - s_i * v`` (``scheduler.to_x0``): a blurry then
sharpening version of the final video.  It is turned into frames in one of two ways:

* the tiny VAE (``wanlite.models.taehv``) when the pipeline has one: real frames, the request's size
  and frame count, a few percent of a DiT step at full size;
* else a fixed linear map from the 16 latent channels to RGB (a 16x3 matrix and a bias) at the
  latent resolution, upscaled: one frame per latent frame, nearly free.  The factors are
  ComfyUI's for Wan 2.1 (``comfy/latent_formats.py``, class ``Wan21``, also in Wan2GP), fitted
  on the DiT-space (normalized) latents, giving RGB in about [-1, 1].

Both are cropped like the final video.  Helpers turn frames into a PNG contact sheet (numpy and
zlib, written atomically) for ``wanlite generate --preview`` and into a small JPEG data URL
(PyAV's MJPEG encoder) for the server's progress events.
"""

from __future__ import annotations

import base64
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ComfyUI comfy/latent_formats.py, Wan21.latent_rgb_factors (rows: latent channels; R, G, B).
LATENT_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)

PreviewCallback = Callable[[int, int, np.ndarray], None]


def latent_rgb(x0: torch.Tensor) -> torch.Tensor:
    """[B, 16, T, h, w] DiT-space latents -> [B, 3, T, h, w] RGB in about [-1, 1]."""
    m = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32, device=x0.device)
    b = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32, device=x0.device)
    return torch.einsum("bcthw,cr->brthw", x0.float(), m) + b.view(1, 3, 1, 1, 1)


def _uint8(video01: torch.Tensor) -> np.ndarray:
    """[3, t, H, W] in [0, 1] -> uint8 [t, H, W, 3] on the host."""
    x = video01.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


class Crop:
    """Where the request sits in the generated size (as the pipeline crops the video)."""

    def __init__(self, full_hw: tuple[int, int], hw: tuple[int, int], num_frames: int):
        self.full_hw, self.hw, self.num_frames = full_hw, hw, num_frames
        self.top, self.left = (full_hw[0] - hw[0]) // 2, (full_hw[1] - hw[1]) // 2

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        h, w = self.hw
        return frames[:, self.top : self.top + h, self.left : self.left + w]


@torch.inference_mode()
def preview_frames(x0: torch.Tensor, crop: Crop, tae=None) -> np.ndarray:
    """uint8 [T, H, W, 3] of the x0 prediction ``x0`` [1, 16, T', h, w], cropped: with the tiny
    VAE ``tae`` all the requested frames, else the linear map's one frame per latent frame."""
    if tae is not None:
        out, n = [], 0
        for chunk in tae.iter_decode(x0):  # [1, 3, t, H, W] in [0, 1]
            frames = crop(_uint8(chunk[0]))[: crop.num_frames - n]
            out.append(frames)
            n += len(frames)
        return np.ascontiguousarray(np.concatenate(out))
    rgb = latent_rgb(x0)[0].transpose(0, 1)  # [T', 3, h, w]
    rgb = F.interpolate(rgb, size=crop.full_hw, mode="bilinear", align_corners=False)
    return np.ascontiguousarray(crop(_uint8(rgb.transpose(0, 1) / 2 + 0.5)))


class Previewer:
    """Called by the denoising loop with each step's x0; every ``every`` steps it makes the
    frames and hands them to ``callback(step, total, frames)``.  Records the seconds spent."""

    def __init__(self, every: int, total: int, callback: PreviewCallback, crop: Crop, tae=None):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"preview_every must be an integer >= 1, got {every!r}")
        self.every, self.total, self.callback = every, total, callback
        self.crop, self.tae = crop, tae
        self.seconds: list[float] = []

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    def __call__(self, step: int, x0: torch.Tensor) -> None:
        import time

        t0 = time.perf_counter()
        frames = preview_frames(x0, self.crop, self.tae)
        self.seconds.append(time.perf_counter() - t0)
        self.callback(step, self.total, frames)


# --- images ------------------------------------------------------------------------------------


def resize(image: np.ndarray, max_side: int) -> np.ndarray:
    """uint8 [H, W, 3] scaled down (area-averaged) so its longer side is at most ``max_side``."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="area")
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def contact_sheet(frames: np.ndarray, count: int = 4, max_side: int = 256) -> np.ndarray:
    """``count`` evenly spaced frames of uint8 [T, H, W, 3], each scaled to ``max_side``, side
    by side with a 2-pixel black gap: uint8 [h, n * w + 2 (n - 1), 3]."""
    picks = np.unique(np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int))
    tiles = [resize(frames[i], max_side) for i in picks]
    h, w = tiles[0].shape[:2]
    sheet = np.zeros((h, len(tiles) * (w + 2) - 2, 3), np.uint8)
    for k, tile in enumerate(tiles):
        sheet[:, k * (w + 2) : k * (w + 2) + w] = tile
    return sheet


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (8-bit RGB, no filter, zlib level 6)."""
    h, w, c = image.shape
    if image.dtype != np.uint8 or c != 3:
        raise ValueError(f"an RGB image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour
    idat = zlib.compress(rows.tobytes(), 6)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a PNG atomically: readers see the previous file or the new one, never half."""
    path = Path(path)
    data = encode_png(image)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def encode_jpeg(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes with PyAV's MJPEG encoder (H and W cut to even numbers:
    4:2:0 chroma)."""
    import av

    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    if h == 0 or w == 0:
        image = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
        h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = w, h, "yuvj420p"
    codec.time_base = Fraction(1, 16)
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:h, :w]), format="rgb24")
    packets = codec.encode(frame.reformat(format="yuvj420p")) + codec.encode(None)
    return b"".join(bytes(p) for p in packets)


def data_url(frames: np.ndarray, max_side: int = 256) -> str:
    """The middle frame of uint8 [T, H, W, 3], at most ``max_side`` pixels, as a JPEG data URL."""
    jpeg = encode_jpeg(resize(frames[len(frames) // 2], max_side))
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
