import json
import subprocess
import sys

from wanlite.cli import main
from wanlite.params import json_schema
from wanlite.video import read_mp4


def test_schema_prints_the_json_schema(capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()


def test_generate_random_tiny(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "v.mp4"
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "a cat", "--out", str(out)]
    args += ["--height", "33", "--width", "40", "--num-frames", "6", "--num-inference-steps", "2"]
    args += ["--seed", "11", "--quiet", "--cache", "firstblock", "--cache-threshold", "1e6"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "seed: 11" in printed and "denoise:" in printed and "peak" in printed
    assert "DiT forwards: 4, skipped by the step cache: 0" in printed  # 2 steps: first and last
    assert "(6 frames, 40x33, 16 fps)" in printed
    assert "NAG" not in printed  # off: not mentioned
    assert read_mp4(out).shape == (6, 33, 40, 3)


def test_generate_summary_names_nag_when_on(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "v.mp4"
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "a cat", "--out", str(out)]
    args += ["--height", "16", "--width", "16", "--num-frames", "1", "--num-inference-steps", "1"]
    args += ["--guidance-scale", "1", "--negative-prompt", "a dog", "--quiet"]
    assert main(args + ["--nag-scale", "11", "--nag-tau", "3", "--nag-alpha", "0.5"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "NAG: scale 11, tau 3, alpha 0.5" in printed
    assert main(args + ["--nag-scale", "7.5"]) == 0  # the defaults of tau and alpha
    assert "NAG: scale 7.5, tau 2.5, alpha 0.25" in capsys.readouterr().out.splitlines()


def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path):
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "wanlite.cli", "generate", "--model", "random:none"]
    cmd += ["--prompt", "x", "--height", "481", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: height must be an integer in [1, 480], got 481"
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    args = ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "v.mp4")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
