"""benchmarks/bench_quanto.py on the tiny DiT: every row runs, in its own process, and the
fidelity it reports is what the quantization schemes imply."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quanto.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_quanto", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quanto_imports() -> bool:
    try:
        import optimum.quanto  # noqa: F401  (not in the test extra: its row is optional)
    except ImportError:
        return False
    return True


def test_rows_run_and_fidelity_orders_as_the_schemes_do(capsys):
    quanto = _quanto_imports()
    rows = ["dense", "dense:aten", "int8", "fp8"] + (["quanto:qint8"] if quanto else [])
    argv = ["--config", "tiny", "--sizes", "32x32x5", "--repeat", "1", "--forwards", "2"]
    _script().main([*argv, "--variants", ",".join(rows), "--frames"])
    printed = capsys.readouterr().out
    assert "avx2" in printed or "host:" in printed
    result = json.loads(printed.strip().splitlines()[-1])
    res = result["results"]
    assert list(res) == rows and result["sizes"] == ["32x32x5"]
    fid = {v: r["fidelity"]["32x32x5"] for v, r in res.items()}
    assert fid["dense"]["rel_err"] == 0 and fid["dense"]["frames_psnr_db"] == float("inf")
    assert fid["dense:aten"]["rel_err"] < 1e-5  # the same fp32 weights, another GEMM
    # int8 (7 bits of mantissa-equivalent per row) is closer than fp8 e4m3 (3 bits)
    assert 0 < fid["int8"]["rel_err"] < fid["fp8"]["rel_err"] < 0.1
    assert fid["int8"]["psnr_db"] > fid["fp8"]["psnr_db"]
    for r in res.values():
        assert len(r["forward_s_each"]["32x32x5"]) == 2 and r["forward_s"]["32x32x5"] > 0
        assert r["forward_peak"]["32x32x5"] >= r["resident"] > 0
    if quanto:  # the same per-output-channel absmax / 127 scheme: the same outputs, nearly
        q = fid["quanto:qint8"]["rel_err"]
        assert q == pytest.approx(fid["int8"]["rel_err"], rel=0.05)


def test_bad_arguments_are_refused():
    script = _script()
    with pytest.raises(SystemExit):
        script.parse_args(["--variants", "int4"])
    with pytest.raises(SystemExit):
        script.parse_args(["--sizes", "100x128x9"])  # H not a multiple of 16
    with pytest.raises(SystemExit):
        script.parse_args(["--sizes", "128x128x8"])  # F not 4k + 1
    assert script.parse_args(["--sizes", "128x64x9"]).sizes == [(128, 64, 9)]
