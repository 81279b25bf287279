"""Tests for ``wanlite.attention``: backend resolution, error messages and numerical agreement.

The CUDA-only backends (flash_attn, sage, xformers) are compared against the ``math`` reference
when they can run here; otherwise their test is skipped with the reason ``available()`` gives.
"""

import logging
import re

import pytest
import torch

from wanlite import attention
from wanlite.attention import AUTO_ORDER, _math, _sdpa, available, chunked, resolve, resolve_name

OPTIONAL = ("flash_attn", "sage", "xformers")
# (B, heads, Lq, Lk, head_dim)
SHAPES = [(1, 2, 16, 16, 8), (2, 3, 33, 33, 16), (1, 4, 40, 7, 32), (2, 1, 5, 50, 64)]


def _qkv(b, h, lq, lk, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def test_auto_picks_sdpa_without_cuda_and_logs_it(caplog):
    caplog.set_level(logging.INFO, logger="wanlite.attention")
    assert "sage" not in AUTO_ORDER  # not exact: only when asked for by name
    expected = next((n for n in AUTO_ORDER if available(n) is None), "sdpa")
    if not torch.cuda.is_available():
        assert expected == "sdpa"
    assert resolve_name("auto") == expected
    assert any(
        r.name == "wanlite.attention" and r.levelno == logging.INFO and expected in r.getMessage()
        for r in caplog.records
    )
    assert callable(resolve("auto"))


def test_unknown_name_is_a_value_error_listing_the_choices():
    with pytest.raises(ValueError) as err:
        resolve_name("flash")
    msg = str(err.value)
    assert "'flash'" in msg
    assert all(repr(n) in msg for n in attention.NAMES)


@pytest.mark.parametrize("name", ["sdpa", "math"])
def test_builtin_backends_always_available(name):
    assert available(name) is None
    assert resolve_name(name) == name


@pytest.mark.parametrize("name", OPTIONAL)
def test_unusable_backend_raises_with_reason(name):
    reason = available(name)
    if reason is None:
        pytest.skip(f"{name} can run here")
    assert "package" in reason or "CUDA" in reason
    with pytest.raises(RuntimeError, match=re.escape(reason)) as err:
        resolve(name)
    assert repr(name) in str(err.value)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backends_agree_fp32(shape):
    q, k, v = _qkv(*shape)
    ref = _math(q, k, v)
    chunk = max(1, shape[2] // 3)  # smaller than Lq, and not dividing it in general
    outs = {
        "sdpa": _sdpa(q, k, v),
        "chunked sdpa": chunked(resolve("sdpa"), chunk)(q, k, v),
        "chunked math": chunked(resolve("math"), chunk)(q, k, v),
    }
    for name, out in outs.items():
        assert out.shape == (*shape[:3], shape[4]), name
        assert out.dtype == torch.float32, name
        diff = (out - ref).abs().max().item()
        assert diff <= 1e-5, f"{name}: max abs diff {diff:.2e}"


def test_chunk_not_smaller_than_l_is_a_passthrough():
    q, k, v = _qkv(1, 2, 8, 8, 8)
    assert torch.equal(chunked(_math, 8)(q, k, v), _math(q, k, v))


def test_math_keeps_bf16_dtype():
    q, k, v = _qkv(1, 2, 12, 20, 16, dtype=torch.bfloat16)
    out = _math(q, k, v)
    assert out.dtype == torch.bfloat16
    ref = _math(q.float(), k.float(), v.float())
    assert (out.float() - ref).abs().max().item() < 2e-2  # one bf16 rounding of the output


@pytest.mark.parametrize("name", OPTIONAL)
def test_optional_backend_matches_math(name):
    reason = available(name)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    q, k, v = _qkv(1, 2, 64, 48, 64, dtype=torch.float16, device="cuda")
    out = resolve(name)(q, k, v)
    ref = _math(q, k, v)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = 5e-2 if name == "sage" else 1e-2  # sage quantizes q/k to int8
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff <= tol, f"{name}: max abs diff {diff:.2e}"
