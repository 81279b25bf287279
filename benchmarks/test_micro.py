"""Microbenchmarks (pytest-benchmark) for the engine's hot kernels on CPU, at Wan 1.3B's shapes.

- attention backends on self-attention ``[1, 12, 1280, 128]`` fp32 (12 heads, head_dim 128;
  1280 tokens = a 256x256, 17-frame video), against the ``math`` reference;
- ``QLinear`` (int8, fp8 storage) and ``PackedLinear`` (fp32 weights packed for oneDNN, what
  resident fp32 blocks run on CPU) vs plain fp32 ``nn.Linear``, x ``[1, 1280, 1536]`` through
  1536->1536 and 1536->8960 layers;
- ``fused_linear`` over three fused 1536->1536 layers (one GEMM) vs three separate calls.

Every benchmark also checks its result (shape, closeness to the fp32 reference).  Run::

    python -m pytest benchmarks/test_micro.py --benchmark-only

``--benchmark-disable`` runs each once as a plain test: CI (``.ci/run``) does that after the
test suite, as a smoke test of these kernels and of this file (about a minute on 2 cores).  Not
collected by the default ``python -m pytest`` (testpaths is ``tests``).  Needs
``pytest-benchmark`` (``test`` extra).  The whole-model comparisons are the ``bench_*.py``
scripts beside it.
"""

import copy
from functools import cache

import pytest
import torch
from torch import nn

from wanlite.ops.attention import _math, available, chunked, resolve
from wanlite.ops.quant import PackedLinear, QLinear, fuse_linears, fused_linear, onednn_available

ROUNDS = dict(rounds=5, iterations=1)
HEADS, TOKENS, HEAD_DIM, DIM, FFN_DIM = 12, 1280, 128, 1536, 8960
CHUNK = 256


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


# --- attention --------------------------------------------------------------------------------


@cache
def _attn_case():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, TOKENS, HEAD_DIM, generator=g) for _ in range(3))
    return q, k, v, _math(q, k, v)


ATTN = {
    "sdpa": ("sdpa", None),
    "math": ("math", None),
    f"chunked_sdpa_{CHUNK}": ("sdpa", CHUNK),
    f"chunked_math_{CHUNK}": ("math", CHUNK),
    "flash_attn": ("flash_attn", None),
    "sage": ("sage", None),
    "xformers": ("xformers", None),
}


@pytest.mark.benchmark(group="attention [1,12,1280,128]")
@pytest.mark.parametrize("label", list(ATTN))
def test_attention(benchmark, label):
    name, chunk = ATTN[label]
    reason = available(name)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    fn = resolve(name) if name in ("sdpa", "math") else resolve(name, "cuda", torch.float16)
    if chunk is not None:
        fn = chunked(fn, chunk)
    q, k, v, ref = _attn_case()
    if name in ("sdpa", "math"):
        tol = 1e-4
    else:  # the optional backends are CUDA-only and half precision
        q, k, v = (t.to("cuda", torch.float16) for t in (q, k, v))
        tol = 5e-2 if name == "sage" else 1e-2

    def run():
        out = fn(q, k, v)
        if out.is_cuda:
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        out = benchmark.pedantic(run, **ROUNDS)
    assert out.shape == ref.shape
    diff = (out.float().cpu() - ref).abs().max().item()
    assert diff <= tol, f"{label}: max abs diff {diff:.2e}"


# --- quantized linear -------------------------------------------------------------------------


@cache
def _linear_case(out_features: int):
    torch.manual_seed(0)
    lin = nn.Linear(DIM, out_features).requires_grad_(False)
    x = torch.randn(1, TOKENS, DIM)
    with torch.inference_mode():
        return x, lin, lin(x)


# relative (Frobenius) error bound against the fp32 layer; packed: the same fp32 products,
# summed in another order
LINEAR_TOL = {"fp32": 0.0, "packed": 1e-5, "int8": 0.02, "fp8": 0.10}


@pytest.mark.parametrize("out_features", [DIM, FFN_DIM])
@pytest.mark.parametrize("mode", list(LINEAR_TOL))
def test_linear(benchmark, mode, out_features):
    benchmark.group = f"linear [1,1280,1536] -> {out_features}"
    x, lin, ref = _linear_case(out_features)
    if mode == "packed" and not onednn_available():
        pytest.skip("this torch build cannot pack fp32 weights for oneDNN")
    if mode in ("fp32", "packed"):
        layer = lin if mode == "fp32" else PackedLinear(lin)
    else:
        layer = QLinear.from_linear(lin, mode)
    with torch.inference_mode():
        out = benchmark.pedantic(layer, (x,), **ROUNDS)
    assert out.shape == (1, TOKENS, out_features) and out.dtype == torch.float32
    if mode == "fp32":
        assert torch.equal(out, ref)
    elif mode == "packed":
        assert _rel_err(out, ref) < LINEAR_TOL[mode]
    else:
        err = _rel_err(out, ref)
        assert 0 < err < LINEAR_TOL[mode], f"{mode}: relative error {err:.4f}"


# --- fused projections ------------------------------------------------------------------------


@pytest.mark.benchmark(group="qkv: 3 x linear 1536->1536")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_fused_qkv(benchmark, mode, fused):
    torch.manual_seed(0)
    lins = [nn.Linear(DIM, DIM).requires_grad_(False) for _ in range(3)]
    layers = lins if mode == "fp32" else [QLinear.from_linear(m, mode) for m in lins]
    separate = copy.deepcopy(layers)
    x = torch.randn(1, TOKENS, DIM)
    if fused:
        buffers = fuse_linears(layers)
        ptrs = {m.weight.untyped_storage().data_ptr() for m in layers}
        assert len(ptrs) == 1  # one weight buffer: fused_linear runs one GEMM
        w, s, b = (buffers[a] for a in ("weight", "weight_scale", "bias"))

        def run():
            return fused_linear(x, w, s, b, [DIM] * 3)
    else:

        def run():
            return [m(x) for m in separate]

    with torch.inference_mode():
        outs = benchmark.pedantic(run, **ROUNDS)
        refs = [m(x) for m in separate]
    assert len(outs) == 3
    for out, ref in zip(outs, refs):
        assert out.shape == (1, TOKENS, DIM)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
