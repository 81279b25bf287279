import pytest
import torch
from torch import nn

from wanlite import quant
from wanlite.quant import (
    PackedLinear,
    QLinear,
    pack_linears,
    quantize,
    quantize_weight,
    quantized_names,
    resolve_linear,
)

needs_onednn = pytest.mark.skipif(not quant.onednn_available(), reason="torch without oneDNN")


@pytest.mark.parametrize("mode,tol", [("int8", 0.01), ("fp8", 0.07), ("bf16", 0.005)])
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
    assert quantized_names(model) == ["0"] and isinstance(model[2], nn.Linear)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8))
    quantize(meta, "fp8")
    assert meta[0].weight.is_meta and meta[0].weight.dtype == torch.float8_e4m3fn
    assert set(dict(meta.named_parameters())) == {"0.weight", "0.weight_scale", "0.bias"}


def test_bad_mode():
    with pytest.raises(ValueError, match="quantization mode"):
        quantize(nn.Linear(2, 2), "int4")


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


def test_linear_backend_is_resolved_once_with_clear_errors(monkeypatch):
    cpu, cuda, f32 = torch.device("cpu"), torch.device("cuda"), torch.float32
    assert resolve_linear("aten", cpu, f32, True) == "aten"
    assert resolve_linear("auto", cuda, torch.bfloat16, True) == "aten"
    assert resolve_linear("auto", cpu, torch.bfloat16, True) == "aten"
    assert resolve_linear("auto", cpu, f32, False) == "aten"  # quantized, streamed or compiled
    with pytest.raises(ValueError, match="linear must be one of"):
        resolve_linear("mkl", cpu, f32, True)
    monkeypatch.setattr(quant, "onednn_available", lambda: False)
    assert resolve_linear("auto", cpu, f32, True) == "aten"
    with pytest.raises(RuntimeError, match="oneDNN"):
        resolve_linear("onednn", cpu, f32, True)
    monkeypatch.undo()
    if quant.onednn_available():
        assert resolve_linear("auto", cpu, f32, True) == "onednn"
        with pytest.raises(ValueError, match="resident fp32 CPU weights"):
            resolve_linear("onednn", cpu, f32, False)
