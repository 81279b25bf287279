"""Our Wan2.1 VAE against diffusers' AutoencoderKLWan with the same (random) weights."""

import pytest
import torch

from wanlite.models.configs import FULL, TINY
from wanlite.models.vae import (
    CausalCache,
    CausalConv3d,
    WanVAE,
    from_diffusers_key,
    to_diffusers_key,
)
from wanlite.weights.random_checkpoint import random_state_dict

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny model gains nothing from threads, and a busy machine makes them very slow.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _diffusers_vae(cfg):
    from diffusers import AutoencoderKLWan

    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    return AutoencoderKLWan(**kwargs)


@pytest.fixture(scope="module")
def models():
    cfg = TINY.vae
    ours = WanVAE(cfg).eval()
    sd = random_state_dict(ours, "vae", seed=3)
    ours.load_state_dict(sd, strict=True)
    ref = _diffusers_vae(cfg).eval()
    ref.load_state_dict({to_diffusers_key(k, cfg): v for k, v in sd.items()}, strict=True)
    return ours, ref


def _report(what, ours, ref):
    diff = (ours - ref).abs().max().item()
    print(
        f"{what}: shape {tuple(ours.shape)} max|diff| {diff:.2e} mean|ref| {ref.abs().mean():.3f}"
    )
    assert ours.shape == ref.shape
    assert diff <= TOL


@pytest.mark.parametrize("frames", [1, 2, 3])
@pytest.mark.parametrize("hw", [(4, 4), (4, 6)])
def test_decode_matches_diffusers(models, frames, hw):
    ours, ref = models
    z = torch.randn(1, TINY.vae.z_dim, frames, *hw, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        expected = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (1, 3, 1 + 4 * (frames - 1), 8 * hw[0], 8 * hw[1])
    _report(f"decode T'={frames} {hw}", got, expected)


def test_decode_batch_matches_diffusers(models):
    ours, ref = models
    z = torch.randn(2, TINY.vae.z_dim, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref.decode(z).sample
    _report("decode batch 2", ours.decode(z), expected)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(models, frames):
    ours, ref = models
    x = torch.rand(1, 3, frames, 32, 48, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.mean
    _report(f"encode T={frames}", ours.encode(x), expected)


def test_encode_rejects_bad_frame_count(models):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        models[0].encode(torch.zeros(1, 3, 4, 16, 16))


def test_iter_decode_chunks(models):
    ours, _ = models
    z = torch.randn(1, TINY.vae.z_dim, 3, 4, 6, generator=torch.Generator().manual_seed(11))
    chunks = list(ours.iter_decode(z))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert all(c.abs().max() <= 1.0 for c in chunks)
    assert torch.equal(torch.cat(chunks, dim=2), ours.decode(z))


@pytest.mark.parametrize("memory_format", ["channels_last_3d", "contiguous_format"])
def test_both_activation_layouts_match_diffusers(models, monkeypatch, memory_format):
    """CPU runs channels-last; other devices the contiguous layout.  Both on CPU, encode and
    decode, so the layout-specific paths (the norm's channel sum, the upsampler's output
    buffer) run here whatever device picks them."""
    import wanlite.models.vae as vae_mod

    monkeypatch.setattr(vae_mod, "layout", lambda x: getattr(torch, memory_format))
    ours, ref = models
    z = torch.randn(1, TINY.vae.z_dim, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    x = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        expected_video, expected_mean = ref.decode(z).sample, ref.encode(x).latent_dist.mean
    video, mean = ours.decode(z), ours.encode(x)
    conv = ours.decoder.head[2]  # its input buffers are allocated in the layout
    buf, _ = conv.begin(torch.zeros(1, conv.in_channels, 1, 4, 4), CausalCache())
    assert buf.is_contiguous(memory_format=getattr(torch, memory_format))
    _report(f"decode ({memory_format})", video, expected_video)
    _report(f"encode ({memory_format})", mean, expected_mean)


def test_causal_conv_chunks_equal_whole_sequence():
    torch.manual_seed(0)
    conv = CausalConv3d(4, 5, 3, padding=1)
    x = torch.randn(1, 4, 9, 6, 6)
    whole = conv(x)
    cache, parts = CausalCache(), []
    for start, stop in [(0, 1), (1, 5), (5, 9)]:
        parts.append(conv(x[:, :, start:stop], cache))
        cache.next_chunk()
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY.vae, FULL.vae], ids=["tiny", "full"])
def test_key_renames_match_diffusers(cfg):
    with torch.device("meta"):
        ours = WanVAE(cfg)
        ref = _diffusers_vae(cfg)
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {to_diffusers_key(k, cfg): s for k, s in ours_shapes.items()} == ref_shapes
    assert {from_diffusers_key(k, cfg): s for k, s in ref_shapes.items()} == ours_shapes


def test_unknown_keys_raise():
    with pytest.raises(KeyError, match="encoder.bogus.weight"):
        to_diffusers_key("encoder.bogus.weight", TINY.vae)
    with pytest.raises(KeyError, match="decoder.up_blocks.9.resnets.0.conv1.weight"):
        from_diffusers_key("decoder.up_blocks.9.resnets.0.conv1.weight", TINY.vae)


def test_meta_construction_and_assign_load(models):
    with torch.device("meta"):
        vae = WanVAE(TINY.vae)
    assert not list(vae.buffers())
    sd = random_state_dict(vae, "vae", seed=3)
    vae.load_state_dict(sd, strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in vae.parameters())
    z = torch.randn(1, TINY.vae.z_dim, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(vae.decode(z), models[0].decode(z))


def test_runs_in_weight_dtype(models):
    ours, _ = models
    half = WanVAE(TINY.vae).eval()
    half.load_state_dict(ours.state_dict())
    half.to(torch.bfloat16)
    z = torch.randn(1, TINY.vae.z_dim, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    got = half.decode(z)
    assert got.dtype == torch.bfloat16
    diff = (got.float() - ours.decode(z)).abs().max().item()
    print(f"bf16 vs fp32 decode max|diff| {diff:.3f}")
    assert diff < 0.15
