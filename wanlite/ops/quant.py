"""Weight-only quantization by module swap (in the spirit of gpt-fast).

``quantize(model, mode, keep=...)`` replaces the ``nn.Linear`` layers of a model by
``QLinear`` layers that *store* their weight compactly and *compute* in the activation dtype:

- ``"int8"``: symmetric, per output channel: ``w ~= q * s`` with ``q`` int8 in [-127, 127] and
  ``s = max|w_row| / 127`` (fp32).
- ``"fp8"``: float8 e4m3 storage with a per-output-channel scale ``s = max|w_row| / 448``;
  works on any device (no fp8 matmul needed).

Forward (``qlinear``), by compute dtype:

- fp32: ``(x @ q.T) * s`` -- the scale is applied to the output, which is exact for a
  per-output-channel scale and saves a full-size multiply.
- bf16 / fp16: the weight is dequantized first, ``(q * s)`` in fp32 rounded once to the compute
  dtype, then one GEMM in that dtype (bf16 GEMMs run on AMX / tensor cores).  Scaling the output
  instead would overflow fp16 (``x @ q.T`` is ``1 / s`` = 127 / max|w| times too large) and
  round ``s`` to bf16 (a systematic per-channel error).  On CPU the dequantization goes by row
  chunks whose fp32 transient stays in cache: one pass over the int8 weight instead of three
  over memory, which matters because the weight is re-expanded on every call.

On CPU with fp32 activations the int8 weight is cast to fp32 for the ordinary fp32 GEMM:
torch's int8 weight-only kernel (``torch._weight_int8pack_mm``) is far slower than that on CPUs
without int8 matrix units.

On CUDA the matmul runs in the weight's precision where the chip has it (``compute_backend``,
resolved once per (mode, device, dtype) and logged): fp8 on sm89+ through ``torch._scaled_mm``
(e4m3 activations scaled per token, the per-channel weight scales, bf16 out), int8 on sm80+
through ``torch._int_mm`` (int8 activations scaled per token, int32 accumulation, both scales
applied in fp32).  Elsewhere, or for a shape those GEMMs refuse, the weight is dequantized as above.

Which layers stay in full precision is the caller's ``keep`` predicate (for the DiT,
``lifecycle.dit_quant_keep``: everything outside the blocks -- small, and feeding every block).
The umT5's embedding, norms and bias tables stay as they are because they are not Linears.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("none", "int8", "fp8")
FP8 = torch.float8_e4m3fn
_QMAX = {"int8": 127.0, "fp8": 448.0}
_STORAGE = {"int8": torch.int8, "fp8": FP8}
# Elements per dequantization chunk on CPU: a 1 MiB fp32 transient, which stays in L2.
_DEQUANT_CHUNK = 2**18
log = logging.getLogger(__name__)


def quantize_weight(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored weight, per-row fp32 scale) for a float weight ``[out, in]``."""
    if mode not in _QMAX:
        raise ValueError(f"quantization mode must be one of {MODES[1:]}, got {mode!r}")
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / _QMAX[mode]
    q = w / scale[:, None]
    q = q.round().clamp_(-127, 127).to(torch.int8) if mode == "int8" else q.to(FP8)
    return q, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale[:, None]`` ([out, in]) computed in fp32 and rounded once to ``dtype``."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    rows = weight.shape[0]
    if weight.device.type == "cpu":  # cache-sized row chunks (see the module docstring)
        rows = max(1, _DEQUANT_CHUNK // max(1, weight.shape[1]))
    for r in range(0, weight.shape[0], rows):
        out[r : r + rows] = weight[r : r + rows].float().mul_(scale[r : r + rows, None].float())
    return out


def qlinear(x, weight, scale, bias) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` for a quantized ``weight`` [out, in] with its
    fp32 per-row ``scale`` [out]; computed in ``x.dtype`` (see the module docstring), or on CUDA
    in the weight's precision where the chip has it (``compute_backend``)."""
    if x.device.type == "cuda":
        y = _low_precision_linear(x, weight, scale, bias)
        if y is not None:
            return y
    b = None if bias is None else bias.to(x.dtype)
    if x.dtype != torch.float32:
        return F.linear(x, dequantize(weight, scale, x.dtype), b)
    y = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)  # exact per-channel rescale
    return y if b is None else y + b


class QLinear(nn.Module):
    """A linear layer whose weight is stored quantized; the matmul runs in ``x.dtype``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str):
        super().__init__()
        if mode not in _QMAX:
            raise ValueError(f"quantization mode must be one of {MODES[1:]}, got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        weight = torch.empty(out_features, in_features, dtype=_STORAGE[mode])
        self.weight = nn.Parameter(weight, False)
        self.weight_scale = nn.Parameter(torch.empty(out_features), False)
        self.bias = nn.Parameter(torch.empty(out_features), False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, mode: str) -> QLinear:
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, mode)
        w, s = quantize_weight(lin.weight.data, mode)
        q.weight, q.weight_scale = nn.Parameter(w, False), nn.Parameter(s, False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.float(), False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One layer's weight is expanded at a time: the transient is [out, in] in x.dtype.
        return qlinear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}"


def quantize(
    model: nn.Module, mode: str, keep: Callable[[str], bool] = lambda name: False
) -> nn.Module:
    """Swap every ``nn.Linear`` whose name is not kept for a ``QLinear`` (in place).

    On a meta-device model this only changes the structure (for loading a quantized
    checkpoint); on a loaded model it quantizes the weights."""
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return model
    for name, child in list(model.named_modules()):
        if not isinstance(child, nn.Linear) or keep(name):
            continue
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        if child.weight.is_meta:
            new = QLinear(child.in_features, child.out_features, child.bias is not None, mode)
            new = new.to("meta")
        else:
            new = QLinear.from_linear(child, mode)
        setattr(holder, attr, new)
    return model


# --- fused projections ------------------------------------------------------------------------
# Layers that read the same input (q/k/v) run as one GEMM when their weights are consecutive rows
# of one buffer.  ``fuse_linears`` moves them there once, at load time, and returns the buffers;
# the layers keep their own parameters as views into them, so names, state dicts and memory are
# unchanged.  ``fused_linear`` then runs the one GEMM on those buffers.

_FUSED_ATTRS = ("weight", "weight_scale", "bias")


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The [sum of rows, ...] tensor over ``tensors`` if they are consecutive rows of one
    buffer, else None (no copy)."""
    first = tensors[0]
    if first.is_meta or any(not t.is_contiguous() for t in tensors):
        return None
    storage, offset = first.untyped_storage(), first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return first.new_empty(0).set_(storage, first.storage_offset(), shape)


def fuse_linears(layers) -> dict[str, torch.Tensor | None]:
    """Put the weights (and scales, biases) of same-kind linear layers into one buffer each
    (once: already fused layers are left as they are).  Returns {attr: buffer or None}."""
    if len({(type(m), getattr(m, "mode", None), m.in_features) for m in layers}) != 1:
        raise ValueError("only linear layers of one kind and input width can be fused")
    fused = {}
    for attr in _FUSED_ATTRS:
        ts = [getattr(m, attr, None) for m in layers]
        if any(t is None for t in ts):
            fused[attr] = None
            continue
        buffer = _joined(ts)
        if buffer is None:
            buffer, row = torch.cat([t.detach() for t in ts]), 0
            for m, t in zip(layers, ts):
                setattr(m, attr, nn.Parameter(buffer[row : row + t.shape[0]], requires_grad=False))
                row += t.shape[0]
        fused[attr] = buffer
    return fused


def fused_linear(x, weight, scale, bias, sizes: list[int]) -> list[torch.Tensor]:
    """The outputs of fused layers (buffers from ``fuse_linears``), split per layer: one GEMM,
    with ``QLinear``'s arithmetic when there is a scale."""
    if scale is None:
        b = None if bias is None else bias.to(x.dtype)
        return list(F.linear(x, weight.to(x.dtype), b).split(sizes, dim=-1))
    return list(qlinear(x, weight, scale, bias).split(sizes, dim=-1))


# --- packed fp32 / bf16 weights for oneDNN (CPU) ----------------------------------------------
# On CPU, the GEMMs of the DiT run faster from weights re-laid-out once into oneDNN's blocked
# format (what inductor's CPU "freezing" does) than through torch's GEMM, which re-packs them on
# every call; the gain is largest at small token counts, where packing is a larger share of each
# call (the benchmark output has the figures).  Packing is paid once, at load.  The dtype is the
# weight's (fp32, or bf16 where AMX / AVX512-BF16 run it): only the summation order differs.
# The bias and, for the FFN's first layer, the tanh-GELU run inside the same kernel as post-ops.
# The packed weight is a non-persistent buffer: invisible to state dicts, visible to
# ``module.buffers()`` (so memory accounting sees it; it is an opaque mkldnn tensor:
# ``numel() * element_size()`` bytes).

LINEAR_BACKENDS = ("auto", "aten", "onednn")


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN can pack and run ``dtype`` weights here.  bf16 packing needs AVX512-BW/VL/DQ or
    AVX-NE-CONVERT: on an AVX2-only CPU oneDNN refuses it, so that is asked once, on a tiny
    weight, rather than read from /proc/cpuinfo."""
    built = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return built and _packs(dtype)


@functools.cache
def _packs(dtype: torch.dtype) -> bool:
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 0)
    except RuntimeError:
        return False
    return True


def resolve_linear(name: str, device: torch.device, dtype: torch.dtype, fits: bool) -> str:
    """The linear backend for the DiT's resident fp32 / bf16 blocks.  ``fits``: the blocks are
    resident in full precision (no quantization, no streaming, no torch.compile): packing
    applies."""
    if name not in LINEAR_BACKENDS:
        raise ValueError(f"linear must be one of {LINEAR_BACKENDS}, got {name!r}")
    usable = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and fits
    if name == "onednn":
        if usable and not onednn_available(dtype):
            raise RuntimeError(
                f"linear='onednn' in {dtype} is not available here: it needs a torch build with "
                "oneDNN and, for bfloat16, a CPU with AVX512-BW/VL/DQ or AVX-NE-CONVERT"
            )
        if not usable:
            raise ValueError(
                "linear='onednn' packs resident CPU weights: it needs device cpu, dtype "
                "float32 or bfloat16, quant none, offload other than 'blocks' and compile off"
            )
        return name
    if name == "auto" and usable and onednn_available(dtype):
        return "onednn"
    return "aten"


class PackedLinear(nn.Module):
    """A linear layer whose fp32 or bf16 weight is held in oneDNN's packed layout (not a state-dict
    tensor any more: the module is built from a loaded ``nn.Linear`` for inference only).
    ``gelu_tanh``: apply tanh-GELU to the output in the same kernel."""

    def __init__(self, lin: nn.Linear, gelu_tanh: bool = False):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()  # fp32 or bf16: the kernel computes in the weight's dtype
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 0)
        self.register_buffer("packed", packed, persistent=False)
        bias = None if lin.bias is None else lin.bias.detach().to(w.dtype)
        self.register_buffer("bias", bias, persistent=False)
        self.post = ("gelu", "tanh") if gelu_tanh else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attr, algorithm = self.post
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, attr, [], algorithm)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, packed=onednn, post={self.post[0]}"


def pack_linears(model: nn.Module, gelu_after: Callable[[str], bool] = lambda n: False) -> None:
    """Swap every ``nn.Linear`` of ``model`` for a ``PackedLinear`` (in place), one at a time so
    that only one layer is held twice.  ``gelu_after(name)``: the layer is followed by a tanh
    ``nn.GELU``, which is fused into it and replaced by ``nn.Identity``."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]  # names only: a
    for name in names:  # list of the modules would keep every dense weight alive to the end
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        fuse = gelu_after(name)
        setattr(holder, attr, PackedLinear(getattr(holder, attr), gelu_tanh=fuse))
        if fuse:
            gelu = holder[int(attr) + 1]
            if not (isinstance(gelu, nn.GELU) and gelu.approximate == "tanh"):
                raise ValueError(f"{name} is not followed by a tanh GELU")
            holder[int(attr) + 1] = nn.Identity()


# --- compute in the weight's precision (CUDA) -------------------------------------------------
# w8a8: the activations are quantized per token (row) at each call, ``x ~= xq * sx`` with
# ``sx = max|x_row| / QMAX``; then ``y = (xq @ wq.T) * sx * sw + b``: one low-precision GEMM with
# fp32 accumulation, both scales applied to its [M, N] output.  ``scaled_reference`` is that
# arithmetic in fp32 (what the tests hold the GEMMs to on CPU).

COMPUTE = ("dequant", "scaled_mm", "int_mm")
_BACKENDS: dict = {}  # (mode, device, dtype) -> backend: resolved once, then a dict lookup


def resolve_compute(mode: str, device: torch.device, dtype: torch.dtype, capability) -> str:
    """The GEMM for ``mode`` weights with ``dtype`` activations on ``device`` whose CUDA compute
    capability is ``capability`` ((major, minor), None off CUDA): "scaled_mm" (fp8, sm89+,
    bf16), "int_mm" (int8, sm80+, bf16 / fp16), else "dequant" (today's path)."""
    if device.type != "cuda" or capability is None:
        return "dequant"
    if mode == "fp8" and tuple(capability) >= (8, 9) and dtype == torch.bfloat16:
        return "scaled_mm"
    if mode == "int8" and tuple(capability) >= (8, 0) and dtype in (torch.bfloat16, torch.float16):
        return "int_mm"
    return "dequant"


def compute_backend(mode: str, device: torch.device, dtype: torch.dtype) -> str:
    """``resolve_compute`` for this device, tried once on a tiny GEMM (a build without the
    kernel falls back), logged once per (mode, device, dtype)."""
    key = (mode, device, dtype)
    if key not in _BACKENDS:
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        name = resolve_compute(mode, device, dtype, cap)
        if name != "dequant" and not _probe(name, device, dtype):
            name = "dequant"
        if name == "dequant":
            log.info("%s linears on %s (capability %s, %s): weights dequantized per call (no "
                     "fp8 _scaled_mm / int8 _int_mm here)", mode, device, cap, dtype)  # fmt: skip
        else:
            log.info("%s linears on %s (capability %s): %s", mode, device, cap, name)
        _BACKENDS[key] = name
    return _BACKENDS[key]


def _probe(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    mode = "fp8" if name == "scaled_mm" else "int8"
    w, s = quantize_weight(torch.randn(32, 32, device=device), mode)
    try:
        w8a8_linear(torch.randn(32, 32, device=device, dtype=dtype), w, s, None)
    except (RuntimeError, NotImplementedError) as e:
        log.info("%s refused on %s: %s", name, device, str(e).splitlines()[0][:200])
        return False
    return True


def quantize_rows(x: torch.Tensor, mode: str, qmax: float | None = None):
    """Per-row symmetric quantization of x [M, K]: (q [M, K] int8 or fp8 e4m3, scale [M, 1]
    fp32), ``x ~= q * scale``, |q| <= ``qmax`` (default: the format's).  An all-zero row gets a
    tiny scale and zeros."""
    xf = x.float()
    s = xf.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(qmax or _QMAX[mode])
    q = xf.div_(s) if xf is not x else xf / s
    if mode == "int8":
        return q.round_().clamp_(-127, 127).to(torch.int8), s
    return q.clamp_(-448.0, 448.0).to(FP8), s


def scaled_reference(xq, sx, wq, sw, bias, dtype: torch.dtype) -> torch.Tensor:
    """``(xq @ wq.T) * sx * sw + bias`` in fp32 (exact products, fp32 sums), rounded to
    ``dtype``: what ``torch._scaled_mm`` / ``torch._int_mm`` compute."""
    y = (xq.float() @ wq.float().T).mul_(sx).mul_(sw.float())
    return (y if bias is None else y.add_(bias.float())).to(dtype)


def _gemm_fits(name: str, m: int, k: int, n: int) -> bool:
    """The shapes each GEMM takes: _scaled_mm K and N multiples of 16; _int_mm M > 16, K and
    N multiples of 8."""
    if name == "scaled_mm":
        return k % 16 == 0 and n % 16 == 0
    return m > 16 and k % 8 == 0 and n % 8 == 0


def w8a8_linear(x, weight, scale, bias) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` with x quantized per token to the weight's
    format (fp8 e4m3 or int8) and one ``_scaled_mm`` / ``_int_mm``; result in x's dtype.
    Raises where the GEMM refuses the device, dtype or shape (see ``_gemm_fits``)."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    if weight.dtype == FP8:
        xq, sx = quantize_rows(x2, "fp8")
        b = None if bias is None else bias.to(torch.bfloat16)
        y = torch._scaled_mm(xq, weight.T, scale_a=sx, scale_b=scale.float()[None, :],
                             bias=b, out_dtype=torch.bfloat16)  # fmt: skip
        y = y.to(x.dtype)
    else:
        xq, sx = quantize_rows(x2, "int8")
        y = torch._int_mm(xq, weight.T).float().mul_(sx).mul_(scale.float())
        y = (y if bias is None else y.add_(bias.float())).to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _low_precision_linear(x, weight, scale, bias) -> torch.Tensor | None:
    """``w8a8_linear`` where this device's backend runs it for this shape, else None."""
    mode = "fp8" if weight.dtype == FP8 else "int8"
    name = compute_backend(mode, x.device, x.dtype)
    m = x.numel() // max(1, x.shape[-1])
    if name == "dequant" or not _gemm_fits(name, m, weight.shape[1], weight.shape[0]):
        return None
    return w8a8_linear(x, weight, scale, bias)


# --- w8a8 on CPU: oneDNN's int8 GEMM (quant="w8a8") -------------------------------------------
# The int8 weight (per-channel scales, as "int8" stores it) is packed once for oneDNN
# (``qlinear_prepack``).  Each call quantizes x per token, symmetric, |q| <= qmax, to uint8 with
# zero point qmax + 1 (1 .. 2 qmax + 1), and ``qlinear_pointwise`` with x scale 1 returns
# ``(xq @ wq.T) * sw`` in fp32 (u8 x s8 products, int32 sums); the per-token scale multiplies
# that.  oneDNN's int8 path takes one activation scale per tensor: a per-token scale is applied
# here to its fp32 output instead, which is exact.  On x86 CPUs without VNNI (AVX2 only) oneDNN
# multiplies u8 x s8 pairs with ``vpmaddubsw``, whose int16 pair sums saturate (2 * 255 * 127 >
# 32767): there the activations get 7 bits (qmax 63, u8 <= 127: 2 * 127 * 127 fits), as
# fbgemm's ``reduce_range`` does.  Which applies is measured once (``_w8a8_qmax``), not guessed
# from /proc/cpuinfo.  (benchmarks/bench_int8.py: speed and fidelity against fp32 and bf16.)


def w8a8_available() -> bool:
    """oneDNN's int8 linear runs here (asked once, on a tiny weight)."""
    return _w8a8_qmax() is not None


@functools.cache
def _w8a8_qmax() -> int | None:
    """The activation range oneDNN's u8 x s8 GEMM sums exactly here: 127, or 63 where pair sums
    saturate (see above); None where it does not run.  Asked once, on the worst case."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")):
        return None
    x = torch.ones(4, 64)  # q = qmax, u8 = 2 qmax + 1: every pair the largest sum
    try:
        packed = torch.ops.onednn.qlinear_prepack(torch.full((8, 64), 127, dtype=torch.int8), None)
        for qmax in (127, 63):
            y = _onednn_w8a8(x, packed, torch.ones(8), None, qmax)  # sum 64 qmax 127, / qmax
            if torch.allclose(y, torch.full_like(y, 64 * 127), rtol=1e-5, atol=0):
                return qmax
    except (RuntimeError, NotImplementedError):
        pass
    return None


def _onednn_w8a8(x2, packed, sw, bias, qmax: int | None = None) -> torch.Tensor:
    """x2 [M, K] float -> [M, N] fp32 (see above)."""
    qmax = qmax or _w8a8_qmax()
    q, sx = quantize_rows(x2, "int8", qmax)
    xu = q.view(torch.uint8).add_(qmax + 1)  # two's complement + zp (mod 256): 1 .. 2 qmax + 1
    zp = torch.zeros(sw.numel(), dtype=torch.int32)
    y = torch.ops.onednn.qlinear_pointwise(
        xu, 1.0, qmax + 1, packed, sw, zp, None, 1.0, 0, torch.float32, "none", [], ""
    )
    y = y.mul_(sx)
    return y if bias is None else y.add_(bias)


class W8A8Linear(nn.Module):
    """An int8 ``QLinear`` run as w8a8 by oneDNN on CPU (inference only; the packed weight is a
    non-persistent buffer: the module has no state-dict tensors of its own)."""

    def __init__(self, q: QLinear):
        super().__init__()
        if q.mode != "int8":
            raise ValueError(f"w8a8 runs int8 weights, not {q.mode}")
        self.in_features, self.out_features = q.in_features, q.out_features
        packed = torch.ops.onednn.qlinear_prepack(q.weight.detach(), None)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("weight_scale", q.weight_scale.detach().float(), persistent=False)
        bias = None if q.bias is None else q.bias.detach().float()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _onednn_w8a8(x.reshape(-1, x.shape[-1]), self.packed, self.weight_scale, self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w8a8=onednn"


def use_w8a8(model: nn.Module) -> int:
    """Swap every int8 ``QLinear`` of ``model`` for a ``W8A8Linear`` (in place, one at a time);
    returns how many.  RuntimeError where oneDNN's int8 linear does not run."""
    if not w8a8_available():
        raise RuntimeError("quant='w8a8' needs a torch build with oneDNN's int8 linear (x86)")
    names = [n for n, m in model.named_modules() if isinstance(m, QLinear) and m.mode == "int8"]
    for name in names:
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, attr, W8A8Linear(getattr(holder, attr)))
    return len(names)
