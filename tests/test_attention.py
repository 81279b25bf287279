"""Tests for ``wanlite.ops.attention``: backend resolution, error messages and numerical agreement.

The CUDA-only backends (flash_attn, sage, xformers) are compared against the ``math`` reference
when they can run here; otherwise their test is skipped with the reason ``available()`` gives.
"""

import logging
import re

import pytest
import torch

from wanlite.ops import attention
from wanlite.ops.attention import (
    AUTO_ORDER,
    _math,
    _sdpa,
    available,
    chunked,
    function,
    resolve,
    resolve_name,
    unusable,
)

OPTIONAL = ("flash_attn", "sage", "xformers")
# (B, heads, Lq, Lk, head_dim)
SHAPES = [(1, 2, 16, 16, 8), (2, 3, 33, 33, 16), (1, 4, 40, 7, 32), (2, 1, 5, 50, 64)]


def _qkv(b, h, lq, lk, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


CPU, CUDA, F32, BF16, F16 = "cpu", "cuda", torch.float32, torch.bfloat16, torch.float16


def test_auto_on_cpu_is_sdpa_and_logs_why(caplog):
    caplog.set_level(logging.INFO, logger="wanlite.ops.attention")
    assert "sage" not in AUTO_ORDER  # not exact: only when asked for by name
    assert resolve_name("auto") == "sdpa"  # the defaults: CPU, fp32
    assert resolve_name("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    lines = [r.getMessage() for r in caplog.records if r.name == "wanlite.ops.attention"]
    assert len(lines) == 2 and all(r.levelno == logging.INFO for r in caplog.records)
    assert "sdpa" in lines[0] and "flash_attn" in lines[0]  # and why flash_attn was passed over
    assert callable(resolve("auto"))


@pytest.fixture
def fake_gpu(monkeypatch):
    """Every optional package installed and a CUDA device of the capability the test sets."""
    gpu = {"capability": (8, 0)}
    monkeypatch.setattr(attention, "_installed", lambda module: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        attention,
        "_cuda_capability",
        lambda d: gpu["capability"] if d.type == "cuda" else None,
    )
    return gpu


def test_auto_decides_from_device_dtype_and_gpu(fake_gpu):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_name("auto", cpu, F32) == "sdpa"  # flash-attn installed, but a CPU call
    assert resolve_name("auto", cpu, BF16) == "sdpa"
    assert resolve_name("auto", cuda, BF16) == "flash_attn"
    assert resolve_name("auto", cuda, F16) == "flash_attn"
    assert resolve_name("auto", cuda, F32) == "xformers"  # flash has no fp32 kernels
    fake_gpu["capability"] = (7, 5)  # T4: no flash-attn 2
    assert resolve_name("auto", cuda, F16) == "xformers"
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        resolve_name("flash_attn", cuda, F16)


def test_auto_without_optional_packages_is_sdpa_on_cuda(fake_gpu, monkeypatch):
    monkeypatch.setattr(attention, "_installed", lambda module: module is None)
    assert resolve_name("auto", torch.device("cuda"), BF16) == "sdpa"


def test_a_named_backend_that_cannot_run_the_call_is_an_error(fake_gpu):
    with pytest.raises(RuntimeError, match="'flash_attn' needs a CUDA device"):
        resolve_name("flash_attn", torch.device("cpu"), BF16)
    with pytest.raises(RuntimeError, match="'flash_attn' needs float16 or bfloat16"):
        resolve_name("flash_attn", torch.device("cuda"), F32)
    with pytest.raises(RuntimeError, match="'sage' needs float16 or bfloat16"):
        resolve("sage", torch.device("cuda:0"), F32)
    assert resolve_name("xformers", torch.device("cuda"), F32) == "xformers"
    assert resolve_name("math", torch.device("cpu"), F32) == "math"


@pytest.mark.parametrize(
    "name,device,dtype,capability,installed,needs",
    [
        ("flash_attn", CPU, BF16, None, True, "CUDA device"),
        ("flash_attn", CUDA, F32, (9, 0), True, "float16 or bfloat16"),
        ("flash_attn", CUDA, F16, (7, 0), True, "capability 8.0"),
        ("flash_attn", CUDA, BF16, (8, 0), False, "'flash_attn' package"),
        ("flash_attn", CUDA, BF16, (8, 6), True, None),
        ("xformers", CUDA, F32, (7, 0), True, None),
        ("xformers", CPU, F32, None, True, "CUDA device"),
        ("xformers", CPU, F32, None, False, "CUDA device"),  # the device first: no install hint
        ("sage", CUDA, F32, (9, 0), False, "float16 or bfloat16"),
        ("sage", CUDA, F16, (8, 9), True, None),
        ("sdpa", CPU, F32, None, False, None),
        ("math", CUDA, F16, (6, 1), False, None),
    ],
)
def test_unusable_is_a_pure_decision(name, device, dtype, capability, installed, needs):
    reason = unusable(name, device, dtype, capability, installed)
    assert reason is None if needs is None else needs in reason


def test_function_takes_a_resolved_name():
    assert function("math") is _math
    with pytest.raises(ValueError, match="'auto'"):
        function("auto")


def test_unknown_name_is_a_value_error_listing_the_choices():
    with pytest.raises(ValueError) as err:
        resolve_name("flash")
    msg = str(err.value)
    assert "'flash'" in msg
    assert all(repr(n) in msg for n in attention.NAMES)


@pytest.mark.parametrize("name", ["sdpa", "math"])
def test_builtin_backends_always_available(name):
    assert available(name) is None and available(name, "cpu", torch.bfloat16) is None
    assert resolve_name(name) == name


@pytest.mark.parametrize("name", OPTIONAL)
def test_unusable_backend_raises_with_reason(name):
    here = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = available(name, here, torch.float16)
    if reason is None:
        pytest.skip(f"{name} can run here")
    assert "package" in reason or "CUDA" in reason or "capability" in reason
    error = ImportError if "package" in reason else RuntimeError
    with pytest.raises(error, match=re.escape(reason)) as err:
        resolve(name, here, torch.float16)
    assert repr(name) in str(err.value)


@pytest.mark.parametrize("name", OPTIONAL)
def test_a_missing_package_is_an_import_error_naming_its_extra(fake_gpu, monkeypatch, name):
    """Where the backend could run, only its package missing: ImportError with the pip command
    of a wanlite extra that exists in pyproject.toml and lists the backend's package."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    monkeypatch.setattr(attention, "_installed", lambda module: module is None)
    with pytest.raises(ImportError, match=r"pip install .*'wanlite\[([a-z-]+)\]'") as err:
        resolve_name(name, torch.device("cuda"), BF16)
    extra = re.search(r"wanlite\[([a-z-]+)\]", str(err.value)).group(1)
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    package = attention._NEEDS[name].module
    dist = {"flash_attn": "flash-attn"}.get(package, package)
    assert any(req.startswith(dist) for req in extras[extra]), (extra, extras[extra])
    with pytest.raises(RuntimeError, match="CUDA device"):  # off CUDA the device is the reason
        resolve_name(name, torch.device("cpu"), BF16)


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


@pytest.mark.cuda
@pytest.mark.parametrize("name", OPTIONAL)
def test_optional_backend_matches_math(name):
    reason = available(name, dtype=torch.float16)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    q, k, v = _qkv(1, 2, 64, 48, 64, dtype=torch.float16, device="cuda")
    out = resolve(name, q.device, q.dtype)(q, k, v)
    ref = _math(q, k, v)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = 5e-2 if name == "sage" else 1e-2  # sage quantizes q/k to int8
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff <= tol, f"{name}: max abs diff {diff:.2e}"
