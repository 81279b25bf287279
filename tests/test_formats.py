"""Single-file formats (wanlite.weights.formats): every format written here from the tiny random
checkpoint, loaded, and compared with the diffusers folder it came from."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wanlite.models import dit, t5, vae
from wanlite.models.configs import TINY
from wanlite.weights import formats
from wanlite.weights.tensorstore import TensorStore, weight_files

RUN = dict(height=32, width=32, num_frames=5, num_inference_steps=2, seed=3, progress=False)
OPTS = dict(device="cpu", dtype="float32", embed_cache=False)
NOT_LINEAR = ("shared", "embed", "relative_attention_bias", "pos_embedding")


def ours(folder, component):
    """{our name: tensor as stored} of one weight set of the diffusers folder ``folder``."""
    rename = {
        "transformer": dit.from_diffusers_key,
        "text_encoder": t5.from_diffusers_key,
        "vae": lambda k: vae.from_diffusers_key(k, TINY.vae),
    }[component]
    store = TensorStore(weight_files(folder / component))
    return {rename(k): store.get(k) for k in store.entries}


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    return {c: ours(tiny_checkpoint, c) for c in ("transformer", "text_encoder", "vae")}


def generate(model, prompt="a red fox", **files):
    from wanlite import load

    return load(model, **files, **OPTS).generate(prompt, **RUN)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """Frames of the diffusers folder itself."""
    return generate(str(tiny_checkpoint)).frames


def write_st(path, tensors, prefix="", metadata=None):
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path), metadata)
    return path


def hf_t5(tensors):
    """Our umT5 names -> HF-T5 names (Comfy's umt5_xxl files)."""
    return {t5.to_diffusers_key(k): v for k, v in tensors.items()}


def fp8_scaled(tensors, style="scale_weight"):
    """ComfyUI fp8-scaled: the block linears as float8_e4m3fn with a per-tensor scale
    (``scale_weight`` + ``scaled_fp8`` marker, or ``weight_scale`` + ``comfy_quant``)."""
    out = {}
    for k, v in tensors.items():
        layer = k.removesuffix(".weight")
        if v.dim() != 2 or any(n in k for n in NOT_LINEAR):  # the block linears only
            out[k] = v
            continue
        scale = v.float().abs().max() / 448.0
        out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
        out[f"{layer}.{style}"] = scale.reshape(())
        if style == "weight_scale":
            note = json.dumps({"format": "float8_e4m3fn"}).encode()
            out[f"{layer}.comfy_quant"] = torch.tensor(list(note), dtype=torch.uint8)
    if style == "scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


# --- the original layouts: bit-identical frames ------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_dit_vae_t5_files_give_the_folders_frames(
    tiny_checkpoint, parts, reference, tmp_path, prefix
):
    files = {
        "transformer": write_st(tmp_path / "dit.safetensors", parts["transformer"], prefix),
        "vae": tmp_path / "Wan2.1_VAE.pth",
        "text_encoder": tmp_path / "models_t5_umt5-xxl-enc-bf16.pth",
    }
    torch.save(parts["vae"], files["vae"])
    torch.save(parts["text_encoder"], files["text_encoder"])
    assert np.array_equal(generate(str(tiny_checkpoint), **files).frames, reference)


def test_comfy_layout_vae_safetensors_and_hf_t5_give_the_folders_frames(
    tiny_checkpoint, parts, reference, tmp_path
):
    files = {
        "vae": write_st(tmp_path / "wan_2.1_vae.safetensors", parts["vae"]),
        "text_encoder": write_st(tmp_path / "umt5_xxl.safetensors", hf_t5(parts["text_encoder"])),
    }
    assert np.array_equal(generate(str(tiny_checkpoint), **files).frames, reference)


def test_names_are_read_from_content_not_file_names(tiny_checkpoint, parts, reference, tmp_path):
    """A .pth that is really safetensors, a VAE named like a DiT, no suffixes at all."""
    files = {
        "transformer": write_st(tmp_path / "weights.pth", parts["transformer"]),
        "vae": tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors",
        "text_encoder": write_st(tmp_path / "te", hf_t5(parts["text_encoder"])),
    }
    torch.save(parts["vae"], files["vae"])
    assert np.array_equal(generate(str(tiny_checkpoint), **files).frames, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dit_files_deliver_their_values(parts, tmp_path, dtype):
    d = {k: v.to(dtype) for k, v in parts["transformer"].items()}
    store, _ = formats.open_component("transformer", write_st(tmp_path / "d", d), TINY.dit)
    assert set(store.entries) == set(d)
    for k, v in d.items():
        assert store.entries[k].dtype == dtype and torch.equal(store.get(k), v)
        assert torch.equal(store.get(k, torch.float32), v.float())


def test_pth_store_reads_rows_views_and_refuses_pickled_code(parts, tmp_path):
    from wanlite.weights.pthstore import PthStore

    path = tmp_path / "t5.pth"
    torch.save({"state_dict": parts["text_encoder"]}, path)  # a wrapper dict is unwrapped
    store = PthStore(path)
    emb = parts["text_encoder"]["token_embedding.weight"]
    assert torch.equal(store.get_rows("token_embedding.weight", [5, 0, 5]), emb[[5, 0, 5]])
    assert torch.equal(store.view("token_embedding.weight"), emb)
    store.unmap()  # the map is re-opened on the next read
    assert torch.equal(
        store.get("norm.weight", torch.float32), parts["text_encoder"]["norm.weight"].float()
    )
    torch.save({"w": torch.zeros(2), "code": print}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth"):
        PthStore(tmp_path / "evil.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy"):
        formats.open_base(tmp_path / "old.pth")


# --- umT5 fp8 scaled (ComfyUI) ------------------------------------------------------------------


@pytest.mark.parametrize("style", ["scale_weight", "weight_scale"])
def test_fp8_scaled_t5_is_dequantized_with_its_scales(parts, tmp_path, style):
    scaled = fp8_scaled(hf_t5(parts["text_encoder"]), style)
    path = write_st(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", scaled)
    store, _ = formats.open_component("text_encoder", path, TINY.t5)
    assert set(store.entries) == set(parts["text_encoder"])  # markers and scales consumed
    for name in parts["text_encoder"]:
        hf = t5.to_diffusers_key(name)
        layer = hf.removesuffix(".weight")
        if f"{layer}.{style}" in scaled:
            want = scaled[hf].float() * scaled[f"{layer}.{style}"]
            assert store.entries[name].dtype == torch.float32
            assert torch.equal(store.get(name), want)
            assert torch.equal(store.get(name, torch.bfloat16), want.bfloat16())
        else:
            assert torch.equal(store.get(name), parts["text_encoder"][name])


def test_fp8_scaled_t5_frames_within_the_fp8_bar(tiny_checkpoint, parts, reference, tmp_path):
    """fp8 e4m3 weights (3 mantissa bits) vs the bf16 ones, through the whole pipeline: the
    frames differ (the weights did) but stay within 3 uint8 levels on average."""
    path = write_st(tmp_path / "te8", fp8_scaled(hf_t5(parts["text_encoder"])))
    frames = generate(str(tiny_checkpoint), text_encoder=path).frames
    diff = np.abs(frames.astype(float) - reference.astype(float))
    print(f"fp8-scaled umT5: frames mean abs diff {diff.mean():.2f}, max {diff.max():.0f}")
    assert 0 < diff.mean() <= 3.0


def test_fp8_scaled_without_its_scales_is_an_error_naming_the_file(parts, tmp_path):
    scaled = fp8_scaled(hf_t5(parts["text_encoder"]))
    one_missing = dict(scaled)
    dropped = next(k for k in scaled if k.endswith(".scale_weight"))
    del one_missing[dropped]
    path = write_st(tmp_path / "one_missing.safetensors", one_missing)
    with pytest.raises(ValueError, match="one_missing.safetensors.*no scale") as e:
        formats.open_component("text_encoder", path, TINY.t5)
    assert dropped.removesuffix(".scale_weight") in str(e.value)
    none = {k: v for k, v in scaled.items() if not k.endswith(".scale_weight")}
    with pytest.raises(ValueError, match="none.safetensors is marked as fp8-scaled"):
        formats.open_component("text_encoder", write_st(tmp_path / "none.safetensors", none))
    orphan = dict(parts["text_encoder"], **{"blocks.0.attn.zz.scale_weight": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="orphan.*scales with no weight.*attn.zz"):
        formats.open_component("text_encoder", write_st(tmp_path / "orphan", orphan), TINY.t5)


def test_unsupported_comfy_quant_format_is_an_error(parts, tmp_path):
    scaled = fp8_scaled(hf_t5(parts["text_encoder"]), "weight_scale")
    key = next(k for k in scaled if k.endswith(".comfy_quant"))
    scaled[key] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    with pytest.raises(ValueError, match="nvfp4"):
        formats.open_component("text_encoder", write_st(tmp_path / "q", scaled), TINY.t5)


# --- fp8 DiT (Kijai: plain float8_e4m3fn, no scales) -------------------------------------------


def test_plain_fp8_dit_is_upcast_exactly(tiny_checkpoint, parts, reference, tmp_path):
    fp8 = {
        k: v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.dim() == 2 else v
        for k, v in parts["transformer"].items()
    }
    path = write_st(tmp_path / "Wan2_1-T2V-1_3B_fp8_e4m3fn.safetensors", fp8)
    store, _ = formats.open_component("transformer", path, TINY.dit)
    w = "blocks.0.self_attn.q.weight"
    assert store.entries[w].dtype == torch.bfloat16  # delivered upcast (fp8 -> bf16 is exact)
    assert torch.equal(store.get(w, torch.float32), fp8[w].float())
    frames = generate(str(tiny_checkpoint), transformer=path).frames
    diff = np.abs(frames.astype(float) - reference.astype(float))
    print(f"plain fp8 DiT: frames mean abs diff {diff.mean():.2f}, max {diff.max():.0f}")
    assert 0 < diff.mean() <= 3.0


# --- what a file is, and the 1.3B only --------------------------------------------------------


def test_a_file_given_as_the_wrong_part_names_the_right_flag(parts, tmp_path):
    path = write_st(tmp_path / "vae.safetensors", parts["vae"])
    with pytest.raises(ValueError, match="vae.safetensors is a Wan VAE.*pass it as --vae"):
        formats.open_component("transformer", path)
    junk = write_st(tmp_path / "junk.safetensors", {"foo.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="junk.safetensors: not a Wan DiT.*foo.weight"):
        formats.open_component("transformer", junk)
    (tmp_path / "text.bin").write_text("hello")
    with pytest.raises(ValueError, match="text.bin: not a safetensors, GGUF or zip .pth"):
        formats.open_component("vae", tmp_path / "text.bin")


def test_sizes_are_recognised_from_the_tensors(tmp_path):
    """On the real shapes (from modules on meta: a 1.3B file is too big for a test)."""
    from wanlite.models.configs import FULL, DiTConfig

    with torch.device("meta"):
        full = {
            "transformer": dit.WanDiT(FULL.dit),
            "text_encoder": t5.UMT5Encoder(FULL.t5),
            "vae": vae.WanVAE(FULL.vae),
            "14B": dit.WanDiT(DiTConfig(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824)),
        }
    shapes = {c: {k: tuple(p.shape) for k, p in m.named_parameters()} for c, m in full.items()}
    here = tmp_path / "f"
    assert formats.RECOGNISERS["transformer"](shapes["transformer"], here) == FULL.dit
    assert formats.RECOGNISERS["text_encoder"](shapes["text_encoder"], here) == FULL.t5
    assert formats.RECOGNISERS["vae"](shapes["vae"], here) == FULL.vae
    with pytest.raises(ValueError, match="f is a Wan 14B DiT .width 5120"):
        formats.RECOGNISERS["transformer"](shapes["14B"], here)
    fewer = {k: v for k, v in shapes["text_encoder"].items() if not k.startswith("blocks.23.")}
    with pytest.raises(ValueError, match="found 256384 x 4096 embedding, 23 layers"):
        formats.RECOGNISERS["text_encoder"](fewer, here)
    wan22 = dict(shapes["vae"], **{"conv1.weight": (96, 96, 1, 1, 1)})
    with pytest.raises(ValueError, match="found 48 latent channels"):
        formats.RECOGNISERS["vae"](wan22, here)


def test_i2v_and_tiny_files_without_a_model_are_refused(parts, tmp_path):
    i2v = dict(parts["transformer"], **{"img_emb.proj.1.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="i2v.safetensors is an image-conditioned .I2V."):
        formats.open_component("transformer", write_st(tmp_path / "i2v.safetensors", i2v))
    path = write_st(tmp_path / "tiny_dit.safetensors", parts["transformer"])
    with pytest.raises(ValueError, match="not the Wan2.1 T2V 1.3B DiT: found width 64"):
        formats.open_component("transformer", path)  # no model config: sizes recognised


def test_no_model_needs_every_part_and_a_tokenizer(tiny_checkpoint, parts, tmp_path):
    from wanlite.weights.loading import resolve_source

    d = write_st(tmp_path / "d", parts["transformer"])
    with pytest.raises(ValueError, match="no --text-encoder, --vae given and no --model"):
        resolve_source(transformer=d, tokenizer=tiny_checkpoint / "tokenizer")
    with pytest.raises(ValueError, match="no tokenizer: pass --tokenizer .* or --model"):
        resolve_source(transformer=d, text_encoder=d, vae=d)
    with pytest.raises(ValueError, match="no tokenizer.json there"):
        resolve_source(transformer=d, text_encoder=d, vae=d, tokenizer=tmp_path)


def test_single_files_alone_with_a_tokenizer(
    tiny_checkpoint, parts, reference, tmp_path, monkeypatch
):
    """No model folder at all: sizes recognised from the tensors (the tiny sizes stand in for
    the 1.3B's here), the scheduler's defaults, the tokenizer from --tokenizer."""
    monkeypatch.setattr(formats, "FULL", TINY)
    files = {
        "transformer": write_st(tmp_path / "dit.safetensors", parts["transformer"]),
        "text_encoder": write_st(tmp_path / "te.safetensors", parts["text_encoder"]),
        "vae": write_st(tmp_path / "vae.safetensors", parts["vae"]),
    }
    tok = tiny_checkpoint / "tokenizer" / "tokenizer.json"  # the file itself is accepted too
    assert np.array_equal(generate(None, tokenizer=tok, **files).frames, reference)


def test_a_single_file_that_does_not_match_the_model_names_the_file(
    tiny_checkpoint, parts, tmp_path
):
    d = dict(parts["transformer"])
    d["blocks.0.ffn.0.weight"] = d["blocks.0.ffn.0.weight"][:5]
    path = write_st(tmp_path / "bad_dit.safetensors", d)
    with pytest.raises(ValueError, match="bad_dit.safetensors does not match.*blocks.0.ffn.0"):
        generate(str(tiny_checkpoint), transformer=path)


# --- GGUF ---------------------------------------------------------------------------------------


def gguf_file(path, tensors, qtype, arch="wan"):
    pytest.importorskip("gguf")
    from wanlite.weights.gguf_reader import write_gguf

    return write_gguf(path, tensors, qtype, arch)


def llama_t5(tensors):
    """Our umT5 names -> llama.cpp's T5 names (city96's umT5 GGUF)."""
    out = {}
    for k, v in hf_t5(tensors).items():
        for a, b in reversed(formats._LLAMA_T5):
            k = k.replace(b, a)
        out[k] = v
    return out


def test_gguf_bf16_dit_equals_the_bf16_safetensors(tiny_checkpoint, parts, tmp_path):
    bf16 = {k: v.bfloat16() for k, v in parts["transformer"].items()}
    g = gguf_file(tmp_path / "wan-1.3b-bf16.gguf", bf16, "BF16")
    s = write_st(tmp_path / "bf16.safetensors", bf16)
    gs, _ = formats.open_component("transformer", g, TINY.dit)
    ss, _ = formats.open_component("transformer", s, TINY.dit)
    assert gs.entries["patch_embedding.weight"].shape == (64, 16, 1, 2, 2)  # 5-D, from metadata
    assert gs.base.metadata["general.architecture"] == "wan"
    for k in bf16:  # the small 1-D tensors are F32 in the GGUF: bf16 values, equal in fp32
        assert torch.equal(gs.get(k, torch.float32), ss.get(k, torch.float32)), k
    a = generate(str(tiny_checkpoint), transformer=g).frames
    assert np.array_equal(a, generate(str(tiny_checkpoint), transformer=s).frames)


def test_gguf_q8_0_dit_and_t5(tiny_checkpoint, parts, reference, tmp_path):
    import gguf

    g = gguf_file(tmp_path / "dit-q8_0.gguf", parts["transformer"], "Q8_0")
    store, _ = formats.open_component("transformer", g, TINY.dit)
    raw = {t.name: t for t in store.base.reader.tensors}["blocks.0.ffn.0.weight"]
    assert raw.tensor_type == gguf.GGMLQuantizationType.Q8_0  # really quantized
    want = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type))
    assert torch.equal(store.get("blocks.0.ffn.0.weight"), want)  # torch decode == gguf's
    te = gguf_file(tmp_path / "umt5-q8_0.gguf", llama_t5(parts["text_encoder"]), "Q8_0", "t5")
    tstore, _ = formats.open_component("text_encoder", te, TINY.t5)
    emb = tstore.get("token_embedding.weight")
    assert torch.equal(tstore.get_rows("token_embedding.weight", [7, 2, 7]), emb[[7, 2, 7]])
    frames = generate(str(tiny_checkpoint), transformer=g, text_encoder=te).frames
    diff = np.abs(frames.astype(float) - reference.astype(float))
    print(f"Q8_0 DiT + umT5: frames mean abs diff {diff.mean():.2f}, max {diff.max():.0f}")
    assert 0 < diff.mean() <= 2.0


@pytest.mark.parametrize("qtype,bar", [("Q4_0", 0.2), ("Q8_0", 0.01)])
def test_gguf_block_types_round_trip_within_their_precision(tmp_path, qtype, bar):
    from wanlite.weights.gguf_reader import GGUFStore

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 512, generator=g), torch.randn(8, generator=g)
    path = gguf_file(tmp_path / f"{qtype}.gguf", {"w": w, "b": b}, qtype)
    store = GGUFStore(path)
    assert store.entries["w"].dtype == torch.float32 and store.entries["w"].shape == (8, 512)
    err = (store.get("w") - w).abs().max().item() / w.abs().max().item()
    assert 0 < err <= bar
    assert torch.equal(store.get("b"), b)  # small 1-D tensors are written (and read) F32


def test_gguf_k_quant_rows_and_shapes(tmp_path):
    """Q4_K (no quantizer in the gguf package: random blocks with sane scales): the store's
    shape, row reads and values are gguf's own dequantization of the right bytes."""
    gguf = pytest.importorskip("gguf")
    from wanlite.weights.gguf_reader import GGUFStore

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(6 * 2, 144), dtype=np.uint8)  # 6 rows x 512 values
    blocks[:, 0:4] = np.frombuffer(np.array([0.01, 0.005], np.float16).tobytes(), np.uint8)
    data = blocks.reshape(6, 2 * 144)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "wan")
    w.add_tensor("w", data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    store = GGUFStore(tmp_path / "k.gguf")
    want = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K))
    assert store.entries["w"].shape == (6, 512) and torch.equal(store.get("w"), want)
    assert torch.equal(store.get_rows("w", [4, 1]), want[[4, 1]])


# --- against diffusers' own single-file loaders (offline: config= the tiny folder) -------------


def test_diffusers_from_single_file_dit_gives_our_frames(tiny_checkpoint, parts, tmp_path):
    """diffusers maps the original DiT names itself; with ``config=`` the tiny checkpoint's
    folder it needs no network.  Its pipeline on that transformer vs ours on the same file."""
    from diffusers import WanPipeline, WanTransformer3DModel

    path = write_st(tmp_path / "dit.safetensors", parts["transformer"], "model.diffusion_model.")
    model = WanTransformer3DModel.from_single_file(
        str(path), config=str(tiny_checkpoint), subfolder="transformer", torch_dtype=torch.float32
    )
    pipe = WanPipeline.from_pretrained(str(tiny_checkpoint), transformer=model, dtype=torch.float32)
    theirs = pipe(
        prompt="a red fox",
        negative_prompt=" ",
        **{k: RUN[k] for k in ("height", "width", "num_frames", "num_inference_steps")},
        generator=torch.Generator("cpu").manual_seed(RUN["seed"]),
        output_type="np",
    ).frames[0]
    ours_ = generate(str(tiny_checkpoint), transformer=path).frames
    assert np.abs(ours_.astype(float) - theirs.astype(float) * 255).max() <= 1.0


def test_diffusers_from_single_file_vae_decodes_as_ours(tmp_path):
    """diffusers' VAE converter assumes 2 residual blocks per level (the real layout), which the
    tiny checkpoint does not have: a small VAE of that layout is made here instead."""
    from diffusers import AutoencoderKLWan

    from wanlite.models.configs import VAEConfig
    from wanlite.weights.random_checkpoint import random_state_dict

    cfg = VAEConfig(base_dim=8, num_res_blocks=2)
    with torch.device("meta"):
        skeleton = vae.WanVAE(cfg)
    path = write_st(tmp_path / "wan_2.1_vae.safetensors", random_state_dict(skeleton, "vae"))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    theirs = AutoencoderKLWan.from_single_file(
        str(path), config=str(tmp_path), subfolder="vae", torch_dtype=torch.float32
    )
    store, _ = formats.open_component("vae", path, cfg)
    model = vae.WanVAE(cfg)
    model.load_state_dict({k: store.get(k) for k in store.entries})
    z = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model.decode(z) - theirs.decode(z).sample).abs().max().item()
    assert diff <= 1e-4


def test_gguf_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch):
    from wanlite.weights import gguf_reader

    path = tmp_path / "dit.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'wanlite\[gguf\]'") as e:
        gguf_reader.GGUFStore(path)
    assert e.value.name == "gguf" and not isinstance(e.value, RuntimeError)


def test_model_folder_and_single_files_as_path_objects(tiny_checkpoint, parts, reference, tmp_path):
    dit_file = write_st(tmp_path / "dit.safetensors", parts["transformer"])
    frames = generate(Path(tiny_checkpoint), transformer=Path(dit_file)).frames
    assert np.array_equal(frames, reference)
