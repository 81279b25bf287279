import pytest
import torch
from torch import nn

from wanlite.quant import QLinear, quantize, quantize_weight, quantized_names


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
