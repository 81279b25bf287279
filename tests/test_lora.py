"""LoRA loading (wanlite.weights.lora): key families, scales, shape checks, and parity with
diffusers' ``load_lora_weights`` + ``set_adapters`` + ``fuse_lora``
on the tiny random checkpoint (fp32).

Every LoRA file here is made by the test.  The parity files use only what diffusers' loader
accepts (its musubi converter needs every projection of every block with an alpha; its
original-key converter ignores alpha outside the blocks); partial files and the keys diffusers
drops are tested against the expected delta directly."""

import json
import logging
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import wanlite
from wanlite.models.configs import read_model_config
from wanlite.models.dit import to_diffusers_key
from wanlite.weights.lora import LoraSet, dit_shapes, load_lora

BLOCK_LINEARS = [f"{a}_attn.{p}" for a in ("self", "cross") for p in "qkvo"] + ["ffn.0", "ffn.2"]
OTHER_LINEARS = ["text_embedding.0", "text_embedding.2", "time_projection.1", "head.head"]
GEN = dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=4.0)
PROMPT, NEG, SEED = "a red fox running through snow", "blurry", 1234


@pytest.fixture(scope="module")
def shapes(tiny_checkpoint):
    return dit_shapes(read_model_config(tiny_checkpoint).dit)


def _pair(shapes, layer, rank, g, size=0.1):
    """(up, down) for ``layer`` (ours) of the tiny model, random, delta ~ ``size`` per entry."""
    out, fan_in = shapes[layer + ".weight"][0], int(np.prod(shapes[layer + ".weight"][1:]))
    up = torch.randn(out, rank, generator=g) * size / rank**0.5
    down = torch.randn(rank, fan_in, generator=g)
    return up, down


def _layers(shapes, others=True):
    blocks = sorted({int(n.split(".")[1]) for n in shapes if n.startswith("blocks.")})
    layers = [f"blocks.{i}.{x}" for i in blocks for x in BLOCK_LINEARS]
    return layers + (OTHER_LINEARS if others else [])


def _original(shapes, seed, rank=4, prefix="diffusion_model.", ab=False, bias_on=("ffn.0",)):
    """Kijai/ComfyUI keys; alpha (float or int64) on block layers; diff_b on some of them."""
    g, sd = torch.Generator().manual_seed(seed), {}
    down_k, up_k = ("lora_A", "lora_B") if ab else ("lora_down", "lora_up")
    for i, layer in enumerate(_layers(shapes)):
        up, down = _pair(shapes, layer, rank, g)
        sd[f"{prefix}{layer}.{down_k}.weight"], sd[f"{prefix}{layer}.{up_k}.weight"] = down, up
        if layer.startswith("blocks."):
            alpha = torch.tensor(8) if i % 2 else torch.tensor(2.0)  # int64 and float32
            sd[f"{prefix}{layer}.alpha"] = alpha
        if layer.endswith(bias_on):
            sd[f"{prefix}{layer}.diff_b"] = torch.randn(up.shape[0], generator=g) * 0.1
    return sd


def _kohya(shapes, seed, rank=4, lead="lora_unet_"):
    """musubi keys with an alpha for every projection of every block (what diffusers reads)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for i, layer in enumerate(_layers(shapes, others=False)):
        up, down = _pair(shapes, layer, rank, g)
        k = lead + layer.replace(".", "_")
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = down, up
        sd[f"{k}.alpha"] = torch.tensor(float(2 + i % 3))
    return sd


def _peft(shapes, seed, rank=4, prefix="transformer."):
    """diffusers/PEFT keys (no alpha: scale 1), lora_B.bias on the FFNs."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for layer in _layers(shapes):
        up, down = _pair(shapes, layer, rank, g)
        k = prefix + to_diffusers_key(layer + ".weight").removesuffix(".weight")
        sd[f"{k}.lora_A.weight"], sd[f"{k}.lora_B.weight"] = down, up
        if ".ffn." in layer:
            sd[f"{k}.lora_B.bias"] = torch.randn(up.shape[0], generator=g) * 0.1
    return sd


def _write(tmp_path, name, sd, metadata=None):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


# --- parity with diffusers -------------------------------------------------------------------


def _ours(checkpoint, loras, **options):
    pipe = wanlite.load(
        str(checkpoint), device="cpu", dtype="float32", embed_cache=False, lora=loras, **options
    )
    return pipe.generate(PROMPT, negative_prompt=NEG, seed=SEED, progress=False, **GEN)


def _diffusers(checkpoint, loras):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(checkpoint), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
    pipe.set_adapters([f"l{i}" for i in range(len(loras))], [s for _, s in loras])
    pipe.fuse_lora()
    return pipe(
        prompt=PROMPT,
        negative_prompt=NEG,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        **GEN,
    ).frames[0]


def _levels(a: np.ndarray, b: np.ndarray) -> float:
    """Max difference in uint8 levels (diffusers' frames are floats in [0, 1])."""
    b = b * 255 if b.dtype != np.uint8 else b
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    """Frames without any LoRA (to show each LoRA changes the video)."""
    return _ours(tiny_checkpoint, [], offload="model").frames


FAMILIES = {
    "original": lambda s: _original(s, 1),
    "original_lora_AB": lambda s: _original(s, 2, ab=True),
    "kohya": lambda s: _kohya(s, 3),
    "peft": lambda s: _peft(s, 4),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_frames_match_diffusers(tiny_checkpoint, tmp_path, shapes, plain, family):
    path = _write(tmp_path, family, FAMILIES[family](shapes))
    loras = [(path, 0.8)]
    ours = _ours(tiny_checkpoint, loras, offload="model").frames
    ref = _diffusers(tiny_checkpoint, loras)
    diff, moved = _levels(ours, ref), _levels(ours, plain)
    print(f"lora {family}: frames max diff {diff:.3f} levels (the LoRA moves them {moved:.0f})")
    assert diff <= 1.0 and moved >= 10


def test_two_loras_add_up_like_diffusers(tiny_checkpoint, tmp_path, shapes, plain):
    loras = [
        (_write(tmp_path, "a", _original(shapes, 11)), 0.7),
        (_write(tmp_path, "b", _kohya(shapes, 12)), -0.4),
        (_write(tmp_path, "c", _peft(shapes, 13)), 0.5),
    ]
    ours = _ours(tiny_checkpoint, loras, offload="model").frames
    ref = _diffusers(tiny_checkpoint, loras)
    one = _diffusers(tiny_checkpoint, loras[:1])
    diff = _levels(ours, ref)
    print(
        f"lora x3: frames max diff {diff:.3f} levels (vs the first alone {_levels(ours, one):.0f})"
    )
    assert diff <= 1.0 and _levels(ours, one) >= 10


def test_int8_merges_before_quantizing(tiny_checkpoint, tmp_path, shapes):
    loras = [(_write(tmp_path, "a", _original(shapes, 21)), 1.0)]
    full = _ours(tiny_checkpoint, loras, offload="model")
    q = _ours(tiny_checkpoint, loras, offload="model", quant="int8")
    q_plain = _ours(tiny_checkpoint, [], offload="model", quant="int8")
    err = (q.latents - full.latents).abs().max().item()
    effect = (q_plain.latents - full.latents).abs().max().item()
    print(
        f"int8 + lora: latents off by {err:.2e} from fp32 + lora (the LoRA moves them {effect:.2f})"
    )
    assert err < 0.05 * effect


def test_streamed_blocks_equal_resident(tiny_checkpoint, tmp_path, shapes):
    loras = [(_write(tmp_path, "a", _peft(shapes, 22)), 1.0)]
    resident = _ours(tiny_checkpoint, loras, offload="model")
    streamed = _ours(tiny_checkpoint, loras, offload="blocks")
    assert (streamed.latents - resident.latents).abs().max().item() <= 1e-5
    assert _levels(streamed.frames, resident.frames) <= 1.0


# --- the deltas themselves --------------------------------------------------------------------


def _expected(up, down, scale):
    return (up.float() @ down.float()) * scale


def test_partial_original_file_with_int_alpha(tmp_path, shapes):
    g = torch.Generator().manual_seed(0)
    up, down = _pair(shapes, "blocks.1.ffn.2", 8, g)
    sd = {
        "blocks.1.ffn.2.lora_down.weight": down.bfloat16(),  # kept as stored, used in fp32
        "blocks.1.ffn.2.lora_up.weight": up.bfloat16(),
        "blocks.1.ffn.2.alpha": torch.tensor(4, dtype=torch.int64),
    }
    lora = LoraSet([(_write(tmp_path, "p", sd), 1.5)], shapes)
    assert lora.names == {"blocks.1.ffn.2.weight"} and len(lora) == 1
    d = lora.delta("blocks.1.ffn.2.weight")
    assert d.dtype == torch.float32 and d.shape == shapes["blocks.1.ffn.2.weight"]
    ref = _expected(up.bfloat16(), down.bfloat16(), 1.5 * 4 / 8)
    torch.testing.assert_close(d, ref, atol=1e-6, rtol=1e-6)
    assert lora.delta("blocks.0.ffn.2.weight") is None and lora.delta("blocks.1.ffn.2.bias") is None


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
def test_original_prefixes_give_the_same_deltas(tmp_path, shapes, prefix):
    base = LoraSet([(_write(tmp_path, "base", _original(shapes, 7)), 0.5)], shapes)
    other = LoraSet([(_write(tmp_path, "x", _original(shapes, 7, prefix=prefix)), 0.5)], shapes)
    assert base.names == other.names and len(base) == 2 * 10 + 4 + 2  # weights + ffn.0 biases
    for name in base.names:
        assert torch.equal(base.delta(name), other.delta(name)), name


def test_peft_without_prefix_and_peft_alpha_metadata(tmp_path, shapes):
    sd = _peft(shapes, 9)
    a = LoraSet([(_write(tmp_path, "a", sd), 1.0)], shapes)
    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}
    b = LoraSet([(_write(tmp_path, "b", bare), 1.0)], shapes)
    assert a.names == b.names and all(torch.equal(a.delta(n), b.delta(n)) for n in a.names)
    # diffusers' save_lora_weights records alpha in the metadata (PEFT scale alpha/r = 16/4).
    meta = {"transformer.r": 4, "transformer.lora_alpha": 16, "transformer.alpha_pattern": {}}
    meta["transformer.alpha_pattern"] = {"blocks.0.attn1.to_q": 2}
    c = LoraSet([(_write(tmp_path, "c", sd, {"lora_adapter_metadata": json.dumps(meta)}), 1.0)],
                shapes)  # fmt: skip
    ffn = "blocks.1.ffn.0.weight"
    torch.testing.assert_close(c.delta(ffn), 4 * a.delta(ffn))
    torch.testing.assert_close(
        c.delta("blocks.0.self_attn.q.weight"), a.delta("blocks.0.self_attn.q.weight") / 2
    )
    bias = "blocks.1.ffn.0.bias"
    assert torch.equal(c.delta(bias), a.delta(bias))  # bias: scale only


def test_kohya_names_with_underscores_and_double_underscore(tmp_path, shapes):
    g = torch.Generator().manual_seed(1)
    sd, ref = {}, {}
    for layer in ["blocks.0.cross_attn.o", "text_embedding.2", "time_projection.1", "head.head"]:
        up, down = _pair(shapes, layer, 2, g)
        k = "lora_unet__" + layer.replace(".", "_")  # the double-underscore variant
        sd |= {
            f"{k}.lora_down.weight": down,
            f"{k}.lora_up.weight": up,
            f"{k}.alpha": torch.tensor(1.0),
        }
        ref[layer + ".weight"] = _expected(up, down, 0.5 * 1 / 2)
    conv_up, conv_down = torch.randn(64, 3, 1, 1, 1), torch.randn(3, 16, 1, 2, 2)
    sd |= {"lora_unet_patch_embedding.lora_up.weight": conv_up,
           "lora_unet_patch_embedding.lora_down.weight": conv_down}  # fmt: skip
    lora = LoraSet([(_write(tmp_path, "k", sd), 0.5)], shapes)
    assert lora.names == {*ref, "patch_embedding.weight"}
    for name, want in ref.items():
        torch.testing.assert_close(lora.delta(name), want, atol=1e-6, rtol=1e-6)
    conv = torch.einsum("or,rikl->oikl", conv_up[:, :, 0, 0, 0], conv_down[:, :, 0]).unsqueeze(2)
    got = lora.delta("patch_embedding.weight")
    torch.testing.assert_close(got, 0.5 * conv, atol=1e-5, rtol=1e-5)


def test_diff_keys_on_every_kind_of_parameter(tmp_path, shapes):
    # Full-weight deltas (.diff) and bias deltas (.diff_b), incl. norms, modulation tables and
    # the norm2/norm3 swap of diffusers names: scaled by the LoRA scale only, never by alpha.
    g = torch.Generator().manual_seed(2)
    targets = {
        "diffusion_model.blocks.0.norm3.diff": "blocks.0.norm3.weight",
        "diffusion_model.blocks.0.norm3.diff_b": "blocks.0.norm3.bias",
        "diffusion_model.blocks.1.self_attn.norm_q.diff": "blocks.1.self_attn.norm_q.weight",
        "diffusion_model.blocks.1.modulation.diff": "blocks.1.modulation",
        "diffusion_model.head.modulation.diff": "head.modulation",
        "diffusion_model.patch_embedding.diff": "patch_embedding.weight",
        "diffusion_model.time_projection.1.diff_b": "time_projection.1.bias",
        "diffusion_model.head.head.diff": "head.head.weight",
    }
    sd = {k: torch.randn(shapes[v], generator=g) for k, v in targets.items()}
    lora = LoraSet([(_write(tmp_path, "d", sd), 0.25)], shapes)
    assert lora.names == set(targets.values())
    for k, name in targets.items():
        assert torch.equal(lora.delta(name), sd[k] * 0.25), name
    peft = {"transformer.blocks.1.norm2.diff_b": torch.randn(64, generator=g)}  # ours: norm3
    norm = LoraSet([(_write(tmp_path, "n", peft), 1.0)], shapes).delta("blocks.1.norm3.bias")
    assert torch.equal(norm, peft["transformer.blocks.1.norm2.diff_b"])


def test_loras_add_up_and_diff_adds_to_low_rank(tmp_path, shapes):
    a, b = _write(tmp_path, "a", _original(shapes, 3)), _write(tmp_path, "b", _peft(shapes, 4))
    la, lb = LoraSet([(a, 1.0)], shapes), LoraSet([(b, 1.0)], shapes)
    both = LoraSet([(a, 0.3), (b, -2.0)], shapes)
    for name in la.names | lb.names:
        want = sum(
            0.3 * x.delta(name) if x is la else -2.0 * x.delta(name)
            for x in (la, lb)
            if x.delta(name) is not None
        )
        torch.testing.assert_close(both.delta(name), want, atol=1e-5, rtol=1e-5)
    twice = LoraSet([(a, 1.0), (a, 1.0)], shapes)
    name = "blocks.0.ffn.0.weight"
    torch.testing.assert_close(twice.delta(name), 2 * la.delta(name))


def test_deltas_are_lazy_and_thread_safe(tmp_path, shapes):
    lora = LoraSet([(_write(tmp_path, "a", _original(shapes, 5, rank=2)), 1.0)], shapes)
    held = sum(t.numel() for terms in lora._terms.values() for term in terms
               for t in (term.up_or_full, term.down) if t is not None)  # fmt: skip
    full = sum(int(np.prod(shapes[n])) for n in lora.names)
    assert held < full / 4  # factors, not deltas
    want = {n: lora.delta(n) for n in lora.names}
    results, errors = [], []

    def worker():
        try:
            results.append({n: lora.delta(n) for n in sorted(lora.names)})
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert all(torch.equal(r[n], want[n]) for r in results for n in want)
    assert all(torch.equal(lora.delta(n), want[n]) for n in want)  # asking again: same answer


# --- bad input --------------------------------------------------------------------------------


def test_lora_for_a_bigger_model_fails_at_construction(tmp_path, shapes):
    sd = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 128),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(128, 4),
    }
    path = _write(tmp_path, "big", sd)
    with pytest.raises(ValueError) as e:
        LoraSet([(path, 1.0)], shapes)
    msg = str(e.value)
    assert "big.safetensors" in msg and "blocks.0.self_attn.q" in msg
    assert "(128, 128)" in msg and "(64, 64)" in msg
    diff = {"diffusion_model.blocks.0.norm3.diff_b": torch.randn(128)}
    with pytest.raises(ValueError, match=r"norm3.*\(128,\).*\(64,\)"):
        LoraSet([(_write(tmp_path, "big2", diff), 1.0)], shapes)


@pytest.mark.parametrize(
    "sd, match",
    [
        ({"diffusion_model.blocks.7.ffn.0.lora_down.weight": torch.zeros(2, 64)}, "blocks.7"),
        ({"lora_unet_blocks_0_selfattn_q.lora_up.weight": torch.zeros(64, 2)}, "selfattn"),
        ({"transformer.blocks.0.attn3.to_q.lora_A.weight": torch.zeros(2, 64)}, "attn3"),
        ({"diffusion_model.blocks.0.ffn.0.weight": torch.zeros(128, 64)}, r"ffn\.0\.weight"),
        ({"diffusion_model.blocks.0.norm1.diff": torch.zeros(64)}, "norm1"),  # no parameters
        ({"blocks.0.ffn.0.alpha": torch.tensor(4.0)}, "lacks lora_up or lora_down"),
        ({"blocks.0.ffn.0.lora_down.weight": torch.zeros(2, 64)}, "lacks lora_up"),
        (
            {"blocks.0.ffn.0.lora_down.weight": torch.zeros(2, 64),
             "blocks.0.ffn.0.lora_up.weight": torch.zeros(128, 3)},
            "do not multiply",
        ),
        (
            {"blocks.0.ffn.0.lora_down.weight": torch.zeros(2, 64),
             "blocks.0.ffn.0.lora_up.weight": torch.zeros(128, 2),
             "blocks.0.ffn.0.alpha": torch.ones(2)},
            "scalar",
        ),
        ({"blocks.0.ffn.0.dora_scale": torch.zeros(128, 1)}, "no LoRA tensors"),
    ],
)  # fmt: skip
def test_bad_files_raise_value_error(tmp_path, shapes, sd, match):
    path = _write(tmp_path, "bad", sd)
    with pytest.raises(ValueError, match=match) as e:
        LoraSet([(path, 1.0)], shapes)
    assert "bad.safetensors" in str(e.value)


def test_bad_paths_and_scales(tmp_path, shapes):
    with pytest.raises(ValueError, match="no such file"):
        load_lora(tmp_path / "missing.safetensors", 1.0, shapes)
    (tmp_path / "x.pt").write_bytes(b"0")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_lora(tmp_path / "x.pt", 1.0, shapes)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_lora(tmp_path / "junk.safetensors", 1.0, shapes)
    path = _write(tmp_path, "ok", _peft(shapes, 1))
    with pytest.raises(ValueError, match="finite"):
        load_lora(path, float("nan"), shapes)


def test_report_and_skipped_keys(tmp_path, shapes, caplog):
    sd = _original(shapes, 6)
    sd["diffusion_model.blocks.0.self_attn.q.dora_scale"] = torch.ones(64, 1)
    sd["diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"] = torch.zeros(2, 64)
    sd["diffusion_model.img_emb.proj.1.lora_up.weight"] = torch.zeros(64, 2)
    plain = LoraSet([(_write(tmp_path, "plain", _original(shapes, 6)), 1.0)], shapes)
    with caplog.at_level(logging.INFO, logger="wanlite.weights.lora"):
        lora = LoraSet([(_write(tmp_path, "mixed", sd), 1.0)], shapes)
    assert lora.names == plain.names  # the skipped keys changed nothing
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    n_blocks = 2 * len(BLOCK_LINEARS)
    tensors = 3 * n_blocks + 2 * len(OTHER_LINEARS) + 2  # down, up, alpha; 2 diff_b (ffn.0)
    assert info == [
        f"lora mixed.safetensors (original): {tensors} tensors -> {n_blocks + 4} layers in 2 "
        "blocks + 4 others (head.head, text_embedding.0, text_embedding.2, time_projection.1)"
    ]
    assert len(warn) == 2
    assert any("DoRA" in w and "dora_scale" in w for w in warn)
    assert any("image-to-video" in w and "2 keys" in w for w in warn)


def test_dit_shapes_are_the_models(tiny_checkpoint, shapes):
    from wanlite.models.dit import WanDiT

    model = WanDiT(read_model_config(tiny_checkpoint).dit)
    assert shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}


# --- through wanlite.load and the CLI ----------------------------------------------------------


def test_load_with_offload_none_merges_at_load(tiny_checkpoint, tmp_path, shapes):
    """offload="none" reads the weights in wanlite.load: the LoRA is merged there too."""
    path = _write(tmp_path, "orig", _original(shapes, 11))
    plain_pipe = wanlite.load(str(tiny_checkpoint), device="cpu", dtype="float32",
                              offload="none", linear="aten")  # fmt: skip
    merged = wanlite.load(str(tiny_checkpoint), device="cpu", dtype="float32", offload="none",
                          linear="aten", lora=[(str(path), 0.8)])  # fmt: skip
    name = "blocks.1.self_attn.q.weight"
    delta = LoraSet([(path, 0.8)], shapes).delta(name)
    w0 = dict(plain_pipe.components["transformer"].module.named_parameters())[name]
    w1 = dict(merged.components["transformer"].module.named_parameters())[name]
    torch.testing.assert_close(w1, w0 + delta, rtol=0, atol=1e-6)


def test_cli_rejects_a_lora_for_another_size_in_one_line(tiny_checkpoint, tmp_path, capsys):
    from wanlite.cli import main

    sd = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 5120),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(5120, 4),
    }
    path = _write(tmp_path, "wan14b", sd)
    out = tmp_path / "v.mp4"
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--out", str(out)]
    assert main([*argv, "--lora", f"{path}:0.7", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wan14b.safetensors" in err and "5120" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_causvid_preset_runs_8_fixed_steps_without_cfg(tiny_checkpoint, tmp_path, shapes):
    path = _write(tmp_path, "causvid", _original(shapes, 5))
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", dtype="float32", embed_cache=False,
                        preset="causvid", lora=[(str(path), 1.0)])  # fmt: skip
    seen = []
    kw = dict(height=16, width=16, num_frames=1, seed=0, progress=False)
    video = pipe.generate("a fox", callback=lambda i, n, x: seen.append(n), **kw)
    assert seen == [8] * 8  # the preset's default steps
    assert video.stats["dit_forwards"] == 8 and video.stats["cfg_steps"] == 0  # guidance 1
    pipe.generate("a fox", num_inference_steps=4, guidance_scale=3.0, **kw)
    with pytest.raises(ValueError, match="timestep"):  # the list has 9 entries
        pipe.generate("a fox", num_inference_steps=12, **kw)
