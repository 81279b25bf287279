import pytest
import torch

from wanlite.configs import FULL, TINY
from wanlite.options import Options, parse_bytes
from wanlite.planner import choose, dit_params, estimate, t5_params

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
    from wanlite.planner import cuda_available

    gib = 2**30
    # 2 GiB free on the device, 6 GiB reserved by PyTorch of which 1 GiB holds tensors: the
    # 5 GiB cached but unused are free for this process too.
    assert cuda_available(2 * gib, 6 * gib, 1 * gib) == 7 * gib
    assert cuda_available(2 * gib, 0, 0) == 2 * gib
