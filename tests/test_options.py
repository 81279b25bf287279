"""``Options``: the "auto" dtype from the hardware (both branches on any host)."""

import logging

import pytest
import torch

from wanlite import options
from wanlite.options import Options, cpu_bf16_flag, cuda_auto_dtype

CPU = torch.device("cpu")


def test_cpu_flag_names_the_native_bf16_feature():
    assert cpu_bf16_flag({"avx2", "fma3"}) is None  # AMD Zen 3: bf16 would be emulated
    assert cpu_bf16_flag({"avx512_f", "avx512_bf16"}) == "avx512_bf16"
    assert cpu_bf16_flag({"amx_tile", "amx_bf16", "avx512_bf16"}) == "amx_bf16"
    assert cpu_bf16_flag({"amx_tile", "amx_int8"}) is None  # int8 tiles only


@pytest.mark.parametrize("flags,want", [({"avx2"}, torch.float32), ({"amx_bf16"}, torch.bfloat16)])
def test_auto_dtype_on_cpu_follows_the_flags_and_logs_why(monkeypatch, caplog, flags, want):
    monkeypatch.delenv(options.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(options, "cpu_flags", lambda: flags)
    caplog.set_level(logging.INFO, logger="wanlite.options")
    assert Options(device="cpu").resolve_dtype(CPU) is want
    lines = [r.getMessage() for r in caplog.records if r.name == "wanlite.options"]
    assert len(lines) == 1 and str(want).removeprefix("torch.") in lines[0]
    assert ("amx_bf16" in lines[0]) == (want is torch.bfloat16)


def test_env_override_and_explicit_dtype(monkeypatch):
    monkeypatch.setattr(options, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setenv(options.CPU_BF16_ENV, "0")
    assert Options().resolve_dtype(CPU) is torch.float32
    monkeypatch.setattr(options, "cpu_flags", lambda: set())
    monkeypatch.setenv(options.CPU_BF16_ENV, "1")
    assert Options().resolve_dtype(CPU) is torch.bfloat16
    assert Options(dtype="fp32").resolve_dtype(CPU) is torch.float32  # asked for: no detection
    monkeypatch.setenv(options.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=options.CPU_BF16_ENV):
        Options().resolve_dtype(CPU)


def test_cpu_flags_are_what_torch_or_the_kernel_reports():
    flags = options.cpu_flags()
    try:
        with open("/proc/cpuinfo") as f:
            listed = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    for feature in ("amx_bf16", "avx512_bf16"):
        assert (feature in flags) == (f" {feature}" in listed), feature


@pytest.mark.parametrize(
    "capability,hip,want",
    [
        ((7, 0), False, "float16"),  # V100
        ((7, 5), False, "float16"),  # T4
        ((8, 0), False, "bfloat16"),  # A100
        ((8, 9), False, "bfloat16"),  # L4 / RTX 40xx
        ((9, 0), False, "bfloat16"),  # H100
        ((9, 4), True, "bfloat16"),  # ROCm (MI300): bf16 everywhere
    ],
)
def test_cuda_auto_dtype_is_bf16_only_where_native(capability, hip, want):
    assert cuda_auto_dtype(capability, hip) == want


@pytest.mark.cuda
def test_cuda_auto_dtype_agrees_with_torch_on_each_device():
    for i in range(torch.cuda.device_count()):
        got = Options().resolve_dtype(torch.device("cuda", i))
        with torch.cuda.device(i):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        assert got is (torch.bfloat16 if native else torch.float16)


def test_auto_vae_dtype_follows_a_bf16_dit_and_never_picks_fp16():
    auto = Options()
    assert auto.resolve_vae_dtype(torch.bfloat16) == torch.bfloat16
    assert auto.resolve_vae_dtype(torch.float32) == torch.float32
    assert auto.resolve_vae_dtype(torch.float16) == torch.float32
    assert Options(vae_dtype="float32").resolve_vae_dtype(torch.bfloat16) == torch.float32
    with pytest.raises(ValueError, match="vae_dtype"):
        Options(vae_dtype="int8")


def test_cast_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("WANLITE_CACHE", str(tmp_path))
    assert Options().resolve_cast_cache() == tmp_path / "cast"
    assert Options(cast_cache="off").resolve_cast_cache() is None
    assert Options(cast_cache=str(tmp_path / "x")).resolve_cast_cache() == tmp_path / "x"
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="cast_cache"):
            Options(cast_cache=bad)
