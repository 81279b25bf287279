import pytest
import torch
from torch import nn

from wanlite.ops import quant
from wanlite.ops.quant import (
    PackedLinear,
    QLinear,
    pack_linears,
    quantize,
    quantize_weight,
    resolve_linear,
)

needs_onednn = pytest.mark.skipif(not quant.onednn_available(), reason="torch without oneDNN")


@pytest.mark.parametrize("mode,tol", [("int8", 0.01), ("fp8", 0.07)])
def test_qlinear_close_to_linear(mode, tol):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    q = QLinear.from_linear(lin, mode)
    rel = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
    print(f"{mode}: relative error {rel:.4f}")
    assert 0 < rel < tol  # quantized: close, but not the same weights


def test_int8_is_symmetric_per_output_channel():
    w = torch.tensor([[1.0, -0.5, 0.25], [100.0, 50.0, -100.0]])
    q, s = quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.allclose(s, torch.tensor([1 / 127, 100 / 127]))
    assert torch.allclose(q.float() * s[:, None], w, atol=s.max().item() / 2)


def test_quantize_swaps_linears_except_kept():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    quantize(model, "int8", keep=lambda name: name == "2")
    swapped = [n for n, m in model.named_modules() if isinstance(m, QLinear)]
    assert swapped == ["0"] and isinstance(model[2], nn.Linear)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8))
    quantize(meta, "fp8")
    assert meta[0].weight.is_meta and meta[0].weight.dtype == torch.float8_e4m3fn
    assert set(dict(meta.named_parameters())) == {"0.weight", "0.weight_scale", "0.bias"}


def test_bad_mode():
    for mode in ("int4", "bf16"):  # bf16 storage is a dtype, not a quantization mode
        with pytest.raises(ValueError, match="quantization mode"):
            quantize(nn.Linear(2, 2), mode)


def _linear_with_row_scales(out_features, in_features, row_max, seed=0):
    """A Linear whose rows have the given max |w| (a mix of tiny and large rows)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_features, out_features)
    w = torch.rand(out_features, in_features, generator=g) * 2 - 1
    w = w / w.abs().amax(1, keepdim=True) * torch.tensor(row_max)[:, None]
    lin.weight.data, lin.bias.data = w, torch.randn(out_features, generator=g) * 1e-3
    return lin


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_qlinear_matches_the_dequantized_fp32_layer(mode, dtype):
    """Per-row max |w| from 1e-3 to 4: the fp16 product before the scale would overflow (x @ q
    is 1/s = 127/1e-3 times larger), and a bf16-rounded scale would bias each row."""
    row_max = [1e-3, 2e-3, 0.5, 4.0] * 8
    lin = _linear_with_row_scales(len(row_max), 256, row_max)
    q = QLinear.from_linear(lin, mode)
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1)) * 20
    w = q.weight.float() * q.weight_scale[:, None]  # the dequantized fp32 reference
    ref = nn.functional.linear(x.to(dtype).float(), w, q.bias)
    got = q(x.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    # Per row, relative to that row's scale: one rounding of the weight, fp32-ish accumulation,
    # one rounding of the output (2**-8 for bf16's 8-bit mantissa, 2**-11 for fp16).
    eps = torch.finfo(dtype).eps
    err = (got.float() - ref).abs().amax((0, 1)) / ref.abs().amax((0, 1))
    print(f"{mode} {dtype}: worst per-row relative error {err.max().item():.2e} (eps {eps:.1e})")
    assert err.max().item() <= 4 * eps
    with torch.no_grad():  # fp32 is unchanged: the int weight times x, then the exact scale
        exact = nn.functional.linear(x, q.weight.float()) * q.weight_scale + q.bias
        assert torch.equal(q(x), exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_rounds_once_and_chunks_on_cpu(monkeypatch, dtype):
    lin = _linear_with_row_scales(37, 16, [1e-3, 3.0] * 18 + [0.1])
    w, s = quantize_weight(lin.weight.data, "int8")
    want = (w.float() * s[:, None]).to(dtype)
    monkeypatch.setattr(quant, "_DEQUANT_CHUNK", 5 * 16)  # 5-row chunks, the last one partial
    assert torch.equal(quant.dequantize(w, s, dtype), want)


@needs_onednn
def test_packed_linear_matches_linear_and_fuses_gelu():
    torch.manual_seed(0)
    lin = nn.Linear(96, 160)
    x = torch.randn(2, 7, 96)
    ref = lin(x)
    for gelu, want in ((False, ref), (True, nn.functional.gelu(ref, approximate="tanh"))):
        got = PackedLinear(lin, gelu_tanh=gelu)(x)
        err = (got - want).abs().max().item()
        print(f"packed (gelu={gelu}): max abs diff {err:.1e}")
        assert got.shape == want.shape and err <= 1e-5


@pytest.mark.skipif(
    not quant.onednn_available(torch.bfloat16), reason="no oneDNN bf16 GEMM on this CPU"
)
def test_packed_linear_in_bf16_matches_the_bf16_linear():
    """bf16 weights packed for oneDNN (AMX / AVX512-BF16 kernels where the CPU has them): the
    same bf16 GEMM as torch's, fused bias and GELU included (accumulation order may differ)."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 160).bfloat16()
    x = torch.randn(2, 7, 96).bfloat16()
    ref = lin(x).float()
    for gelu, want in ((False, ref), (True, nn.functional.gelu(ref, approximate="tanh"))):
        got = PackedLinear(lin, gelu_tanh=gelu)(x)
        assert got.dtype == torch.bfloat16 and PackedLinear(lin).packed.dtype == torch.bfloat16
        err = (got.float() - want).abs().max().item()
        print(f"packed bf16 (gelu={gelu}): max abs diff {err:.1e}")
        assert err <= 0.05 * want.abs().max().item()


@needs_onednn
def test_pack_linears_swaps_in_place_and_fuses_the_gelu():
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(approximate="tanh"), nn.Linear(32, 8))
    x = torch.randn(3, 8)
    with torch.no_grad():  # no autograd graph holding the weights
        want = model(x)
    dense = weakref.ref(model[0].weight)
    pack_linears(model, gelu_after=lambda name: name == "0")
    assert [type(m) for m in model] == [PackedLinear, nn.Identity, PackedLinear]
    assert dense() is None  # the dense weight is freed, not kept beside the packed one
    assert (model(x) - want).abs().max() <= 1e-6
    bad = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with pytest.raises(ValueError, match="tanh GELU"):
        pack_linears(bad, gelu_after=lambda name: name == "0")


@needs_onednn
def test_packed_weight_is_a_buffer_counted_at_its_size():
    """Memory accounting walks ``module.buffers()``: the packed weight (an opaque mkldnn
    tensor) must be there, not a plain attribute, and stay out of the state dict."""
    lin = nn.Linear(96, 160)
    packed = PackedLinear(lin)
    buffers = dict(packed.named_buffers())
    assert set(buffers) == {"packed", "bias"} and buffers["packed"].is_mkldnn
    assert not packed.state_dict()
    counted = sum(b.numel() * b.element_size() for b in packed.buffers() if b.is_mkldnn)
    assert counted == packed.packed.numel() * packed.packed.element_size()
    assert counted >= lin.weight.numel() * 4  # at least the fp32 weight it replaces


@needs_onednn
def test_resident_bytes_count_the_packed_dit(tiny_checkpoint):
    import wanlite

    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", dtype="float32", linear="onednn")
    dit = pipe.components["transformer"]
    dit.acquire(stream_blocks=False)
    packed = [m.packed for m in dit.module.modules() if isinstance(m, PackedLinear)]
    assert packed
    dense = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in [*dit.module.parameters(), *dit.module.buffers()]
        if not t.is_mkldnn
    }
    want = sum(dense.values()) + sum(p.numel() * p.element_size() for p in packed)
    assert dit.resident_bytes() == want


def test_linear_backend_is_resolved_once_with_clear_errors(monkeypatch):
    cpu, cuda, f32 = torch.device("cpu"), torch.device("cuda"), torch.float32
    assert resolve_linear("aten", cpu, f32, True) == "aten"
    assert resolve_linear("auto", cuda, torch.bfloat16, True) == "aten"
    assert resolve_linear("auto", cpu, torch.float16, True) == "aten"
    assert resolve_linear("auto", cpu, f32, False) == "aten"  # quantized, streamed or compiled
    with pytest.raises(ValueError, match="linear must be one of"):
        resolve_linear("mkl", cpu, f32, True)
    monkeypatch.setattr(quant, "onednn_available", lambda dtype=f32: False)
    assert resolve_linear("auto", cpu, f32, True) == "aten"
    with pytest.raises(RuntimeError, match="oneDNN"):
        resolve_linear("onednn", cpu, f32, True)
    monkeypatch.undo()
    if quant.onednn_available():
        assert resolve_linear("auto", cpu, f32, True) == "onednn"
    if quant.onednn_available(torch.bfloat16):
        assert resolve_linear("auto", cpu, torch.bfloat16, True) == "onednn"
    else:  # an AVX2-only CPU: oneDNN packs no bf16 here, auto keeps torch's GEMM
        assert resolve_linear("auto", cpu, torch.bfloat16, True) == "aten"
        with pytest.raises(RuntimeError, match="AVX512"):
            resolve_linear("onednn", cpu, torch.bfloat16, True)
    if quant.onednn_available():
        with pytest.raises(ValueError, match="resident CPU weights"):
            resolve_linear("onednn", cpu, f32, False)
