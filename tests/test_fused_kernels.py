"""Tests for the fused DiT kernels of ``wanlite.kernels`` (``fused_norm``, ``gated``).

The Triton kernels run under ``TRITON_INTERPRET=1`` on the CPU (tiny shapes, seconds) against
their torch references (``fused_reference``); the references are held to the model's own
functions (``wanlite.models.dit``), so kernel == reference == model.  Widths that are not
powers of two (masked lanes), strided inputs (q / k slices of a fused qkv output, modulation
chunks) and a broadcast batch are covered.  GPU timing is scripts/gpu_check.py's.
"""

import os
import sys

import pytest
import torch
from torch import nn

os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit runs: kernels run in the interpreter
if sys.platform == "linux":  # the test extra installs triton there: never skip in CI
    import triton  # noqa: F401
else:
    pytest.importorskip("triton")

from wanlite.kernels import fused_norm, fused_reference, gated  # noqa: E402
from wanlite.models import dit  # noqa: E402


def _interpreted(module):
    """``module`` with its kernels in the interpreter (reloaded if imported before the env)."""
    kernel = next(v for k, v in vars(module).items() if k.startswith("_") and hasattr(v, "fn"))
    if type(kernel).__name__ != "InterpretedFunction":
        import importlib

        importlib.reload(module)
    return module


fused_norm, gated = _interpreted(fused_norm), _interpreted(gated)


def _bf16_close(a, b):
    """Within two bf16 roundings of the values' scale (the model rounds in between)."""
    torch.testing.assert_close(a.float(), b.float(), rtol=2 * 2**-8, atol=2 * 2**-8)


def _qk(batch, length, heads, d, seed=0, dtype=torch.float32):
    """The q slice of a fused [B, L, 3D] projection output: strided rows, as the model has."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(batch, length, 3 * heads * d, generator=g) * 3).to(dtype)
    return qkv[..., : heads * d], torch.rand(heads * d, generator=g) + 0.5


def _modulation(batch, d, seed=1):
    """(shift, scale, gate) as the block takes them: chunks of modulation + e0, [B, 1, D]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 6, d, generator=g) * 0.5).chunk(6, 1)[:3]


@pytest.mark.parametrize("grid,heads,d", [((2, 2, 3), 3, 8), ((1, 3, 2), 2, 12)])
def test_qk_norm_rope_reference_is_the_model(grid, heads, d):
    length = grid[0] * grid[1] * grid[2]
    x, w = _qk(2, length, heads, d)
    norm = nn.RMSNorm(heads * d, eps=1e-6)
    norm.weight.data = w
    cos, sin = dit.rope_tables(grid, d, "cpu")
    with torch.no_grad():
        model = dit.apply_rope(norm(x).unflatten(-1, (heads, -1)), cos, sin)
    ref = fused_reference.qk_norm_rope(x, w, cos, sin, heads, 1e-6)
    torch.testing.assert_close(ref, model, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,grid,heads,d", [(2, (2, 2, 3), 3, 8), (1, (3, 1, 2), 2, 12)])
def test_qk_norm_rope_kernel(dtype, batch, grid, heads, d):
    length = grid[0] * grid[1] * grid[2]
    x, w = _qk(batch, length, heads, d, dtype=dtype)
    cos, sin = dit.rope_tables(grid, d, "cpu")
    out = fused_norm.qk_norm_rope(x, w, cos, sin, heads, 1e-6)
    ref = fused_reference.qk_norm_rope(x, w, cos, sin, heads, 1e-6)
    assert out.shape == (batch, length, heads, d) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        _bf16_close(out, ref)


def test_qk_norm_rope_rejects_mismatched_tables():
    x, w = _qk(1, 6, 2, 8)
    cos, sin = dit.rope_tables((1, 2, 3), 12, "cpu")  # tables of another head size
    with pytest.raises(ValueError, match="disagree"):
        fused_norm.qk_norm_rope(x, w, cos, sin, 2, 1e-6)


@pytest.mark.parametrize("mod_batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_modulate(mod_batch, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 10, 24, generator=g) * 4 + 1).to(dtype)
    shift, scale, _ = _modulation(mod_batch, 24)
    norm = nn.LayerNorm(24, 1e-6, elementwise_affine=False)
    model = dit._modulate(norm, x, shift, scale, torch.bfloat16)
    ref = fused_reference.layernorm_modulate(x, shift, scale, 1e-6, torch.bfloat16)
    torch.testing.assert_close(ref, model)  # the reference is the model's arithmetic
    out = fused_norm.modulate(norm, x, shift, scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    _bf16_close(out, ref)
    out32 = fused_norm.layernorm_modulate(x, shift, scale, 1e-6, torch.float32)
    ref32 = fused_reference.layernorm_modulate(x, shift, scale, 1e-6, torch.float32)
    torch.testing.assert_close(out32, ref32, rtol=1e-5, atol=1e-5)


def test_modulate_refuses_an_affine_norm():
    x = torch.randn(1, 4, 24)
    shift, scale, _ = _modulation(1, 24)
    with pytest.raises(ValueError, match="without affine"):
        fused_norm.modulate(nn.LayerNorm(24), x, shift, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mod_batch", [1, 2])
def test_gated_residual(dtype, mod_batch):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 1100, generator=g).to(dtype)  # D > BLOCK: two column tiles
    y = torch.randn(2, 5, 1100, generator=g).to(torch.bfloat16)
    gate = (torch.randn(mod_batch, 6, 1100, generator=g)).chunk(6, 1)[2]
    ref = fused_reference.gated_residual(x, y, gate)
    model = dit._gated_add(x.clone(), y, gate)
    torch.testing.assert_close(ref, model)
    before = x.clone()
    out = gated.gated_residual(x, y, gate)
    # bf16: one unit in the last place (the interpreter's fp32 -> bf16 cast may truncate)
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(out, ref, rtol=tol, atol=1e-6)
    if dtype == torch.float32:  # in place, as the model's fp32 stream is updated
        assert out.data_ptr() == x.data_ptr()
    else:
        assert torch.equal(x, before)


def test_dit_with_triton_kernels_matches_torch(tiny_checkpoint):
    """A tiny generation with ``fused="triton"`` (kernels interpreted) against ``fused="off"``:
    the same latents up to fp32 summation order, and the blocks really use the kernels."""
    from wanlite import Options
    from wanlite.pipeline import Pipeline

    kw = dict(height=16, width=16, num_frames=5, num_inference_steps=2, seed=3, progress=False)
    out = {}
    for fused in ("off", "triton"):
        opts = Options(device="cpu", dtype="float32", fused=fused, embed_cache=False)
        pipe = Pipeline(tiny_checkpoint, opts)
        out[fused] = pipe.generate("a boat", output_type="latent", **kw).latents
        dit_model = pipe.components["transformer"].module
        block = dit_model.blocks[0]
        assert (block.gated_add is gated.gated_residual) == (fused == "triton")
        assert (block.self_attn.norm_rope is not None) == (fused == "triton")
        del pipe
    torch.testing.assert_close(out["triton"], out["off"], rtol=1e-4, atol=1e-4)


def test_fused_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="fused='triton' runs on CUDA"):
        dit.check_fused("triton", torch.device("cpu"))
    assert dit.check_fused("triton", torch.device("cuda")) is True
    assert dit.check_fused("off", torch.device("cpu")) is False
