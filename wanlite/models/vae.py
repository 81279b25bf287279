"""The Wan2.1 causal 3D VAE (``WanVAE_`` of the original Wan code), written for inference.

Shapes: video ``[B, 3, T, H, W]`` in [-1, 1] with ``T = 1 + 4 * (T' - 1)``; latents
``[B, z_dim, T', H / 8, W / 8]`` (``cfg.temporal_stride`` = 4, ``cfg.spatial_stride`` = 8).
The first latent frame stands for the first video frame alone, every following latent frame
for the next 4 video frames.

Causal chunked processing
-------------------------
Every temporal conv is *causal*: output frame ``t`` sees input frames ``t-2 .. t`` only, with
zeros before the first frame.  So the VAE runs over time in chunks carrying a small state, in
the same chunks and with the same state as the original code and diffusers (``feat_cache``,
``CACHE_T = 2``), hence the same numbers up to float rounding:

* ``encode`` feeds the encoder the first frame, then chunks of 4 frames, each giving one latent
  frame.  ``iter_decode`` feeds the decoder one latent frame at a time, which gives 1 video
  frame for the first latent frame and 4 for each following one.
* The state of one call is a ``CausalCache`` passed explicitly through every ``forward``;
  modules keep no state.  For each causal conv (keyed by the conv module itself: no slot
  indices to keep in step) it holds the last ``kernel_t - stride_t`` input frames (2 for the
  3-tap convs) of the conv's input stream *including* its causal zero padding, so that after
  the first chunk nothing is ever padded.  A conv builds its input as one buffer
  ``[history | chunk]`` (``begin``), and the RMS norm + SiLU before it writes its output
  straight into the chunk part: no ``torch.cat``, no separate norm output (``finish`` then runs
  the conv and copies the new history out of the buffer's tail).  A first chunk of one frame
  skips the kernel taps that would only see the zero padding instead of materializing it.
* The temporal resamplers treat the *first chunk* specially (``cache.first``; diffusers' "Rep"
  marker): the frame bypasses their time conv, so one frame stays one frame (the downsampler
  records it as history; the upsampler's time conv starts at the second chunk, from zeros).
  Then the downsampler's stride-2 time conv runs on [previous frame | chunk] (4 -> 2 -> 1
  frames over two stages); the upsampler's time conv doubles the channels, whose two halves
  become consecutive frames (1 -> 2 -> 4).

Parameter names are those of the original Wan checkpoint; ``to_diffusers_key`` /
``from_diffusers_key`` translate to and from diffusers' ``AutoencoderKLWan`` names.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.meta import on_meta
from .configs import VAEConfig

_ONEDNN = torch.backends.mkldnn.is_available()


def layout(x: Tensor) -> torch.memory_format:
    """The memory format of the activations: channels-last (NDHWC) on CPU, where oneDNN's bf16
    convs run 1.6-2.5x faster in it on AMX (measured at the decoder's 96-384 channels) and
    return their output without the reorder copy they need from NCDHW (a third of a bf16
    decode's time went to those copies); fp32 convs take the same time in both.  Elsewhere
    the usual contiguous layout.  Every op here works in either; only the buffers a conv
    reads are allocated in it (``CausalConv3d.begin``), the rest follows from the ops."""
    return torch.channels_last_3d if x.is_cpu else torch.contiguous_format


def conv3d(
    x: Tensor, w: Tensor, b: Tensor | None, stride=(1, 1, 1), padding=(0, 0, 0), groups: int = 1
) -> Tensor:
    """F.conv3d, but float32 on CPU always goes through oneDNN: PyTorch's size heuristic
    sends batch-1 chunks with few frames to its much slower im2col kernel."""
    if x.is_cpu and x.dtype == torch.float32 and _ONEDNN and torch.backends.mkldnn.enabled:
        return torch.ops.aten.mkldnn_convolution(x, w, b, padding, stride, (1, 1, 1), groups)
    return F.conv3d(x, w, b, stride, padding, 1, groups)


class CausalCache:
    """The temporal state of one encode/decode call, passed through every ``forward``."""

    def __init__(self) -> None:
        self.first = True  # processing the first chunk
        self.history: dict[nn.Module, Tensor] = {}  # causal conv -> its last `keep` inputs

    def next_chunk(self) -> None:
        self.first = False


class CausalConv3d(nn.Conv3d):
    """A Conv3d that is causal in time: ``padding[0]`` of the usual symmetric padding becomes
    ``2 * padding[0]`` zero frames in front.  Spatial padding is done by the conv itself.

    With a cache, a chunk runs as ``begin`` (a buffer [history | room for the chunk]), filling
    the room, and ``finish`` (conv over the buffer, its tail kept as the next history)."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        k, s, p = (v if isinstance(v, tuple) else (v,) * 3 for v in (kernel, stride, padding))
        super().__init__(cin, cout, k, s, padding=(0, p[1], p[2]))
        self.pad_t = 2 * p[0]
        self.keep = k[0] - s[0]  # input frames the next chunk needs from this one

    def remember(self, x: Tensor, cache: CausalCache) -> None:
        """Keep the last ``keep`` frames of the stream ending with ``x`` (zeros before its
        start) as history; a copy, so ``x`` itself is not retained."""
        tail = x[:, :, -self.keep :]
        missing = self.keep - tail.shape[2]
        cache.history[self] = F.pad(tail, (0, 0, 0, 0, missing, 0)) if missing else tail.clone()

    def begin(self, like: Tensor, cache: CausalCache) -> tuple[Tensor, Tensor]:
        """(buffer, room): a new input buffer for a chunk shaped like ``like``, its first
        frames already holding the history (or the causal zero padding at the stream start);
        the caller writes the chunk into ``room``, the rest of the buffer."""
        b, c, t, h, w = like.shape
        hist = cache.history.get(self)
        if hist is not None:
            front = hist.shape[2]
        elif t + self.pad_t == self.kernel_size[0]:
            front = 0  # a single output frame: `finish` skips the taps on zeros instead
        else:
            front = self.pad_t
        size, fmt = (b, c, front + t, h, w), layout(like)
        buf = torch.empty(size, dtype=like.dtype, device=like.device, memory_format=fmt)
        if hist is not None:
            buf[:, :, :front] = hist
        elif front:
            buf[:, :, :front].zero_()
        return buf, buf[:, :, front:]

    def finish(self, buf: Tensor, cache: CausalCache) -> Tensor:
        self.remember(buf, cache)
        k, n = self.kernel_size[0], buf.shape[2]
        w = self.weight if n >= k else self.weight[:, :, k - n :]
        return conv3d(buf, w, self.bias, self.stride, self.padding)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """``cache=None`` convolves ``x`` as a whole sequence."""
        if self.keep == 0:  # pointwise in time: no state
            return conv3d(x, self.weight, self.bias, self.stride, self.padding)
        cache = CausalCache() if cache is None else cache
        buf, room = self.begin(x, cache)
        room.copy_(x)
        return self.finish(buf, cache)


class RMSNorm(nn.Module):
    """``F.normalize`` over channels * sqrt(dim) * gamma (Wan's ``RMS_norm``, no bias)."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        # The checkpoint's gamma is [dim, 1, 1, 1] for video norms, [dim, 1, 1] for images.
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (2 if images else 3)))
        self.scale = dim**0.5

    def forward(self, x: Tensor, silu: bool = False, out: Tensor | None = None) -> Tensor:
        """Optionally fused with a SiLU, and written into ``out`` (also used as scratch)."""
        b, c = x.shape[:2]
        out = torch.mul(x, x, out=out)
        # Sum of squares over channels as a product with ones: several times faster on CPU
        # than a strided reduction over dim 1.  Channels-last: [..., pixels, c] @ [c, 1];
        # else [1, c] @ [c, pixels] (each the layout's contiguous matrix: no copy).
        if out.stride(1) == 1 and c > 1:
            sumsq = torch.matmul(out.movedim(1, -1), x.new_ones(c, 1)).movedim(-1, 1)
        else:
            sumsq = torch.matmul(x.new_ones(1, c), out.flatten(2)).view(b, 1, *x.shape[2:])
        # max(norm, 1e-12) as F.normalize
        inv = sumsq.clamp_min_(1e-24).rsqrt_().mul_(self.scale)
        torch.mul(x, inv, out=out)
        out.mul_(self.gamma.view(c, *(1,) * (x.dim() - 2)))
        return F.silu(out, inplace=True) if silu else out


def _norm_into(norm: RMSNorm, conv: CausalConv3d, x: Tensor, cache: CausalCache) -> Tensor:
    """``conv``'s input buffer [history | silu(norm(x))]; callers drop ``x`` before running
    ``conv.finish`` on it where they can, so ``x`` is freed before the conv output exists."""
    buf, room = conv.begin(x, cache)
    norm(x, silu=True, out=room)
    return buf


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        # Indices as in the checkpoint: 1 and 4 were SiLU, 5 dropout.
        self.residual = nn.Sequential(
            RMSNorm(cin),
            nn.SiLU(),
            CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(cout, cout, 3, padding=1),
        )
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1.finish(_norm_into(norm1, conv1, x, cache), cache)
        h = _norm_into(norm2, conv2, h, cache)  # frees conv1's output
        h = conv2.finish(h, cache)
        return h.add_(x if self.shortcut is None else self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (frames are independent)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)
        qkv = F.linear(y, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias)
        y = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # 4D: the flash kernel
        y = F.linear(y, self.proj.weight.view(c, c), self.proj.bias)
        return x + y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


# Nearest 2x upsampling then a 3x3 conv (padding 1) is, for each output pixel parity (row a,
# column d), a 2x2 conv of the *low-res* input whose taps are sums of the 3x3 taps landing on
# the same source pixel: 4/9 of the FLOPs and no 4x upsampled intermediate.  _PHASE[a] maps
# the 3 kernel rows to the 2 source rows (i-1, i) for a = 0 and (i, i+1) for a = 1.
_PHASE = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def _upsample_conv(x: Tensor, conv: nn.Conv2d, frames: int) -> Tensor:
    """conv(nearest_2x(x)) per frame.  ``x`` is [b, frames * c, t, h, w] where channel group
    ``p`` holds frame ``frames * i + p`` of the output: [b, o, frames * t, 2h, 2w]."""
    b, _, t, h, w = x.shape
    o = conv.out_channels
    phase = torch.tensor(_PHASE, dtype=conv.weight.dtype, device=conv.weight.device)
    weight = torch.einsum("aky,dlx,oiyx->adoikl", phase, phase, conv.weight).flatten(0, 2)
    # One group per frame's channels (a view of x in either layout, where a batch of frames
    # would be a copy in channels-last).  y: [b, (frames, a, d, o), t, h + 1, w + 1]; phase
    # (a, d) of pixel (i, j) is at (i + a, j + d).
    weight = weight.unsqueeze(2).repeat(frames, 1, 1, 1, 1)
    y = conv3d(x, weight, conv.bias.repeat(4 * frames), padding=(0, 1, 1), groups=frames)
    y = y.view(b, frames, 2, 2, o, t, h + 1, w + 1).permute(0, 4, 5, 1, 6, 2, 7, 3)
    # out: [b, o, t, frames, h, 2, w, 2], laid out so that its view below keeps x's layout
    if layout(x) == torch.channels_last_3d:
        out = x.new_empty(b, t, frames, h, 2, w, 2, o).permute(0, 7, 1, 2, 3, 4, 5, 6)
    else:
        out = x.new_empty(b, o, t, frames, h, 2, w, 2)
    for a in (0, 1):
        for d in (0, 1):
            out[:, :, :, :, :, a, :, d] = y[:, :, :, :, a : a + h, a, d : d + w, d]
    return out.view(b, o, t * frames, 2 * h, 2 * w)


class Resample(nn.Module):
    """2x spatial up/down sampling, plus 2x in time for the ``*3d`` modes (see module doc)."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        up = mode.startswith("up")
        conv = nn.Conv2d(dim, dim // 2 if up else dim, 3, stride=1 if up else 2, padding=int(up))
        # Index 0 was the parameter-free nn.Upsample / nn.ZeroPad2d of the original.
        self.resample = nn.Sequential(nn.Identity(), conv)
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        conv = self.resample[1]
        if self.mode.startswith("up"):
            if self.mode == "upsample3d" and not cache.first:  # 2x channels -> 2x frames
                return _upsample_conv(self.time_conv(x, cache), conv, frames=2)
            return _upsample_conv(x, conv, frames=1)
        # Downsampling: pad right/bottom by one, 3x3 conv with stride 2 on every frame.
        x = conv3d(F.pad(x, (0, 1, 0, 1)), conv.weight.unsqueeze(2), conv.bias, stride=(1, 2, 2))
        if self.mode == "downsample3d":
            if cache.first:
                self.time_conv.remember(x, cache)
            else:
                x = self.time_conv(x, cache)
        return x


def _run(layers: nn.Sequential, x: Tensor, cache: CausalCache) -> Tensor:
    for layer in layers:
        x = layer(x, cache)
    return x


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, cout: int) -> nn.Sequential:  # [1] was SiLU
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, cout, 3, padding=1))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                temporal = cfg.temporal_downsample[i]
                layers.append(Resample(cout, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = _run(self.middle, _run(self.downsamples, self.conv1(x, cache), cache), cache)
        x = _norm_into(self.head[0], self.head[2], x, cache)
        return self.head[2].finish(x, cache)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous level's Resample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(mult) - 1:
                layers.append(Resample(cout, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], 3)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = _run(self.upsamples, _run(self.middle, self.conv1(x, cache), cache), cache)
        x = _norm_into(self.head[0], self.head[2], x, cache)
        return self.head[2].finish(x, cache)


class WanVAE(nn.Module):
    """Wan2.1 VAE: ``encode`` -> raw posterior mean, ``decode`` / ``iter_decode`` -> video.

    Runs in the dtype and on the device of its weights; latents are *raw* (the caller applies
    ``latents_mean`` / ``latents_std``)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # -> (mean, logvar)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    def _prepare(self, x: Tensor, what: str) -> Tensor:
        if x.dim() != 5 or x.shape[2] < 1:
            raise ValueError(f"{what} must be [B, C, T, H, W], got shape {tuple(x.shape)}")
        w = self.conv2.weight
        return x.to(device=w.device, dtype=w.dtype)

    @torch.inference_mode()
    def encode(self, x: Tensor) -> Tensor:
        """[B, 3, 1 + 4k, H, W] in [-1, 1] -> posterior mean [B, z_dim, 1 + k, H/8, W/8]."""
        x = self._prepare(x, "video")
        stride, t = self.cfg.temporal_stride, x.shape[2]
        if (t - 1) % stride:
            raise ValueError(f"the number of frames must be 1 + {stride}k, got {t}")
        mean_half = slice(0, self.cfg.z_dim)  # of conv1's (mean, logvar) output channels
        weight, bias = self.conv1.weight[mean_half], self.conv1.bias[mean_half]
        cache, means = CausalCache(), []
        for start in range(0, t, stride):
            chunk = x[:, :, :1] if start == 0 else x[:, :, start - stride + 1 : start + 1]
            means.append(conv3d(self.encoder(chunk, cache), weight, bias))
            cache.next_chunk()
        return torch.cat(means, dim=2)

    @torch.inference_mode()
    def iter_decode(self, z: Tensor) -> Iterator[Tensor]:
        """Yield the video of raw latents ``z`` chunk by chunk, in order, clamped to [-1, 1]:
        [B, 3, 1, H, W] for the first latent frame, [B, 3, 4, H, W] for each following one."""
        z = self._prepare(z, "latents")
        stream = StreamDecoder(self)
        for i in range(z.shape[2]):
            yield stream(z[:, :, i : i + 1])

    @torch.inference_mode()
    def decode(self, z: Tensor) -> Tensor:
        """[B, z_dim, T', h, w] -> [B, 3, 1 + 4 (T' - 1), 8h, 8w] in [-1, 1]: the chunks of
        ``iter_decode`` written into one preallocated tensor (no second copy of the video)."""
        stride, out, t = self.cfg.temporal_stride, None, 0
        for chunk in self.iter_decode(z):
            if out is None:
                b, c, _, h, w = chunk.shape
                out = chunk.new_empty(b, c, 1 + stride * (z.shape[2] - 1), h, w)
            out[:, :, t : t + chunk.shape[2]] = chunk
            t += chunk.shape[2]
        return out


class StreamDecoder:
    """Decodes a video's raw latents in pieces as they are made (causal generation), keeping
    the causal convolutions' cache between calls: the pieces' frames are exactly the frames of
    one ``decode`` of all latents."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae, self.cache = vae, CausalCache()

    @torch.inference_mode()
    def __call__(self, z: Tensor) -> Tensor:
        """Raw latents [B, z_dim, t, h, w] (the next t latent frames) -> their frames
        [B, 3, n, 8h, 8w] in [-1, 1] (n = 1 + 4 (t - 1) for the first piece, else 4 t)."""
        z = self.vae._prepare(z, "latents")
        out = []
        for i in range(z.shape[2]):
            out.append(self.vae.decoder(self.vae.conv2(z[:, :, i : i + 1]), self.cache))
            self.cache.next_chunk()
        return torch.cat(out, dim=2).clamp_(-1.0, 1.0)


# --- checkpoint key names: original Wan <-> diffusers AutoencoderKLWan -------------------------

# Inside a residual block; attention and resample blocks use the same names in both layouts.
_RESIDUAL = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}


def _module_renames(cfg: VAEConfig) -> list[tuple[str, str]]:
    """(our module prefix, diffusers module prefix) for every block of the model."""
    pairs = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv1.", f"{part}.conv_in."),
            (f"{part}.middle.0.", f"{part}.mid_block.resnets.0."),
            (f"{part}.middle.1.", f"{part}.mid_block.attentions.0."),
            (f"{part}.middle.2.", f"{part}.mid_block.resnets.1."),
            (f"{part}.head.0.", f"{part}.norm_out."),
            (f"{part}.head.2.", f"{part}.conv_out."),
        ]
    levels = len(cfg.dim_mult)
    n_down = levels * cfg.num_res_blocks + levels - 1  # the encoder's list is flat in both
    pairs += [(f"encoder.downsamples.{n}.", f"encoder.down_blocks.{n}.") for n in range(n_down)]
    n = 0
    for i in range(levels):
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"decoder.upsamples.{n}.", f"decoder.up_blocks.{i}.resnets.{j}."))
            n += 1
        if i != levels - 1:
            pairs.append((f"decoder.upsamples.{n}.", f"decoder.up_blocks.{i}.upsamplers.0."))
            n += 1
    return pairs


def _rename(key: str, renames: list[tuple[str, str]]) -> str:
    for ours, theirs in renames:
        if key.startswith(ours):
            rest = key[len(ours) :]
            for a, b in _RESIDUAL.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
            return theirs + rest
    raise KeyError(key)


@functools.lru_cache(maxsize=8)
def _key_tables(cfg: VAEConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Exact (ours -> diffusers, diffusers -> ours) maps over the parameters of ``cfg``."""
    with on_meta():
        names = [name for name, _ in WanVAE(cfg).named_parameters()]
    renames = _module_renames(cfg)
    to_diff = {name: _rename(name, renames) for name in names}
    return to_diff, {v: k for k, v in to_diff.items()}


def to_diffusers_key(key: str, cfg: VAEConfig) -> str:
    """Our (original Wan) parameter name -> the diffusers ``AutoencoderKLWan`` name."""
    try:
        return _key_tables(cfg)[0][key]
    except KeyError:
        raise KeyError(f"not a Wan VAE parameter for this config: {key!r}") from None


def from_diffusers_key(key: str, cfg: VAEConfig) -> str:
    """A diffusers ``AutoencoderKLWan`` parameter name -> our (original Wan) name."""
    try:
        return _key_tables(cfg)[1][key]
    except KeyError:
        raise KeyError(f"not an AutoencoderKLWan parameter for this config: {key!r}") from None
