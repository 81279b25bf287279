import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanlite.models import dit
from wanlite.models.configs import TINY
from wanlite.runtime.lifecycle import Component
from wanlite.weights.loading import resolve_model
from wanlite.weights.tensorstore import weight_files


def _fresh(tiny_checkpoint, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, out)
    return out


def _load(folder, build, from_key, **kw):
    """Strict loading as the pipeline does it (headers checked, then every tensor read)."""
    cpu = torch.device("cpu")
    return Component("test", folder, build, from_key, device=cpu, **kw).acquire()


def _load_dit(folder):
    return _load(
        folder / "transformer", lambda: dit.WanDiT(TINY.dit), dit.from_diffusers_key, dtype=None
    )


def test_sharded_and_single_files_load(tiny_checkpoint):
    files = weight_files(tiny_checkpoint / "transformer")
    assert len(files) > 1  # tiny checkpoints are sharded on purpose
    assert len(weight_files(tiny_checkpoint / "vae")) == 1
    m = _load_dit(tiny_checkpoint)
    assert all(p.device.type == "cpu" for p in m.parameters())


def _rewrite_first_shard(folder, edit):
    shard = weight_files(folder / "transformer")[0]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    return shard


def test_missing_key_is_an_error_naming_it(tiny_checkpoint, tmp_path):
    folder = _fresh(tiny_checkpoint, tmp_path)
    removed = []
    _rewrite_first_shard(folder, lambda t: removed.append(t.popitem()[0]))
    with pytest.raises(ValueError, match="missing keys") as e:
        _load_dit(folder)
    assert dit.from_diffusers_key(removed[0]) in str(e.value)


def test_extra_key_is_an_error_naming_file_and_key(tiny_checkpoint, tmp_path):
    folder = _fresh(tiny_checkpoint, tmp_path)
    shard = _rewrite_first_shard(folder, lambda t: t.update({"blocks.99.bogus": torch.zeros(1)}))
    with pytest.raises(ValueError, match=f"unexpected keys: {shard.name}:blocks.99.bogus"):
        _load_dit(folder)


def test_misshaped_tensor_is_an_error(tiny_checkpoint, tmp_path):
    folder = _fresh(tiny_checkpoint, tmp_path)

    def shrink(t):
        k = next(iter(t))
        t[k] = t[k].flatten()[:1].clone()

    _rewrite_first_shard(folder, shrink)
    with pytest.raises(ValueError, match="mis-shaped"):
        _load_dit(folder)


def test_missing_shard_file_is_an_error(tiny_checkpoint, tmp_path):
    folder = _fresh(tiny_checkpoint, tmp_path)
    weight_files(folder / "transformer")[-1].unlink()
    with pytest.raises(ValueError, match="shard files missing"):
        _load_dit(folder)


def test_bf16_storage_loads_into_fp32(tiny_checkpoint):
    from wanlite.models import t5

    index = json.loads(
        (tiny_checkpoint / "text_encoder" / "model.safetensors.index.json").read_text()
    )
    first = next(iter(index["weight_map"].items()))
    stored = load_file(tiny_checkpoint / "text_encoder" / first[1])[first[0]]
    assert stored.dtype == torch.bfloat16
    m = _load(
        tiny_checkpoint / "text_encoder",
        lambda: t5.UMT5Encoder(TINY.t5),
        t5.from_diffusers_key,
        dtype=torch.float32,
        aliases=t5.TIED_ALIASES,
    )
    p = dict(m.named_parameters())[t5.from_diffusers_key(first[0])]
    assert p.dtype == torch.float32 and torch.equal(p, stored.float())


def test_resolve_model_errors(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="size must be one of"):
        resolve_model("random:huge")


def test_resolve_model_takes_path_objects(tiny_checkpoint, tmp_path):
    assert resolve_model(Path(tiny_checkpoint)) == Path(tiny_checkpoint)
    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_model(tmp_path)  # a Path is a local folder, never a hub id
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        resolve_model(tmp_path / "org" / "name")


def test_hub_id_offline_gives_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="Point --model at a local folder"):
        resolve_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_random_tiny_is_built_on_first_use_and_deterministic(
    monkeypatch, tmp_path, tiny_checkpoint
):
    monkeypatch.setenv("WANLITE_CACHE", str(tmp_path / "cache"))
    path = resolve_model("random:tiny")
    assert path.parent == tmp_path / "cache" and (path / "model_index.json").is_file()
    assert _digest(path) == _digest(tiny_checkpoint)
    assert resolve_model("random:tiny") == path  # second use: the cached one
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temp dirs left


def test_diffusers_loads_what_we_write(diffusers_pipe):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    assert isinstance(diffusers_pipe.transformer, WanTransformer3DModel)
    assert isinstance(diffusers_pipe.vae, AutoencoderKLWan)
    assert diffusers_pipe.transformer.config.num_layers == TINY.dit.num_layers
    assert diffusers_pipe.text_encoder.config.num_layers == TINY.t5.num_layers


# --- distilled checkpoints: FastWan (VSA gates) and rCM (net. prefix, Linear patch embedding) --


@pytest.fixture(scope="module")
def fastwan_checkpoint():
    return resolve_model("random:tiny-fastwan")


def test_fastwan_variant_has_the_gate_keys_and_is_detected(fastwan_checkpoint, tiny_checkpoint):
    from wanlite.weights.loading import ModelSource, folder_has_vsa_gates
    from wanlite.weights.tensorstore import TensorStore

    keys = TensorStore(weight_files(fastwan_checkpoint / "transformer")).entries
    d = TINY.dit.dim
    for i in range(TINY.dit.num_layers):
        assert keys[f"blocks.{i}.to_gate_compress.weight"].shape == (d, d)
        assert keys[f"blocks.{i}.to_gate_compress.bias"].shape == (d,)
    plain = TensorStore(weight_files(tiny_checkpoint / "transformer")).entries
    assert set(keys) - set(plain) == {k for k in keys if "to_gate_compress" in k}
    assert folder_has_vsa_gates(fastwan_checkpoint / "transformer")
    assert not folder_has_vsa_gates(tiny_checkpoint / "transformer")
    assert ModelSource(fastwan_checkpoint).config().dit.vsa_gate
    assert not ModelSource(tiny_checkpoint).config().dit.vsa_gate
    assert json.loads((fastwan_checkpoint / "model_index.json").read_text())["_class_name"] == (
        "WanDMDPipeline"
    )


def test_gate_key_names():
    ours = "blocks.3.self_attn.gate_compress.weight"
    assert dit.to_diffusers_key(ours) == "blocks.3.to_gate_compress.weight"
    assert dit.from_diffusers_key("blocks.3.to_gate_compress.weight") == ours
    assert dit.from_diffusers_key("blocks.3.attn1.to_gate_compress.bias") == ours[:-6] + "bias"


def test_fastwan_loads_and_runs_with_vsa(fastwan_checkpoint):
    """One call: the folder with the fastwan preset runs VSA at the published sparsity, its
    gates loaded; attention="sdpa" runs the same weights dense (a different result)."""
    from wanlite import Options
    from wanlite.ops.vsa import VSA
    from wanlite.pipeline import Pipeline

    req = dict(prompt="a fox", height=128, width=128, num_frames=5, seed=3, progress=False)
    runs = {}
    for attention in ("auto", "sdpa"):
        o = Options(device="cpu", dtype="float32", attention=attention, preset="fastwan")
        pipe = Pipeline(fastwan_checkpoint, o)
        video = pipe.generate(**req, output_type="latent")
        model = pipe.components["transformer"].module
        runs[attention] = (video.latents, model)
        gates = [b.self_attn.gate_compress.weight for b in model.blocks]
        assert all(g.abs().sum() > 0 for g in gates)  # loaded, not zeros
    (sparse, vsa_model), (dense, dense_model) = runs["auto"], runs["sdpa"]
    sparse_fn = vsa_model.attn[0]  # (self-attention's, cross-attention's)
    assert isinstance(sparse_fn, VSA) and sparse_fn.sparsity == 0.8
    assert sparse_fn.grid == (2, 8, 8) and sparse_fn.topk == 1  # of 1x2x2 = 4 cubes
    assert not isinstance(dense_model.attn, tuple)
    assert torch.isfinite(sparse).all() and (sparse - dense).abs().max() > 1e-3


def test_rcm_file_converts_to_the_folders_dit(tiny_checkpoint, tmp_path):
    from wanlite.weights import formats
    from wanlite.weights.random_checkpoint import write_rcm_file
    from wanlite.weights.tensorstore import TensorStore

    path = write_rcm_file(tiny_checkpoint, tmp_path / "rCM_tiny.pt")
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("net.") for k in raw)
    lin = raw["net.patch_embedding.weight"]
    assert lin.shape == (TINY.dit.dim, 16 * 1 * 2 * 2)
    store, cfg = formats.open_component("transformer", path, TINY.dit)
    folder = TensorStore(weight_files(tiny_checkpoint / "transformer"))
    for key in folder.entries:
        ours = dit.from_diffusers_key(key)
        assert store.get(ours).shape == folder.entries[key].shape
        assert torch.equal(store.get(ours), folder.get(key).bfloat16())
    # the oracle: the reshaped Conv3d equals rCM's Linear on patches flattened (c, kt, kh, kw)
    x = torch.randn(1, 16, 2, 4, 6)
    conv = torch.nn.functional.conv3d(
        x, store.get("patch_embedding.weight").float(), stride=(1, 2, 2)
    )
    patches = x.view(1, 16, 2, 1, 2, 2, 3, 2).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(1, 12, 64)
    torch.testing.assert_close(conv.flatten(2).transpose(1, 2), patches @ lin.float().T)


def test_rcm_preset_runs_the_converted_file(tiny_checkpoint, tmp_path):
    from wanlite import Options
    from wanlite.pipeline import Pipeline
    from wanlite.weights.loading import ModelSource
    from wanlite.weights.random_checkpoint import write_rcm_file

    path = write_rcm_file(tiny_checkpoint, tmp_path / "rCM.pt", torch.float32)
    req = dict(prompt="a fox", height=64, width=64, num_frames=5, seed=2, progress=False)
    o = Options(device="cpu", dtype="float32", preset="rcm")
    got = Pipeline(ModelSource(tiny_checkpoint, {"transformer": path}), o)
    video = got.generate(**req, output_type="latent")
    assert got.stats["cfg_steps"] == 0 and video.params["num_inference_steps"] == 4
    ref = Pipeline(tiny_checkpoint, o).generate(**req, output_type="latent")
    torch.testing.assert_close(video.latents, ref.latents)
