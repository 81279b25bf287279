import pytest
import torch

from wanlite.models.configs import FULL, TINY
from wanlite.options import Options, parse_bytes
from wanlite.runtime.planner import choose, dit_params, estimate, t5_params

FULL_480P = (16, 21, 60, 104)  # 832x480x81


def test_parameter_counts_match_the_real_model():
    assert abs(sum(dit_params(FULL)) / 1e9 - 1.42) < 0.01  # ~1.42 B (wan-facts)
    layer, emb = t5_params(FULL)
    assert abs((24 * layer + emb) / 1e9 - 5.68) < 0.05 and abs(emb / 1e9 - 1.05) < 0.01


def test_offload_and_quant_lower_the_estimate():
    est = {  # the denoise phase: the untiled 480P decode would set the peak of every mode
        (q, o): estimate(FULL, FULL_480P, compute_bytes=4, quant=q, offload=o, tiled=False).denoise
        for q in ("none", "int8")
        for o in ("none", "model", "blocks")
    }
    assert est["none", "none"] > est["none", "model"] > est["none", "blocks"]
    assert est["int8", "model"] < est["none", "model"]
    tiled = estimate(FULL, FULL_480P, compute_bytes=4, quant="none", offload="blocks", tiled=True)
    assert (
        tiled.decode
        < estimate(
            FULL, FULL_480P, compute_bytes=4, quant="none", offload="blocks", tiled=False
        ).decode
    )


def test_auto_fits_the_budget():
    cpu = torch.device("cpu")
    c = choose(FULL, FULL_480P, Options(max_memory="6GB"), cpu, 4)
    assert (c.offload, c.vae_tiled) == ("blocks", True)
    assert c.estimate.peak <= 6 * 2**30
    c = choose(TINY, (16, 2, 4, 4), Options(max_memory="6GB"), cpu, 4)
    assert (c.offload, c.vae_tiled, c.cfg_batched) == ("none", False, True)
    c = choose(FULL, FULL_480P, Options(offload="model", max_memory="1GB"), cpu, 4)
    assert c.offload == "model"  # forced modes are kept (with a warning when over budget)


def test_cfg_batching_needs_room_for_twice_the_activations():
    cpu = torch.device("cpu")
    kw = dict(compute_bytes=4, quant="int8", offload="blocks", tiled=True)
    one, two = estimate(FULL, FULL_480P, **kw), estimate(FULL, FULL_480P, cfg_batch=2, **kw)
    assert two.denoise > one.denoise and two.encode == one.encode
    between = (one.peak + two.peak) // 2
    opts = dict(quant="int8", offload="blocks", vae_tiling="on")
    assert not choose(FULL, FULL_480P, Options(max_memory=between, **opts), cpu, 4).cfg_batched
    roomy = Options(max_memory=two.peak, **opts)
    assert choose(FULL, FULL_480P, roomy, cpu, 4).cfg_batched
    forced = Options(max_memory=between, cfg_batch="on", **opts)
    assert choose(FULL, FULL_480P, forced, cpu, 4).cfg_batched


def test_parse_bytes_and_bad_options():
    assert parse_bytes("6GB") == parse_bytes("6 GiB") == 6 * 2**30
    assert parse_bytes("512mb") == 512 * 2**20
    with pytest.raises(ValueError, match="max_memory"):
        Options(max_memory="lots")
    with pytest.raises(ValueError, match="offload"):
        Options(offload="disk")


def test_cuda_budget_counts_the_allocators_cached_free_memory():
    from wanlite.runtime.planner import cuda_available

    gib = 2**30
    # 2 GiB free on the device, 6 GiB reserved by PyTorch of which 1 GiB holds tensors: the
    # 5 GiB cached but unused are free for this process too.
    assert cuda_available(2 * gib, 6 * gib, 1 * gib) == 7 * gib
    assert cuda_available(2 * gib, 0, 0) == 2 * gib


def test_nag_adds_the_negative_kv_and_its_stage_stays_under_the_forward():
    from wanlite.runtime.planner import nag_kv_bytes, nag_stage_bytes

    kw = dict(compute_bytes=2, quant="none", offload="none", tiled=True)
    tokens, d = 21 * 30 * 52, FULL.dit.dim  # FULL_480P's tokens
    for batch in (1, 2):
        off = estimate(FULL, FULL_480P, cfg_batch=batch, **kw)
        on = estimate(FULL, FULL_480P, cfg_batch=batch, nag=True, **kw)
        # 30 blocks x (K, V) x 512 keys x 1536 x bf16: 94 MiB, kept for the whole denoise
        assert on.denoise - off.denoise == nag_kv_bytes(FULL, 2) == 30 * 2 * 512 * 1536 * 2
        assert (on.encode, on.decode) == (off.encode, off.decode)
        # NAG's cross-attention peak (24 bytes per token and channel per row, +10 per extra row
        # in bf16) is below the forward's 32 per row already counted: a max, not a sum
        assert nag_stage_bytes(tokens, d, 2, batch) == tokens * d * (10 * batch + 14)
        assert nag_stage_bytes(tokens, d, 2, batch) < 8 * tokens * d * 4 * batch
    assert nag_stage_bytes(tokens, d, 4) == tokens * d * 24  # fp32: z_pos, z_neg not copied
    assert nag_kv_bytes(FULL, 4, prompt_tokens=100) == 30 * 2 * 100 * 1536 * 4


def test_choose_counts_nag_when_it_is_on():
    cpu = torch.device("cpu")
    opts = dict(max_memory="64GB", offload="none", vae_tiling="on", cfg_batch="off")
    off = choose(FULL, FULL_480P, Options(**opts), cpu, 2).estimate
    on = choose(FULL, FULL_480P, Options(nag_scale=11, **opts), cpu, 2).estimate
    assert on.denoise - off.denoise == 30 * 2 * 512 * 1536 * 2


def _t5_bytes(comp) -> int:
    """Bytes of the umT5's layer weights once resident (the row-read embedding excluded)."""
    module = comp.acquire(row_embedding="token_embedding")
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if "blocks" in n)


def test_fp16_counts_the_umt5_ffn_output_kept_in_fp32(tiny_checkpoint):
    """fp16 keeps each umT5 layer's FFN output projection in fp32 (``t5.keep_in_fp32``, as
    transformers does): the estimate counts 2 more bytes per such weight than bf16 (24 layers x
    10240 x 4096 x 2 = 2.0 GB at full size), and the same difference as the loader's."""
    kw = dict(compute_bytes=2, quant="none", tiled=True)
    for offload, layers in (("none", FULL.t5.num_layers), ("model", 2)):
        bf16 = estimate(FULL, FULL_480P, offload=offload, **kw)
        fp16 = estimate(FULL, FULL_480P, offload=offload, fp16=True, **kw)
        extra = layers * FULL.t5.d_ff * FULL.t5.d_model * 2
        assert fp16.encode - bf16.encode == extra
    assert abs(24 * FULL.t5.d_ff * FULL.t5.d_model * 2 / 1e9 - 2.01) < 0.01
    # Stored quantized: the projection is int8 too, nothing kept in fp32.
    q = dict(kw, offload="none", t5_quant="int8")
    assert estimate(FULL, FULL_480P, fp16=True, **q) == estimate(FULL, FULL_480P, **q)
    # The loader's difference on the tiny checkpoint equals the planner's.
    from wanlite.models.configs import read_model_config
    from wanlite.runtime.lifecycle import components

    cfg = read_model_config(tiny_checkpoint)
    cpu = torch.device("cpu")
    loaded = {
        dtype: _t5_bytes(components(tiny_checkpoint, cfg, Options(), cpu, dtype)["text_encoder"])
        for dtype in (torch.float16, torch.bfloat16)
    }
    tiny = (cfg, (16, 2, 4, 4))
    planned = estimate(*tiny, offload="none", fp16=True, **kw).encode
    planned -= estimate(*tiny, offload="none", **kw).encode
    assert loaded[torch.float16] - loaded[torch.bfloat16] == planned > 0
    # ``choose`` is told the dtype: fp16 is estimated higher than bf16 (same bytes per value).
    opts = Options(max_memory="64GB")
    half = choose(FULL, FULL_480P, opts, cpu, 2, dtype=torch.float16).estimate
    assert half.encode > choose(FULL, FULL_480P, opts, cpu, 2, dtype=torch.bfloat16).estimate.encode


def test_a_budget_that_holds_the_dit_keeps_it_resident_under_model_offload():
    """Issue 25's 6 GB case (128x128x9, bf16): the umT5 (9 GB resident) forces "model", but the
    2.7 GB DiT fits beside the streamed umT5 and the decode: "auto" keeps it resident across
    phases and calls (counted in every phase), instead of reading it again each call.  A smaller
    budget, or "model" asked for by name, releases it as before."""
    cpu, small = torch.device("cpu"), (16, 3, 16, 16)
    kw = dict(compute_bytes=2, quant="none", tiled=False, cfg_batch=2)
    plain = estimate(FULL, small, offload="model", **kw)
    kept = estimate(FULL, small, offload="model", keep_dit=True, **kw)
    dit_bytes = sum(2 * n if i == 0 else 4 * n for i, n in enumerate(dit_params(FULL)))
    assert kept.encode - plain.encode == kept.decode - plain.decode == dit_bytes
    assert kept.denoise == plain.denoise
    for budget, keep in ((kept.peak, True), (kept.peak - 1, False)):
        place = choose(FULL, small, Options(max_memory=budget), cpu, 2, dtype=torch.bfloat16)
        assert (place.offload, place.keep_dit, place.kept("transformer")) == ("model", keep, keep)
        assert not place.kept("text_encoder") and not place.kept("vae")
        assert place.estimate == (kept if keep else plain) and place.estimate.peak <= budget
    forced = Options(offload="model", max_memory="64GB")
    assert not choose(FULL, small, forced, cpu, 2).kept("transformer")
    assert choose(FULL, small, Options(max_memory="64GB"), cpu, 2).offload == "none"


def test_causal_and_windowed_calls_are_sized_by_what_one_forward_sees():
    """A causal call runs chunks of 3 latent frames beside a KV cache of the window's frames; a
    windowed call runs one window at a time: neither is sized by the whole video."""
    kw = dict(compute_bytes=2, quant="none", offload="model", tiled=True)
    long = (16, 121, 60, 104)  # 832x480x481
    whole = estimate(FULL, long, **kw).denoise
    chunk = estimate(FULL, long, dit_frames=3, **kw).denoise
    causal = estimate(FULL, long, dit_frames=3, kv_frames=21, **kw).denoise
    kv = 2 * FULL.dit.num_layers * 21 * (60 // 2) * (104 // 2) * FULL.dit.dim * 2
    assert causal - chunk == kv  # k and v of 21 frames in every block, bf16
    assert causal < whole - 2 * 2**30  # 9.2 GiB against 12.0 (6.0 GiB of K/V)
    # the KV cache never holds more frames than the video has
    short = (16, 6, 60, 104)
    assert (
        estimate(FULL, short, dit_frames=3, kv_frames=21, **kw).denoise
        == estimate(FULL, short, dit_frames=3, kv_frames=6, **kw).denoise
    )
    window = estimate(FULL, long, dit_frames=21, **kw).denoise
    assert window == estimate(FULL, (16, 21, 60, 104), **kw).denoise + 3 * 16 * 100 * 60 * 104 * 4
