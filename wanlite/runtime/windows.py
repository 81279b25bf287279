"""Sliding context windows: long videos from the bidirectional model in flat DiT memory.

The method is the one of Kijai's ComfyUI-WanVideoWrapper (``kijai/ComfyUI-WanVideoWrapper``:
``context_windows/context.py`` for the schedules and ``create_window_mask``; ``nodes.py``
``WanVideoSampler.process`` / ``WanVideoContextOptions`` for the loop and the defaults), itself
after AnimateDiff-Evolved's context options (Kosinkadink).  At every denoising step:

1. the latent frames are split into windows (``schedule``): "uniform_standard" (the node's
   default) moves the windows by a different offset each step (``ordered_halving``), so that the
   seams never sit at the same frames twice; "static_standard" keeps fixed windows, the last
   one pulled back to end on the last frame;
2. the DiT (with CFG) predicts the flow on each window's latent slice alone.  RoPE positions
   are window-local, 0 .. size-1, as in the wrapper (its ``rope_apply`` takes ``freqs[:f]``
   for an f-frame input), so no window sees a position past the trained 21 latent frames;
3. the window predictions are summed with per-frame weights (``window_weights``: "linear" ramps
   0 -> 1 over the first ``overlap`` frames and 1 -> 0 over the last, except at the video's
   ends; "pyramid" a triangle peaking mid-window) and divided by the summed weights, so each
   frame's weights add to 1.

Wan2GP (``deepbeepmeep/Wan2GP``, ``wgp.py``: ``sliding_window_size`` / ``sliding_window_overlap``)
does it differently: it generates the windows one after another, each whole, conditioned on the
previous window's last frames as a guide video (VACE / image-to-video continuation).  That
needs a conditioned model; the T2V 1.3B has none, so wanlite follows the wrapper.

Units: ``Options.context_frames`` / ``context_overlap`` are in video frames, as the wrapper's
node takes them (defaults 81 and 16); they become latent frames as it converts them:
``(81 - 1) // 4 + 1 = 21`` and ``16 // 4 = 4``.  The context stride is the node's default 4
video frames = 1 latent frame (contiguous windows; wider strides make dilated windows, not
offered).  The wrapper's FreeNoise (noise shuffling) is not applied here.

Memory: each DiT forward sees one window (21 latent frames at the defaults) whatever the
length; what grows with the length is the latents themselves ([1, 16, T, h, w] fp32 and the
sampler's few copies of it), small beside the activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SCHEDULES = ("uniform_standard", "static_standard")
FUSE = ("linear", "pyramid")


def ordered_halving(step: int) -> float:
    """The step's offset fraction in [0, 1): its 64-bit pattern read backwards (0, 1/2, 1/4,
    3/4, 1/8, ...), as ``context.ordered_halving``."""
    return int(f"{step:064b}"[::-1], 2) / (1 << 64)


def _rolls_over(window: list[int], n: int) -> int:
    """The index where the frames of ``window`` (taken mod n) wrap back to 0; -1 if never."""
    prev = -1
    for i, v in enumerate(window):
        if v % n < prev:
            return i
        prev = v % n
    return -1


def _to_end(window: list[int], n: int) -> list[int]:
    """The window moved (keeping its spacing) so that its last frame is n - 1."""
    start = [((v - window[0]) + n) % n for v in window]
    return [v + n - start[-1] - 1 for v in start]


def uniform_standard(
    step: int, num_frames: int, size: int, overlap: int, stride: int = 1, closed_loop=True
) -> list[list[int]]:
    """The windows of one step (latent frame indices), as ``context.uniform_standard``.

    Windows start at ``pad + k * (size - overlap)`` with ``pad`` = the step's offset times the
    length, wrapping past the end (closed loop: the wrapper's sampler leaves ``closed_loop`` at
    its default True); a window that wraps is moved to end on the last frame, and if the next
    window then misses the frame it wrapped to, a window starting there is put after it.
    Repeated windows are dropped."""
    if num_frames <= size:
        return [list(range(num_frames))]
    stride = min(stride, math.ceil(math.log2(num_frames / size)) + 1)
    windows: list[list[int]] = []
    for level in range(stride):
        step_size = 1 << level
        pad = int(round(num_frames * ordered_halving(step)))
        first = int(ordered_halving(step) * step_size) + pad
        end = num_frames + pad + (0 if closed_loop else -overlap)
        for j in range(first, end, size * step_size - overlap):
            windows.append([e % num_frames for e in range(j, j + size * step_size, step_size)])
    i = 0
    while i < len(windows):
        k = _rolls_over(windows[i], num_frames)
        if k >= 0:
            wrapped = windows[i][k]
            windows[i] = _to_end(windows[i], num_frames)
            if wrapped not in windows[(i + 1) % len(windows)]:
                windows.insert(i + 1, list(range(wrapped, wrapped + size)))
        i += 1
    unique: list[list[int]] = []
    for w in windows:
        if w not in unique:
            unique.append(w)
    return unique


def static_standard(num_frames: int, size: int, overlap: int) -> list[list[int]]:
    """Fixed windows every ``size - overlap`` frames, the last pulled back to end on the last
    frame, as ``context.static_standard``."""
    if num_frames <= size:
        return [list(range(num_frames))]
    windows = []
    for start in range(0, num_frames, size - overlap):
        if start + size >= num_frames:
            windows.append(list(range(num_frames - size, num_frames)))
            break
        windows.append(list(range(start, start + size)))
    return windows


def window_weights(
    window: Sequence[int], num_frames: int, overlap: int, fuse: str = "linear"
) -> torch.Tensor:
    """The blend weight of each frame of ``window`` [len(window)] fp32, as
    ``context.create_window_mask`` (not looped): "linear" ramps up over the first ``overlap``
    frames unless the window starts the video and down over the last unless it ends it;
    "pyramid" 1, 2, .., peak, .., 2, 1 over the window (divided by the peak), with the linear
    ramp as a floor at the video's ends."""
    n = len(window)
    first, last = min(window) == 0, max(window) == num_frames - 1
    if fuse == "linear":
        w = torch.ones(n)
        if not first:
            w[:overlap] = torch.linspace(0, 1, overlap)[: min(overlap, n)]
        if not last:
            w[n - min(overlap, n) :] = torch.linspace(1, 0, overlap)[-min(overlap, n) :]
        return w
    if fuse != "pyramid":
        raise ValueError(f"context_fuse must be one of {FUSE}, got {fuse!r}")
    peak = (n + 1) // 2
    rise = list(range(1, peak + 1))
    seq = rise + rise[::-1] if n % 2 == 0 else rise + rise[-2::-1]
    w = torch.tensor(seq, dtype=torch.float32) / peak
    k = min(overlap, n)
    if first and k:
        w[:k] = torch.maximum(w[:k], torch.linspace(0, 1, overlap)[:k])
    if last and k:
        w[n - k :] = torch.maximum(w[n - k :], torch.linspace(1, 0, overlap)[-k:])
    return w


def blend_weights(
    windows: list[list[int]], num_frames: int, overlap: int, fuse: str = "linear"
) -> list[torch.Tensor]:
    """Each window's weights divided by the per-frame sum over all windows (the wrapper's
    ``noise_pred /= counter``, done on the weights): every frame's weights add up to 1.  A
    frame no window weighs (an uncovered frame, or only zero weights) is an error."""
    raw = [window_weights(w, num_frames, overlap, fuse) for w in windows]
    total = torch.zeros(num_frames)
    for w, r in zip(windows, raw):
        total.index_add_(0, torch.tensor(w), r)
    if not bool((total > 0).all()):
        missing = torch.nonzero(total <= 0).flatten().tolist()
        raise ValueError(f"context windows leave latent frames {missing} without weight")
    return [r / total[torch.tensor(w)] for w, r in zip(windows, raw)]


def windowed(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    windows: list[list[int]],
    weights: list[torch.Tensor],
) -> torch.Tensor:
    """``predict`` run on each window's frames of x [B, C, T, h, w] and blended: out[..., t, :, :]
    = sum over windows of weight * prediction, in fp32.  Time is dim -3 of x and of what
    ``predict`` returns ([B, C, T_w, h, w], or [C, T_w, h, w] when a batched CFG pair was
    unpacked).  A contiguous window is a slice (a view), so the DiT sees exactly what it would
    on a clip of that length."""
    out = None
    for frames, w in zip(windows, weights):
        a, b = frames[0], frames[-1] + 1
        idx = torch.tensor(frames, device=x.device)
        part = x[..., a:b, :, :] if frames == list(range(a, b)) else x.index_select(-3, idx)
        p = predict(part).float()
        t = p.dim() - 3
        if out is None:
            out = p.new_zeros(*p.shape[:t], x.shape[-3], *p.shape[t + 1 :])
        out.index_add_(t, idx.to(p.device), p * w.to(p.device).view(-1, 1, 1))
    return out


AUTO_FRAMES = 81  # the wrapper's default window, and the length the model was trained at
AUTO_AFTER = 120  # the hosted schema's longest video: up to it, no windows by default


@dataclass(frozen=True)
class ContextWindows:
    """The window plan of one generation, in latent frames (``from_options`` converts)."""

    size: int  # latent frames per window (21 = 81 video frames)
    overlap: int  # latent frames (4 = 16 video frames)
    schedule: str = "uniform_standard"
    fuse: str = "linear"
    longer_than: int = 0  # latent frames: shorter videos run in one piece whatever the size

    @classmethod
    def from_options(cls, options, temporal_stride: int = 4) -> ContextWindows | None:
        """None when windows are off (``context_frames`` 0); video -> latent frames as the
        wrapper's sampler: ``(frames - 1) // 4 + 1`` and ``overlap // 4``.  ``context_frames``
        None (the default): 81-frame windows, for videos past the hosted schema's longest
        (``AUTO_AFTER`` frames), so every hosted request stays one exact pass."""
        frames = options.context_frames
        if frames == 0:
            return None
        after = 0 if frames is not None else -(-(AUTO_AFTER - 1) // temporal_stride) + 1
        size = ((frames or AUTO_FRAMES) - 1) // temporal_stride + 1
        overlap = options.context_overlap // temporal_stride
        return cls(size, overlap, options.context_schedule, options.context_fuse, after)

    def applies(self, latent_frames: int) -> bool:
        """Windows only when the video is longer than one window (else the plain pass, which
        the single window [0, T) would equal exactly) and than ``longer_than``."""
        return latent_frames > max(self.size, self.longer_than)

    def windows(self, step: int, latent_frames: int) -> list[list[int]]:
        if self.schedule == "static_standard":
            return static_standard(latent_frames, self.size, self.overlap)
        return uniform_standard(step, latent_frames, self.size, self.overlap)

    def predict(self, predict, x: torch.Tensor, step: int) -> torch.Tensor:
        """The windowed, blended prediction of step ``step`` for latents x [B, C, T, h, w]."""
        windows = self.windows(step, x.shape[2])
        weights = blend_weights(windows, x.shape[2], self.overlap, self.fuse)
        return windowed(predict, x, windows, weights)
