"""``scripts/gpu_check.py`` stays runnable: its CPU quick mode runs here, in CI."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def test_quick_cpu_check_prints_a_table_and_one_json_line():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert "peak memory per phase" in proc.stdout  # the table came first
    keys = ("device", "dtype", "model", "size", "tests", "parity", "wall", "memory", "attention")
    assert set(keys) <= set(result)
    assert result["device"] == "cpu" and result["model"] == "random:tiny"
    # CUDA-marked tests are listed, skipped here with the reason.
    assert result["tests"] and all(t["outcome"] == "skipped" for t in result["tests"])
    assert all(t["reason"] == "needs a CUDA device" for t in result["tests"])
    assert result["parity"]["psnr_db"] > 40  # fp32 on both sides: the same video
    assert result["wall"]["wanlite_generate_s"] > 0 and result["wall"]["speedup"] > 0
    modes = {(m["offload"], m["quant"]) for m in result["memory"]}
    assert modes == {(o, q) for o in ("none", "model", "blocks") for q in ("none", "int8", "fp8")}
    for m in result["memory"]:
        assert m["status"] == "ok", m
        assert set(m["peak"]) == set(m["estimate"]) == {"encode", "denoise", "decode"}
    backends = {a["backend"]: a["status"] for a in result["attention"]}
    assert backends["sdpa"] == "ok" and backends["math"] == "ok"
    assert all(s == "ok" or s.startswith("unavailable: ") for s in backends.values())
