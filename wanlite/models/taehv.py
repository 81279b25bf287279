"""The tiny VAE decoder for Wan 2.1 latents: TAEHV ``taew2_1`` (madebyollin/taehv), our code.

What it is
----------
A small convolutional decoder (9.8 M parameters, the whole ``taew2_1`` file with its encoder
is 11.3 M) trained to imitate the Wan 2.1 VAE decoder.  It takes the *normalized* latents the
DiT works in (no ``latents_mean`` / ``latents_std``) and gives RGB in [0, 1]: several times
cheaper than the full VAE, lower quality.  Used here as a final decoder
(``Options(decoder="taew2_1", tae=PATH)``) and for live previews (``wanlite.preview``).

Every layer works on single frames (2D convs); time enters only in two ways:

* ``MemBlock``: ``relu(convs([x_t | x_{t-1}]) + x_t)`` where ``x_{t-1}`` is the block's input
  one frame earlier (zeros before the first frame): the only memory, one frame per block.
* ``TGrow`` (1x1 conv to ``s * C`` channels, the ``s`` groups becoming ``s`` consecutive
  frames): 1 -> 1 -> 2 -> 4 frames per latent frame over the three stages.

Layout of ``decoder.N`` (the file's key names; the rest have no weights)::

    0 clamp 3*tanh(z/3)   1 conv 16->256 + relu(2)
    3-5 MemBlock 256      6 up 2x   7 TGrow(256, 1)   8 conv 256->128     (1 frame / latent)
    9-11 MemBlock 128    12 up 2x  13 TGrow(128, 2)  14 conv 128->64      (2 frames / latent)
    15-17 MemBlock 64    18 up 2x  19 TGrow(64, 2)   20 conv 64->64       (4 frames / latent)
    21 relu              22 conv 64->3, then clamp to [0, 1]

4 frames per latent frame would give ``4T`` frames; the first 3 are dropped, leaving
``1 + 4 (T - 1)``, the full VAE's count (the first latent frame stands for one frame).

Streaming: ``iter_decode`` runs one latent frame at a time, carrying each MemBlock's last
input frame, which is exactly the whole-clip computation (``decode``) cut in time: the same
chunks as the full VAE (1 frame, then 4).  Two exact reorderings save work: a TGrow (a 1x1
conv) runs *before* the nearest 2x upsampling (4x fewer pixels), and the last stage (up, conv,
relu, conv) runs frame by frame (its input is 4x the pixels of anything before it) and skips
the 3 dropped frames.

Precision and layout: it runs in its weights' dtype (the pipeline gives it the full VAE's:
bf16 with a bf16 DiT on CPU, ``Options.vae_dtype``); on CPU its activations are channels-last
(NHWC, ``TinyDecoder.layout``), as the full VAE's, so oneDNN's convolutions need no reorders.
bf16 frames measured 49 dB PSNR from fp32's on random weights (tests/test_taehv.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.meta import on_meta

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16
WIDTHS = (256, 128, 64, 64)  # decoder channels per stage, then the last conv's input
TIME_GROW = (1, 2, 2)  # TGrow strides of the three stages
MEMBLOCKS = ((3, 4, 5), (9, 10, 11), (15, 16, 17))  # decoder indices per stage
TGROWS, PROJECTIONS = (7, 13, 19), (8, 14, 20)
TRIM = 3  # frames dropped at the start (4 per latent frame -> 1 + 4 (T - 1))


def _conv(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class MemBlock(nn.Module):
    """``relu(conv(relu(conv(relu(conv([x | past]))))) + x)``; keys ``conv.0/2/4``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))

    def forward(self, x: Tensor, past: Tensor) -> Tensor:  # [N, C, H, W] each
        c0, _, c2, _, c4 = self.conv
        h = F.relu_(c0(torch.cat([x, past], 1)))
        h = F.relu_(c2(h))
        return F.relu_(c4(h).add_(x))


class TGrow(nn.Module):
    """1x1 conv C -> stride * C; channel group ``k`` is the ``k``-th of ``stride`` frames."""

    def __init__(self, n: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # [B, t, C, H, W] -> [B, stride * t, C, H, W]
        b, t, c, h, w = x.shape
        y = self.conv(x.flatten(0, 1))  # [B*t, stride*C, H, W], stride-major channels
        if self.stride == 1 or y.is_contiguous():
            return y.view(b, t * self.stride, c, h, w)
        # channels-last: [N, H, W, stride, C] -> frames [N, stride, H, W, C] (one copy)
        frames = y.permute(0, 2, 3, 1).unflatten(3, (self.stride, c)).permute(0, 3, 1, 2, 4)
        frames = frames.reshape(-1, h, w, c).permute(0, 3, 1, 2)  # NCHW view, NHWC memory
        return frames.view(b, t * self.stride, c, h, w)


def _layers() -> nn.Sequential:
    """The 23 slots of ``decoder.N``; weight-free slots are ``nn.Identity`` (see module doc)."""
    slots: list[nn.Module] = [nn.Identity(), _conv(LATENT_CHANNELS, WIDTHS[0]), nn.Identity()]
    for stage, stride in enumerate(TIME_GROW):
        n = WIDTHS[stage]
        slots += [MemBlock(n) for _ in range(3)]
        slots += [nn.Identity(), TGrow(n, stride), _conv(n, WIDTHS[stage + 1], bias=False)]
    slots += [nn.Identity(), _conv(WIDTHS[3], 3)]
    return nn.Sequential(*slots)


def _up(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class TinyDecoder(nn.Module):
    """The ``taew2_1`` decoder.  ``decode`` / ``iter_decode`` take DiT-space latents
    ``[B, 16, T, h, w]`` and give RGB in [0, 1], ``[B, 3, t, 8h, 8w]``."""

    temporal_stride, spatial_stride = 4, 8

    def __init__(self) -> None:
        super().__init__()
        self.decoder = _layers()
        self.channels_last: bool | None = None  # None: on CPU (see ``layout``)

    def layout(self, x: Tensor) -> torch.memory_format:
        """The activations' memory format: channels-last (NHWC) on CPU, as the full VAE's
        (``vae.layout``): oneDNN's convolutions take it without reordering, which matters in
        bf16; elsewhere the usual layout.  ``channels_last`` True/False forces one."""
        last = x.is_cpu if self.channels_last is None else self.channels_last
        return torch.channels_last if last else torch.contiguous_format

    def _memblock(self, i: int, x: Tensor, memory: dict[int, Tensor]) -> Tensor:
        """MemBlock ``i`` on ``x`` [B, t, C, H, W]; frame j's past is input frame j - 1."""
        past = torch.empty_like(x)  # x's layout (a 5-D cat would not keep channels-last)
        prev = memory.get(i)
        past[:, :1] = 0 if prev is None else prev
        past[:, 1:] = x[:, :-1]
        memory[i] = x[:, -1:].clone()  # one frame, not a view keeping the chunk alive
        return self.decoder[i](x.flatten(0, 1), past.flatten(0, 1)).view_as(x)

    def _chunk(self, z: Tensor, memory: dict[int, Tensor], skip: int) -> Tensor:
        """Latent frames ``z`` [B, 16, t, h, w] -> RGB [B, 3, 4t - skip, 8h, 8w] in [0, 1]."""
        d = self.decoder
        b, _, t, h, w = z.shape
        z = z.permute(0, 2, 1, 3, 4).reshape(b * t, LATENT_CHANNELS, h, w)
        z = z.contiguous(memory_format=self.layout(z))  # every conv below keeps it
        x = F.relu_(d[1](torch.tanh(z / 3) * 3)).view(b, t, WIDTHS[0], h, w)
        for stage in range(3):
            for i in MEMBLOCKS[stage]:
                x = self._memblock(i, x, memory)
            x = d[TGROWS[stage]](x)  # before the upsampling: a 1x1 conv commutes with it
            if stage < 2:
                y = d[PROJECTIONS[stage]](_up(x.flatten(0, 1)))
                x = y.view(b, x.shape[1], *y.shape[1:])
        x = x[:, skip:]  # the frames dropped at the start need no last stage
        out = x.new_empty(b, 3, x.shape[1], 8 * h, 8 * w)
        for j in range(x.shape[1]):  # the last stage one frame at a time (4x the pixels)
            y = F.relu_(d[PROJECTIONS[2]](_up(x[:, j])))
            out[:, :, j] = d[22](y).clamp_(0.0, 1.0)
        return out

    def _prepare(self, z: Tensor) -> Tensor:
        if z.dim() != 5 or z.shape[1] != LATENT_CHANNELS or z.shape[2] < 1:
            raise ValueError(
                f"latents must be [B, {LATENT_CHANNELS}, T, h, w], got shape {tuple(z.shape)}"
            )
        w = self.decoder[1].weight
        return z.to(device=w.device, dtype=w.dtype)

    @torch.inference_mode()
    def iter_decode(self, z: Tensor) -> Iterator[Tensor]:
        """Yield the frames of ``z`` latent frame by latent frame, in order:
        [B, 3, 1, 8h, 8w] for the first, [B, 3, 4, 8h, 8w] for each following one."""
        z, memory = self._prepare(z), {}
        for i in range(z.shape[2]):
            yield self._chunk(z[:, :, i : i + 1], memory, TRIM if i == 0 else 0)

    def stream(self) -> Callable[[Tensor], Tensor]:
        """A decoder of latents given in pieces as they are made (causal generation): each
        call decodes the next latent frames, the MemBlocks' state carried between calls, so
        the pieces' frames are ``iter_decode``'s frames of all the latents."""
        memory: dict[int, Tensor] = {}
        done = [0]  # latent frames decoded so far

        @torch.inference_mode()
        def decode(z: Tensor) -> Tensor:
            z, out = self._prepare(z), []
            for i in range(z.shape[2]):
                skip = TRIM if done[0] == 0 else 0
                out.append(self._chunk(z[:, :, i : i + 1], memory, skip))
                done[0] += 1
            return torch.cat(out, dim=2)

        return decode

    @torch.inference_mode()
    def decode(self, z: Tensor) -> Tensor:
        """The whole clip at once (every frame through each layer together; more memory):
        [B, 16, T, h, w] -> [B, 3, 1 + 4 (T - 1), 8h, 8w] in [0, 1]."""
        return self._chunk(self._prepare(z), {}, TRIM)


# --- the file ----------------------------------------------------------------------------------


def encoder_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the ``taew2_1`` *encoder* (in the file, unused here): conv 3->64, then
    three times [TPool (1x1, 2C->C; C->C for the last), stride-2 conv, 3 MemBlocks], conv
    64->16."""
    shapes: dict[str, tuple[int, ...]] = {"encoder.0.weight": (64, 3, 3, 3)}
    shapes["encoder.0.bias"] = (64,)
    for pool, tpool_in in ((2, 128), (7, 128), (12, 64)):
        shapes[f"encoder.{pool}.conv.weight"] = (64, tpool_in, 1, 1)
        shapes[f"encoder.{pool + 1}.weight"] = (64, 64, 3, 3)
        for i in range(pool + 2, pool + 5):
            for j, cin in ((0, 128), (2, 64), (4, 64)):
                shapes[f"encoder.{i}.conv.{j}.weight"] = (64, cin, 3, 3)
                shapes[f"encoder.{i}.conv.{j}.bias"] = (64,)
    shapes |= {"encoder.17.weight": (LATENT_CHANNELS, 64, 3, 3), "encoder.17.bias": (16,)}
    return shapes


def decoder_shapes() -> dict[str, tuple[int, ...]]:
    with on_meta():
        return {k: tuple(v.shape) for k, v in TinyDecoder().state_dict().items()}


def file_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the real ``taew2_1`` file with its shape (11,315,539 parameters)."""
    return encoder_shapes() | decoder_shapes()


def _read(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith("decoder.")}  # noqa: SIM118
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and format errors alike
        raise ValueError(f"cannot read {path.name} as a torch checkpoint: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path.name} holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("decoder.")}


def check_state(state: dict[str, Tensor], name: str) -> None:
    """ValueError unless ``state`` has exactly the decoder keys and shapes of ``taew2_1``."""
    want = decoder_shapes()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    wrong = [
        f"{k} {tuple(state[k].shape)} (want {want[k]})"
        for k in want
        if k in state and tuple(state[k].shape) != want[k]
    ]
    if missing or extra or wrong:
        found = [f"{len(missing)} missing ({', '.join(missing[:3])})"] if missing else []
        found += [f"{len(extra)} unexpected ({', '.join(extra[:3])})"] if extra else []
        found += [f"wrong shapes: {', '.join(wrong[:3])}"] if wrong else []
        raise ValueError(f"{name} is not a TAEHV taew2_1 (Wan 2.1) decoder: {'; '.join(found)}")


def load_tiny_decoder(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TinyDecoder:
    """Load the decoder of a ``taew2_1.pth`` / ``.safetensors`` file (its encoder is not read
    into the model), checking every key and shape."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tiny VAE file not found: {path}")
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ValueError(f"the tiny VAE must be a .pth or .safetensors file, got {path.name}")
    state = _read(path)
    check_state(state, path.name)
    with on_meta():
        model = TinyDecoder()
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    count = sum(v.numel() for v in state.values())
    log.info("tiny VAE decoder: %s (%d parameters)", path.name, count)
    return model.to(device).eval().requires_grad_(False)
