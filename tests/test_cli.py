import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import wanlite
import wanlite.pipeline
from wanlite.cli import SECTIONS, _publish, main, parse_size, request_size
from wanlite.params import json_schema
from wanlite.video import read_metadata, read_mp4


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
    args += ["--guidance-scale", "1", "--negative-prompt", "a dog", "--quiet", "--overwrite"]
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


# -- the parser: sections, choices, defaults, --version, one logging scheme ----------------------
def _sections(command: str) -> dict[str, set[str]]:
    """{section title: its option strings} of a sub-command's parser."""
    from wanlite.cli import parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    groups = sub.choices[command]._action_groups
    return {g.title: {s for a in g._group_actions for s in a.option_strings} for g in groups}


@pytest.mark.parametrize("command", ["generate", "serve", "worker"])
def test_flags_are_in_sections(command):
    sections = _sections(command)
    for title in SECTIONS[1:]:  # generate's request section; serve's has --limits only
        assert sections[title], title
    want = {
        "request": {"--limits"},
        "model and files": {"--model"},
        "precision and memory": {"--device", "--dtype", "--quant", "--offload", "--max-memory"},
        "speed": {"--attention", "--cache", "--compile", "--decoder", "--parallel"},
        "accelerators": {"--lora", "--sampler", "--timesteps", "--nag-scale"},
        "output and logging": {"--log-level", "-q", "--quiet"},
    }
    for title, flags in want.items():
        assert flags <= sections[title], (title, flags - sections[title])
    # no flag is left in the catch-all section but --help (and the server's own sections)
    assert sections["options"] == {"-h", "--help"}
    if command == "generate":
        assert {"--prompt", "--size", "--height", "--width", "--seed"} <= sections["request"]
        assert {"--out", "--overwrite", "--preview"} <= sections["output and logging"]
        assert {"--transformer", "--vae", "--tokenizer"} <= sections["model and files"]
    if command == "serve":
        assert {"--host", "--port", "--api-key"} <= sections["server"]
        assert {"--store", "--results"} <= sections["job store"]


def test_help_shows_choices_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--quant {none,int8,fp8,w8a8}" in text and "--cache {off,teacache,firstblock}" in text
    assert "(default: auto)" in text and "(default: 2.5)" in text  # --device, --nag-tau
    assert "(default: 480)" in text and "(default: 30, or the preset's)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    for title in SECTIONS:
        assert f"{title}:" in text


def test_a_value_outside_a_closed_set_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", "--quant", "int4"])
    assert e.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"wanlite {wanlite.__version__}"


def test_quiet_is_log_level_warning_in_every_command():
    from wanlite.cli import parser

    p = parser()
    base = {"generate": ["--prompt", "x"], "convert": ["--out-dir", "d"], "bench": []}
    for command in ("generate", "convert", "bench", "serve", "worker"):
        argv = [command, *base.get(command, [])]
        assert p.parse_args(argv).log_level == "info"
        assert p.parse_args([*argv, "-q"]).log_level == "warning"
        assert p.parse_args([*argv, "--quiet"]).log_level == "warning"
        assert p.parse_args([*argv, "--log-level", "debug"]).log_level == "debug"


def test_bench_and_convert_spell_like_generate():
    from wanlite.cli import parser

    p = parser()
    argv = ["bench", "--num-inference-steps", "3", "--out-dir", "b", "--size", "64x32"]
    args = p.parse_args(argv)
    assert (args.steps, str(args.out), args.size) == (3, "b", "64x32")
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--steps", "3"])  # the one spelling is --num-inference-steps
    assert str(p.parse_args(["convert", "--out-dir", "c"]).out) == "c"


# -- --size ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,want", [("640x480", (480, 640)), ("832*480", (480, 832)), (" 16 X 24 ", (24, 16))]
)
def test_size_is_width_first_in_both_forms(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["640", "640x", "x480", "640x480x3", "-1x5", "6.5x4", "axb", ""])
def test_bad_size_is_an_error_naming_the_flag(text):
    with pytest.raises(ValueError, match=r"--size must be WIDTHxHEIGHT"):
        parse_size(text)


def test_size_and_width_or_height_conflict():
    ns = argparse.Namespace
    assert request_size(ns(size=None, height=None, width=None), 480, 640) == (480, 640)
    assert request_size(ns(size=None, height=32, width=None), 480, 640) == (32, 640)
    assert request_size(ns(size="64x32", height=None, width=None), 480, 640) == (32, 64)
    for h, w in ((32, None), (None, 64), (32, 64)):  # even when they agree
        with pytest.raises(ValueError, match="--size sets the width and height"):
            request_size(ns(size="64x32", height=h, width=w), 480, 640)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--size", "832*480"], "error: width must be an integer in [1, 640], got 832"),
        (["--size", "64x48", "--height", "48"], "error: --size sets the width and height: "),
        (["--size", "64by48"], "error: --size must be WIDTHxHEIGHT, e.g. 640x480 or 832*480, "),
    ],
)
def test_size_errors_are_one_line_before_loading(tmp_path, extra, message):
    cmd = [sys.executable, "-m", "wanlite.cli", "generate", "--model", "random:none"]
    cmd += ["--prompt", "x", "--out", str(tmp_path / "v.mp4"), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(message), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_size_with_model_limits_reaches_the_model(tmp_path, capsys):
    """832*480 is out of the hosted ranges, within --limits model: the error is then the
    (missing) model's, so the size was accepted."""
    argv = ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--size", "832*480"]
    assert main([*argv, "--limits", "model", "--out", str(tmp_path / "v.mp4")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


# -- outputs: never replaced silently, with their settings -----------------------------------------
TINY_RUN = ["--num-frames", "6", "--num-inference-steps", "2", "--guidance-scale", "3"]


def test_without_out_a_new_name_every_time(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "a cat", "--size", "16x16"]
    argv += ["--num-frames", "1", "--num-inference-steps", "1", "--seed", "5", "-q"]
    assert main(argv) == 0
    assert main(argv) == 0  # the same second, perhaps: then "-2"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2, names  # both kept, no temp file left
    for name in names:
        assert re.fullmatch(r"wanlite-\d{8}-\d{6}-seed5(-2)?\.mp4", name), name
        assert read_mp4(tmp_path / name).shape == (1, 16, 16, 3)
    printed = capsys.readouterr().out
    assert all(f"saved: {name} (1 frames, 16x16, 16 fps)" in printed for name in names)


def test_a_new_name_never_replaces_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    taken = tmp_path / "wanlite-20261206-081500-seed7.mp4"
    taken.write_bytes(b"yesterday")
    tmp = tmp_path / ".part.mp4"
    tmp.write_bytes(b"today")
    path = _publish(tmp, None, False, "20261206-081500", 7)
    assert path == Path("wanlite-20261206-081500-seed7-2.mp4")
    assert taken.read_bytes() == b"yesterday" and path.read_bytes() == b"today"
    assert not tmp.exists()


def test_existing_out_is_refused_before_any_model_work(tmp_path, monkeypatch, capsys):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"\x00old video\xff" * 100)
    before = out.read_bytes()
    monkeypatch.setattr(wanlite.pipeline, "load", _no_load)  # the model is never touched
    argv = ["generate", "--model", "random:tiny", "--prompt", "x", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "exists: add --overwrite to replace it" in err
    assert out.read_bytes() == before and list(tmp_path.iterdir()) == [out]


def test_an_unwritable_out_folder_is_refused_before_any_model_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wanlite.pipeline, "load", _no_load)
    (tmp_path / "file").write_text("not a folder")
    argv = ["generate", "--model", "random:tiny", "--prompt", "x"]
    assert main([*argv, "--out", str(tmp_path / "file" / "v.mp4")]) == 2
    assert "error: cannot write a video into" in capsys.readouterr().err


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before --out was checked")


def test_overwrite_replaces_and_the_video_carries_its_settings(tmp_path, tiny_checkpoint):
    import av

    out = tmp_path / "v.mp4"
    out.write_bytes(b"old")
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "un chat, été", "-q"]
    argv += ["--negative-prompt", "blur", "--size", "40*33", "--seed", "11", *TINY_RUN]
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert read_mp4(out).shape == (6, 33, 40, 3)
    assert list(tmp_path.iterdir()) == [out]  # no temp file left
    want = {
        "prompt": "un chat, été",
        "height": 33,
        "width": 40,
        "negative_prompt": "blur",
        "num_inference_steps": 2,
        "num_frames": 6,
        "guidance_scale": 3.0,
        "seed": 11,
        "model": tiny_checkpoint.name,
        "wanlite": wanlite.__version__,
    }
    assert read_metadata(out) == want
    with av.open(str(out)) as container:  # what ffprobe's format tags show
        tags = dict(container.metadata)
    assert tags["title"] == "un chat, été" and json.loads(tags["comment"]) == want


def test_decode_has_a_progress_bar_like_denoise(tmp_path, tiny_checkpoint, capsys):
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "a cat", "--size", "16x16"]
    argv += [*TINY_RUN, "--out", str(tmp_path / "v.mp4")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert re.search(r"denoise: 100%.*\b2/2\b", err), err
    assert re.search(r"decode: 100%.*\b6/6\b", err), err  # frames
    assert main([*argv, "--overwrite", "-q"]) == 0
    err = capsys.readouterr().err
    assert "decode" not in err and "denoise" not in err


def test_quantize_is_a_deprecated_alias_of_convert_quant(tmp_path, tiny_checkpoint, capsys):
    from wanlite.runtime.lifecycle import QUANT_META
    from wanlite.weights.tensorstore import TensorStore

    out = tmp_path / "q8"
    argv = ["quantize", "--model", str(tiny_checkpoint), "--quant", "int8", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "deprecated: use `wanlite convert --model" in captured.err
    assert "--quant int8 --out-dir" in captured.err and "wrote a int8 checkpoint" in captured.out
    store = TensorStore(sorted((out / "transformer").glob("*.safetensors")))
    assert store.metadata[QUANT_META] == "int8"
