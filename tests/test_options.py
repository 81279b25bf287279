"""``Options``: the "auto" dtype from the hardware (both branches on any host)."""

import logging

import pytest
import torch

from wanlite import options
from wanlite.options import Options, cpu_bf16_flag, cuda_auto_dtype
from wanlite.params import ParamError

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


# --- what diffusers users type: torch dtypes, Path objects; errors name the option ------------


@pytest.mark.parametrize(
    "given,name",
    [(torch.bfloat16, "bfloat16"), (torch.float32, "float32"), (torch.float16, "float16")]
    + [("bf16", "bfloat16"), ("fp32", "float32"), ("float16", "float16"), ("auto", "auto")],
)
def test_dtypes_are_accepted_as_torch_dtypes_or_names_and_kept_canonical(given, name):
    o = Options(dtype=given, vae_dtype=given)
    assert (o.dtype, o.vae_dtype) == (name, name)
    if name != "auto":
        assert o.resolve_dtype(CPU) is getattr(torch, name)
        assert o.resolve_vae_dtype(torch.float32) is getattr(torch, name)
    assert Options(dtype=given) == Options(dtype=name)  # one normal form: equal options


@pytest.mark.parametrize("field", ["dtype", "vae_dtype"])
@pytest.mark.parametrize("bad", [torch.int8, torch.float64, "half", None, 16])
def test_other_dtypes_are_a_param_error_naming_the_field(field, bad):
    with pytest.raises(ParamError, match=rf"^{field} must be one of .*torch.bfloat16") as e:
        Options(**{field: bad})
    assert e.value.field == field


def test_paths_may_be_path_objects_and_are_kept_as_str(tmp_path):
    lora = tmp_path / "dir:with:colons" / "a.safetensors"  # a Path is a path, never "PATH:SCALE"
    o = Options(cast_cache=tmp_path / "cast", tae=tmp_path / "t.pth", lora=[lora, (lora, 0.5)])
    assert o.cast_cache == str(tmp_path / "cast") and o.tae == str(tmp_path / "t.pth")
    assert o.lora == ((str(lora), 1.0), (str(lora), 0.5))
    assert o.resolve_cast_cache() == tmp_path / "cast"
    assert Options(lora=[f"{lora}:0.25"]).lora == ((str(lora), 0.25),)  # a str spec still is
    assert Options(decoder="taew2_1", tae=tmp_path / "t.pth").tae == str(tmp_path / "t.pth")
    for bad in ((3, 1.0), ("", 1.0), (lora, True)):
        with pytest.raises(ParamError, match="lora") as e:
            Options(lora=[bad])
        assert e.value.field == "lora"


def test_limits_option():
    assert Options().limits == "hosted" and Options(limits="model").limits == "model"
    with pytest.raises(ParamError, match=r"limits must be one of \('hosted', 'model'\)") as e:
        Options(limits="native")
    assert e.value.field == "limits"


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"quant": "int4"}, "quant"),
        ({"cfg_skip_last": 1.0}, "cfg_skip_last"),
        ({"shift": 0}, "shift"),
        ({"max_memory": "lots"}, "max_memory"),
        ({"timesteps": "a,b"}, "timesteps"),
        ({"parallel": "ring=2"}, "parallel"),
        ({"nag_scale": 1.0}, "nag_scale"),
        ({"decoder": "taew2_1"}, "tae"),
        ({"cast_cache": 3}, "cast_cache"),
    ],
)
def test_every_option_error_is_a_param_error_naming_the_option(kw, field):
    with pytest.raises(ParamError) as e:
        Options(**kw)
    assert e.value.field == field and field in str(e.value)


def test_limits_is_a_runtime_flag():
    import argparse

    parser = argparse.ArgumentParser()
    options.add_runtime_options(parser)
    assert parser.parse_args([]).limits == "hosted"
    args = parser.parse_args(["--limits", "model"])
    assert Options(**options.runtime_options(args)).limits == "model"


# -- the command-line flags (FLAGS, CHOICES, GROUPS) -------------------------------------------
def test_every_flag_is_in_exactly_one_help_section():
    names = [name for name, _, _ in options.FLAGS]
    placed = [name for section in options.GROUPS.values() for name in section]
    assert sorted(placed) == sorted(names)  # each once, none unknown


def test_choices_are_what_options_accepts():
    from wanlite.ops.attention import NAMES

    assert options.CHOICES["attention"] == NAMES
    flags = {name for name, _, _ in options.FLAGS}
    for name, allowed in options.CHOICES.items():
        assert name in flags, name
        extra = {"tae": "taew2_1.pth"} if name == "decoder" else {}
        for value in allowed:
            Options(**{name: value}, **extra)  # accepted
        if name != "attention":  # checked when resolved, against the device (ops.attention)
            with pytest.raises(ValueError, match=name):
                Options(**{name: "nonsense"})


def test_runtime_flags_parse_into_options_and_refuse_other_values():
    import argparse

    p = argparse.ArgumentParser(formatter_class=options.HelpFormatter)
    options.add_runtime_options(p)
    args = p.parse_args(["--quant", "int8", "--dtype", "bf16", "--lora", "a.safetensors:0.5"])
    o = Options(**options.runtime_options(args))
    assert (o.quant, o.dtype, o.lora) == ("int8", "bfloat16", (("a.safetensors", 0.5),))
    with pytest.raises(SystemExit):
        p.parse_args(["--offload", "disk"])
    titles = [g.title for g in p._action_groups if g._group_actions]
    assert titles[1:] == list(options.GROUPS)  # after argparse's own "options" (--help)


def test_help_formatter_shows_only_real_defaults():
    import argparse

    p = argparse.ArgumentParser(formatter_class=options.HelpFormatter)
    p.add_argument("--a", default="auto", help="a")
    p.add_argument("--b", default=None, help="b")
    p.add_argument("--c", action="store_true", help="c")
    p.add_argument("--d", type=int, default=0, help="d")
    p.add_argument("--e", default="x", help="e (default: y, or the preset's)")
    text = " ".join(p.format_help().split())
    assert "a (default: auto)" in text and "d (default: 0)" in text
    assert "b (default" not in text and "c (default" not in text
    assert "e (default: y, or the preset's)" in text and "(default: x)" not in text
