"""Tests for the low-precision compute paths of ``wanlite.ops.quant`` (w8a8: fp8 ``_scaled_mm``,
int8 ``_int_mm``).

On CPU: the arithmetic (per-token activation scales, per-channel weight scales, fp32
accumulation: ``scaled_reference``) against the linear with the dequantized weight, within the
error that quantizing the activations adds (stated per format below); torch's CPU
``_scaled_mm`` / ``_int_mm`` against that arithmetic (the same call layout CUDA gets); the
backend decision for mocked compute capabilities; the per-shape fallback.  ``@pytest.mark.cuda``
tests run the chosen backend on a GPU (scripts/gpu_check.py runs them).
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from wanlite.ops import quant

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
# Relative RMS error of the w8a8 output against the dequantized-weight linear, gaussian data:
# e4m3 keeps 3 mantissa bits (rounding error up to 2^-4 of each value, ~3.6% RMS); int8 per
# token has a step of max|x_row| / 127 (~0.6% RMS of a gaussian row of 64).
REL_RMS = {"fp8": 0.05, "int8": 0.015}


def rel_rms(y, ref) -> float:
    return ((y.float() - ref.float()).pow(2).mean() / ref.float().pow(2).mean()).sqrt().item()


def data(m=48, k=64, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.1, torch.randn(n)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantize_rows_round_trip(mode):
    x, _, _ = data()
    x[3] = 0  # an all-zero row stays zero, with no NaN
    q, s = quant.quantize_rows(x, mode)
    assert q.dtype == (torch.int8 if mode == "int8" else quant.FP8) and s.shape == (48, 1)
    back = q.float() * s
    assert torch.equal(back[3], torch.zeros(64))
    assert q.float().abs().amax() <= (127 if mode == "int8" else 448)
    # int8: half a step per value; fp8 e4m3: 2^-4 relative (normal values)
    bound = s / 2 * 1.0001 if mode == "int8" else x.abs() * 2**-4 + s * 2**-9
    assert ((back - x).abs() <= bound).all()


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_scaled_reference_matches_dequantized_linear(mode):
    x, w, b = data()
    wq, sw = quant.quantize_weight(w, mode)
    xq, sx = quant.quantize_rows(x, mode)
    y = quant.scaled_reference(xq, sx, wq, sw, b, torch.float32)
    dense = F.linear(x, quant.dequantize(wq, sw, torch.float32), b)
    err = rel_rms(y - b, dense - b)  # relative to the matmul, not to the bias
    assert err < REL_RMS[mode]
    assert err > 0  # activations are really quantized
    # exact products with fp32 sums: the integer GEMM of int8 is exact
    if mode == "int8":
        exact = (xq.double() @ wq.double().T) * sx.double() * sw.double() + b.double()
        torch.testing.assert_close(y.double(), exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_w8a8_linear_on_cpu_gemms(mode):
    """torch's CPU ``_scaled_mm`` / ``_int_mm`` with the arguments CUDA gets: [B, L, K] input,
    the [N, K] weight transposed, [M, 1] and [1, N] scales."""
    x, w, b = data(m=2 * 24)
    wq, sw = quant.quantize_weight(w, mode)
    x3 = x.view(2, 24, 64)
    y = quant.w8a8_linear(x3, wq, sw, b)
    assert y.shape == (2, 24, 32) and y.dtype == torch.float32
    xq, sx = quant.quantize_rows(x, mode)
    out_dtype = torch.bfloat16 if mode == "fp8" else torch.float32  # _scaled_mm's output
    ref = quant.scaled_reference(xq, sx, wq, sw, b, out_dtype).float()
    tol = 2**-7 if mode == "fp8" else 1e-5
    torch.testing.assert_close(y.view(48, 32), ref, rtol=tol, atol=tol * ref.abs().max())


@pytest.mark.parametrize(
    "mode,cap,dtype,expected",
    [
        ("fp8", (9, 0), torch.bfloat16, "scaled_mm"),
        ("fp8", (8, 9), torch.bfloat16, "scaled_mm"),
        ("fp8", (8, 6), torch.bfloat16, "dequant"),  # A10 / 3090: no fp8 tensor cores
        ("fp8", (9, 0), torch.float16, "dequant"),  # row-wise _scaled_mm writes bf16
        ("int8", (8, 0), torch.bfloat16, "int_mm"),
        ("int8", (8, 0), torch.float16, "int_mm"),
        ("int8", (7, 5), torch.float16, "dequant"),
        ("int8", (9, 0), torch.float32, "dequant"),
        ("fp8", None, torch.bfloat16, "dequant"),
    ],
)
def test_resolve_compute(mode, cap, dtype, expected):
    assert quant.resolve_compute(mode, CUDA, dtype, cap) == expected
    assert quant.resolve_compute(mode, CPU, dtype, cap) == "dequant"


@pytest.fixture
def fresh_backends(monkeypatch):
    monkeypatch.setattr(quant, "_BACKENDS", {})


def test_compute_backend_resolved_once_per_device(monkeypatch, fresh_backends, caplog):
    calls = []

    def capability(device):
        calls.append(device)
        return (8, 9)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(quant, "_probe", lambda *a: True)
    with caplog.at_level(logging.INFO, logger="wanlite.ops.quant"):
        for _ in range(3):
            assert quant.compute_backend("fp8", CUDA, torch.bfloat16) == "scaled_mm"
        assert quant.compute_backend("int8", CUDA, torch.bfloat16) == "int_mm"
    assert len(calls) == 2  # once per (mode, device, dtype), not per call
    assert sum("scaled_mm" in r.getMessage() for r in caplog.records) == 1


def test_compute_backend_falls_back_with_one_log_line(monkeypatch, fresh_backends, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (8, 6))
    with caplog.at_level(logging.INFO, logger="wanlite.ops.quant"):
        for _ in range(3):
            assert quant.compute_backend("fp8", CUDA, torch.bfloat16) == "dequant"
    assert len([r for r in caplog.records if "dequantized per call" in r.getMessage()]) == 1


def test_compute_backend_falls_back_when_the_kernel_refuses(monkeypatch, fresh_backends):
    """A build without the kernel (the probe GEMM raises) gets today's path."""
    assert quant._probe("int_mm", CPU, torch.float32)  # the probe runs the real GEMM
    assert quant._probe("scaled_mm", CPU, torch.bfloat16)

    def refuse(*a, **k):
        raise RuntimeError("Rowwise scaling is not currently supported on your device")

    monkeypatch.setattr(quant, "w8a8_linear", refuse)
    assert not quant._probe("scaled_mm", CPU, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (9, 0))
    monkeypatch.setattr(quant, "_probe", lambda *a: False)
    assert quant.compute_backend("fp8", CUDA, torch.bfloat16) == "dequant"


def test_dispatch_by_shape(monkeypatch, fresh_backends):
    """_int_mm needs M > 16: smaller calls take the dequantizing path (None here)."""
    monkeypatch.setitem(quant._BACKENDS, ("int8", CPU, torch.float32), "int_mm")
    _, w, b = data()
    wq, sw = quant.quantize_weight(w, "int8")
    small = torch.randn(1, 16, 64)
    assert quant._low_precision_linear(small, wq, sw, b) is None
    big = torch.randn(1, 17, 64)
    y = quant._low_precision_linear(big, wq, sw, b)
    torch.testing.assert_close(y, quant.w8a8_linear(big, wq, sw, b))
    monkeypatch.setitem(quant._BACKENDS, ("int8", CPU, torch.float32), "dequant")
    assert quant._low_precision_linear(big, wq, sw, b) is None


def test_cpu_qlinear_keeps_the_dequantizing_path(fresh_backends):
    x, w, b = data()
    for mode in ("int8", "fp8"):
        wq, sw = quant.quantize_weight(w, mode)
        y = quant.qlinear(x.bfloat16(), wq, sw, b)
        ref = F.linear(x.bfloat16(), quant.dequantize(wq, sw, torch.bfloat16), b.bfloat16())
        torch.testing.assert_close(y, ref)
    assert quant._BACKENDS == {}  # CPU never asks for a low-precision GEMM


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_cuda_qlinear_backend(mode, fresh_backends):
    """On the GPU: the backend the capability allows, and its output against the dequantized
    linear within the activation-quantization error."""
    x, w, b = data(m=256, k=256, n=128)
    lin = torch.nn.Linear(256, 128).cuda()
    lin.weight.data, lin.bias.data = w.cuda(), b.cuda()
    q = quant.QLinear.from_linear(lin, mode).cuda()
    xb = x.cuda().bfloat16()
    y = q(xb)
    cap = torch.cuda.get_device_capability()
    expected = quant.resolve_compute(mode, CUDA, torch.bfloat16, cap)
    got = quant.compute_backend(mode, xb.device, torch.bfloat16)
    assert got in (expected, "dequant")  # dequant only if the probe GEMM was refused
    dense = F.linear(xb.float(), quant.dequantize(q.weight, q.weight_scale, torch.float32))
    assert y.dtype == torch.bfloat16
    assert rel_rms(y.float() - b.cuda(), dense) < REL_RMS[mode] + 0.01


# --- w8a8 on CPU (oneDNN) ---------------------------------------------------------------------

needs_w8a8 = pytest.mark.skipif(not quant.w8a8_available(), reason="no oneDNN int8 linear")


@needs_w8a8
def test_w8a8_linear_is_the_scaled_arithmetic():
    """oneDNN's u8 x s8 GEMM with the per-token scale applied after: the exact integer sums of
    ``scaled_reference`` (fp32 rounding only)."""
    x, w, b = data(m=40)
    lin = torch.nn.Linear(64, 32)
    lin.weight.data, lin.bias.data = w, b
    q = quant.QLinear.from_linear(lin, "int8")
    layer = quant.W8A8Linear(q)
    y = layer(x.view(2, 20, 64))
    assert y.shape == (2, 20, 32) and y.dtype == torch.float32
    qmax = quant._w8a8_qmax()  # 127, or 63 where oneDNN's pair sums would saturate (AVX2)
    xq, sx = quant.quantize_rows(x, "int8", qmax)
    assert xq.abs().max() == qmax
    ref = quant.scaled_reference(xq, sx, q.weight, q.weight_scale, b, torch.float32)
    torch.testing.assert_close(y.view(40, 32), ref, rtol=1e-5, atol=1e-5)
    dense = F.linear(x, quant.dequantize(q.weight, q.weight_scale, torch.float32))
    assert rel_rms(y.view(40, 32) - b, dense) < REL_RMS["int8"] * 127 / qmax
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert list(layer.state_dict()) == []  # inference only: nothing persistent


@needs_w8a8
def test_w8a8_saturation_probe_is_exact_at_the_chosen_range():
    """The worst case (every activation at +qmax, every weight at +127) sums exactly at the
    range ``_w8a8_qmax`` chose; at 127 on a CPU where it chose 63, it would not."""
    qmax = quant._w8a8_qmax()
    w = torch.full((8, 64), 127, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    x = torch.ones(4, 64)
    y = quant._onednn_w8a8(x, packed, torch.ones(8), None, qmax)
    torch.testing.assert_close(y, torch.full_like(y, 64 * 127.0), rtol=1e-5, atol=0)
    if qmax == 63:
        y127 = quant._onednn_w8a8(x, packed, torch.ones(8), None, 127)
        assert (y127 - y).abs().max() > 100  # saturated: far off


@needs_w8a8
def test_use_w8a8_swaps_int8_layers_only():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    quant.quantize(model, "int8")
    model[1] = quant.QLinear.from_linear(torch.nn.Linear(16, 16), "fp8")
    assert quant.use_w8a8(model) == 1
    assert isinstance(model[0], quant.W8A8Linear) and isinstance(model[1], quant.QLinear)
    with pytest.raises(ValueError, match="int8"):
        quant.W8A8Linear(model[1])


def _frames_psnr(a, b) -> float:
    mse = ((a.astype("float64") - b.astype("float64")) ** 2).mean()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()


@needs_w8a8
def test_w8a8_generation(tiny_checkpoint):
    """quant="w8a8" end to end on the tiny checkpoint: the blocks' linears run by oneDNN, and
    the frames against the fp32 run as close as int8 weight-only's (PSNR, uint8 levels; random
    weights, so a floor, not a quality figure)."""
    from wanlite import Options
    from wanlite.pipeline import Pipeline

    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2, seed=5, progress=False)
    frames = {}
    for q in ("none", "int8", "w8a8"):
        pipe = Pipeline(tiny_checkpoint, Options(device="cpu", dtype="float32", quant=q))
        frames[q] = pipe.generate("a red boat", **kw).frames
        kinds = {type(m).__name__ for m in pipe.components["transformer"].module.blocks.modules()}
        assert ("W8A8Linear" in kinds) == (q == "w8a8")
        del pipe
    p_int8 = _frames_psnr(frames["int8"], frames["none"])
    p_w8a8 = _frames_psnr(frames["w8a8"], frames["none"])
    print(f"frames PSNR vs fp32: int8 {p_int8:.1f} dB, w8a8 {p_w8a8:.1f} dB")
    assert p_w8a8 > 30 and not (frames["w8a8"] == frames["none"]).all()
