"""The cast cache: the fp32 DiT cast to bf16 once, kept on disk, used in place afterwards."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import wanlite
from wanlite.weights import castcache

KW = dict(height=64, width=64, num_frames=5, num_inference_steps=2, seed=3, progress=False)


@pytest.fixture
def small_enough(monkeypatch):
    monkeypatch.setattr(castcache, "MIN_BYTES", 0)  # the tiny DiT is far below the real bar


def _load(path, root, **opts):
    opts = dict(device="cpu", dtype="bfloat16", embed_cache=False, cast_cache=str(root)) | opts
    return wanlite.load(str(path), **opts)


def test_cached_casts_give_the_same_frames_and_are_used_in_place(
    tiny_checkpoint, tmp_path, small_enough, monkeypatch
):
    root = tmp_path / "cast"
    plain = _load(tiny_checkpoint, root, cast_cache="off").generate("a fox", **KW).frames
    first = _load(tiny_checkpoint, root).generate("a fox", **KW).frames
    files = list(root.glob("transformer-*.safetensors"))
    assert [f.name.split("-")[0] for f in files] == ["transformer"]  # only the narrowed one
    assert np.array_equal(first, plain)

    def no_write(*a):
        raise AssertionError("the cache was written again")

    monkeypatch.setattr(castcache, "_write", no_write)
    pipe = _load(tiny_checkpoint, root)
    assert np.array_equal(pipe.generate("a fox", **KW).frames, plain)
    comp = pipe.components["transformer"]
    assert comp.cast_file() == files[0]
    # Unless a long call re-lays it out (packs / fuses), a block weight lies in the cache
    # file's memory map (no copy), in bf16.
    comp.release()
    w = comp.acquire(pack=False).blocks[0].ffn[0].weight
    e = comp._casts.entries["blocks.0.ffn.0.weight"]
    start = comp._casts.view("blocks.0.ffn.0.weight").data_ptr()
    assert w.dtype == torch.bfloat16 and w.data_ptr() == start and e.path == files[0]


def test_cache_key_follows_the_source_and_the_dtype(tiny_checkpoint, tmp_path, small_enough):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    root = tmp_path / "cast"
    pipe = _load(ckpt, root)
    one = pipe.components["transformer"].cast_file(write=True)
    assert one is not None and one.parent == root
    # The fp32 mode narrows nothing; fp16 narrows to another file.
    assert _load(ckpt, root, dtype="float32").components["transformer"].cast_file(True) is None
    fp16 = _load(ckpt, root, dtype="float16").components["transformer"].cast_file(True)
    assert fp16 not in (None, one)
    # A rewritten checkpoint file (new mtime) gets a new cache file.
    src = next((ckpt / "transformer").glob("*.safetensors"))
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    two = _load(ckpt, root).components["transformer"].cast_file(write=True)
    assert two not in (None, one)


def test_no_cache_when_quantized_off_full_or_unwritable(
    tiny_checkpoint, tmp_path, small_enough, monkeypatch, caplog
):
    root = tmp_path / "cast"
    assert (
        _load(tiny_checkpoint, root, quant="int8").components["transformer"].cast_file(True) is None
    )
    assert (
        _load(tiny_checkpoint, root, cast_cache="off").components["transformer"].cast_file(True)
        is None
    )
    assert not root.exists()

    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(castcache.shutil, "disk_usage", lambda p: usage(1, 1, 10))
    with caplog.at_level(logging.INFO, logger="wanlite.weights.castcache"):
        pipe = _load(tiny_checkpoint, root)
        frames = pipe.generate("a fox", **KW).frames
    assert "no cast cache" in caplog.text and not list(root.glob("*.safetensors"))
    monkeypatch.undo()
    monkeypatch.setattr(castcache, "MIN_BYTES", 0)

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # the cache folder cannot be created under a file
    with caplog.at_level(logging.WARNING, logger="wanlite.runtime.lifecycle"):
        pipe = _load(tiny_checkpoint, blocked / "cast")
        assert np.array_equal(pipe.generate("a fox", **KW).frames, frames)
    assert "cast cache not used" in caplog.text


def test_a_cache_file_that_does_not_match_is_not_used(
    tiny_checkpoint, tmp_path, small_enough, caplog
):
    from safetensors.torch import save_file

    root = tmp_path / "cast"
    path = _load(tiny_checkpoint, root).components["transformer"].cast_file(write=True)
    frames = _load(tiny_checkpoint, root, cast_cache="off").generate("a fox", **KW).frames
    save_file({"blocks.0.ffn.0.weight": torch.zeros(3, 3, dtype=torch.bfloat16)}, str(path))
    with caplog.at_level(logging.WARNING, logger="wanlite.weights.castcache"):
        got = _load(tiny_checkpoint, root).generate("a fox", **KW).frames
    assert "does not match" in caplog.text and np.array_equal(got, frames)


def test_lora_weights_are_merged_from_the_cast_weights_when_cached(
    tiny_checkpoint, tmp_path, small_enough
):
    """With the cast cache, a LoRA'd weight is bf16(bf16(W) + delta) (half the bytes to read);
    without it bf16(W + delta) from the fp32 file: they differ by W's rounding at most."""
    from wanlite.models.configs import read_model_config
    from wanlite.weights.random_checkpoint import write_random_lora

    lora = write_random_lora(tmp_path / "l.safetensors", read_model_config(tiny_checkpoint).dit)
    root = tmp_path / "cast"
    _load(tiny_checkpoint, root).components["transformer"].cast_file(write=True)
    on = _load(tiny_checkpoint, root, lora=[(str(lora), 0.7)])
    off = _load(tiny_checkpoint, root, cast_cache="off", lora=[(str(lora), 0.7)])
    comp = on.components["transformer"]
    assert comp.cast_file() is not None
    name = "blocks.0.self_attn.q.weight"
    source = comp.store.get(comp.names[name])  # fp32
    assert source.dtype == torch.float32
    want_on = comp.lora.merged(name, source.to(torch.bfloat16), torch.bfloat16)
    want_off = comp.lora.merged(name, source, torch.bfloat16)
    got = {
        "on": dict(comp.acquire(pack=False).named_parameters())[name],
        "off": dict(off.components["transformer"].acquire(pack=False).named_parameters())[name],
    }
    assert torch.equal(got["on"], want_on) and torch.equal(got["off"], want_off)
    assert not torch.equal(want_on, want_off)  # the second rounding shows somewhere
    # bf16 rounds to within u = 2^-8 of a value: once W (u |W|), then each sum (u |sum|)
    bound = 2**-8 * (source.abs() + 2 * want_off.float().abs()) * 1.01
    assert ((want_on.float() - want_off.float()).abs() <= bound).all()
    frames = [p.generate("a fox", **KW).frames.astype(float) for p in (on, off)]
    assert 10 * np.log10(255**2 / max(np.mean((frames[0] - frames[1]) ** 2), 1e-12)) > 40


def test_loading_a_pipeline_does_not_import_dynamo(tiny_checkpoint):
    """Building skeletons on the meta device used to import torch._dynamo (2.7 s of a CLI call:
    ``nn.Embedding``'s normal_ init and out-of-place arithmetic on meta tensors)."""
    code = (
        "import sys, wanlite\n"
        f"wanlite.load({str(tiny_checkpoint)!r}, device='cpu', embed_cache=False)\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
