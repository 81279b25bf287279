"""wanlite convert: single files -> a diffusers folder that diffusers and wanlite both load."""

import numpy as np
import pytest
import torch
from test_formats import RUN, generate, hf_t5, ours, write_st

from wanlite.cli import main
from wanlite.convert import convert
from wanlite.models.configs import TINY
from wanlite.weights import formats


@pytest.fixture(scope="module")
def single_files(tiny_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    parts = {c: ours(tiny_checkpoint, c) for c in ("transformer", "text_encoder", "vae")}
    files = {
        "transformer": write_st(
            d / "dit.safetensors", parts["transformer"], "model.diffusion_model."
        ),
        "text_encoder": write_st(d / "umt5.safetensors", hf_t5(parts["text_encoder"])),
        "vae": d / "Wan2.1_VAE.pth",
    }
    torch.save(parts["vae"], files["vae"])
    return files


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return generate(str(tiny_checkpoint)).frames


def test_converted_folder_loads_in_diffusers_and_wanlite_with_the_same_frames(
    tiny_checkpoint, single_files, reference, tmp_path
):
    from diffusers import WanPipeline

    out = convert(tmp_path / "converted", str(tiny_checkpoint), **single_files)
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no temporary folder left
    assert np.array_equal(generate(str(out)).frames, reference)  # wanlite: bit-identical
    pipe = WanPipeline.from_pretrained(str(out), dtype=torch.float32)
    theirs = pipe(
        prompt="a red fox",
        negative_prompt=" ",
        height=RUN["height"],
        width=RUN["width"],
        num_frames=RUN["num_frames"],
        num_inference_steps=RUN["num_inference_steps"],
        generator=torch.Generator("cpu").manual_seed(RUN["seed"]),
        output_type="np",
    ).frames[0]
    diff = np.abs(reference.astype(float) - theirs.astype(float) * 255).max()
    assert diff <= 1.0  # the bar of test_pipeline's parity with diffusers


def test_convert_without_a_model_through_the_cli(
    tiny_checkpoint, single_files, reference, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(formats, "FULL", TINY)  # the tiny sizes stand in for the 1.3B's
    args = [
        "convert",
        "--out-dir",
        str(tmp_path / "c"),
        "--tokenizer",
        str(tiny_checkpoint / "tokenizer"),
    ]
    for flag, path in single_files.items():
        args += [f"--{flag.replace('_', '-')}", str(path)]
    assert main(args) == 0
    assert "wrote a diffusers checkpoint" in capsys.readouterr().out
    assert np.array_equal(generate(str(tmp_path / "c")).frames, reference)


def test_convert_quantized_equals_quantizing_the_folder(tiny_checkpoint, single_files, tmp_path):
    from wanlite.runtime.lifecycle import quantize_checkpoint

    out = convert(tmp_path / "q", str(tiny_checkpoint), quant="int8", **single_files)
    want = quantize_checkpoint(tiny_checkpoint, tmp_path / "q_ref", "int8")
    assert np.array_equal(generate(str(out)).frames, generate(str(want)).frames)


def test_convert_refuses_a_non_empty_out(tiny_checkpoint, single_files, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        convert(tmp_path / "x", str(tiny_checkpoint), **single_files)
    assert (tmp_path / "x" / "keep").read_text() == "mine"
