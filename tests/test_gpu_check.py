"""``scripts/gpu_check.py`` stays runnable: its CPU quick mode runs here, in CI.  (CI also runs
it in a venv with torch and wanlite's own dependencies only: ``.ci/gpu_check_bare``.)"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SCRIPT = SCRIPTS / "gpu_check.py"
SECTIONS = ("env", "tests", "memory", "parity", "attention", "fp8", "causal")


def test_quick_cpu_check_prints_a_table_and_one_json_line():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--budget", "540"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert "peak memory per phase" in proc.stdout  # the table came first
    keys = ("device", "dtype", "model", "size", "tests", "parity", "wall", "memory", "attention")
    assert set(keys) <= set(result)
    assert [n for n in result["sections"] if n in SECTIONS] == list(SECTIONS)  # (and others')
    assert result["device"] == "cpu" and result["model"] == "random:tiny"
    for name in SECTIONS:  # each in its own process, within its limit
        s = result["sections"][name]
        assert s["status"] == "ok" or s["status"].startswith("skipped: "), (name, s)
        assert 0 < s["seconds"] <= s["limit_s"] + 5
    assert result["sections"]["fp8"]["status"] == "skipped: needs a CUDA GPU (sm89+)"
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
        assert m["device_used_peak"] is None  # the driver's figures exist on CUDA only
    rows = result["attention"]
    backends = {a["backend"]: a["status"] for a in rows if "backend" in a}
    kernels = {a["kernel"]: a["status"] for a in rows if "kernel" in a}
    assert backends["sdpa"] == "ok" and backends["math"] == "ok"
    assert kernels["sdpa:math"] == "ok" and kernels["sdpa:flash_attention"] == "ok"
    for s in [*backends.values(), *kernels.values()]:
        assert s == "ok" or s.startswith("unavailable: ")
    assert result["causal"]["status"] == "ok" and result["causal"]["chunks"]


def test_a_section_past_its_time_is_cut_and_reported(monkeypatch, capsys):
    """The driver kills a section at its limit and says so; the others still run."""
    sys.path.insert(0, str(SCRIPTS))
    import gpu_check

    monkeypatch.setitem(gpu_check.SECTIONS, "tests", (1, 1))  # pytest cannot collect in 1 s
    assert gpu_check.main(["--device", "cpu", "--quick", "--sections", "env,tests"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["sections"]["tests"]["status"].startswith("error: time limit 1 s")
    assert result["sections"]["env"]["status"] == "ok"
    assert result["env"]["torch"]


def test_wheels_are_unzipped_where_pip_cannot_install_them(tmp_path):
    """A wheel folder installs into a private folder; without a working pip, by unzipping."""
    sys.path.insert(0, str(SCRIPTS))
    import gpu_check

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "tinypkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("tinypkg/__init__.py", "VALUE = 42\n")  # no metadata: pip refuses it
    target = tmp_path / "site"
    report = gpu_check.install_wheels(wheels, target)
    assert report["status"] == "ok" and report["how"].startswith("unzipped")
    assert (target / "tinypkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert gpu_check.install_wheels(tmp_path / "site", tmp_path / "x")["status"].startswith(
        "error: no .whl"
    )
