import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanlite import dit
from wanlite.configs import TINY
from wanlite.lifecycle import Component
from wanlite.loading import resolve_model, weight_files


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
    from wanlite import t5

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
