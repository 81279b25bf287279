"""WanDiT against diffusers' WanTransformer3DModel on the tiny config (random weights)."""

from __future__ import annotations

import pytest
import torch

from wanlite.models.configs import TINY
from wanlite.models.dit import WanDiT, from_diffusers_key, keep_in_fp32, to_diffusers_key
from wanlite.weights.random_checkpoint import random_state_dict

diffusers = pytest.importorskip("diffusers")

CFG = TINY.dit
# diffusers' _keep_in_fp32_modules of WanTransformer3DModel, matched on name components.
KEEP_FP32 = set(diffusers.WanTransformer3DModel._keep_in_fp32_modules)

SHAPES = [  # (batch, frames, height, width, context tokens, timesteps)
    (1, 1, 4, 4, 7, (999.0,)),
    (2, 3, 6, 8, 12, (999.0, 500.0)),
    (1, 3, 8, 6, 1, (500.0,)),
    (2, 1, 6, 8, 20, (0.0, 250.5)),
]


def _diffusers_model() -> torch.nn.Module:
    kwargs = {k: v for k, v in CFG.to_diffusers().items() if not k.startswith("_")}
    return diffusers.WanTransformer3DModel(**kwargs).eval()


def _keep_fp32(diffusers_name: str) -> bool:
    return bool(KEEP_FP32 & set(diffusers_name.split(".")))


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = WanDiT(CFG)
    return random_state_dict(model, "transformer", seed=3)


@pytest.fixture(scope="module")
def models(state):
    ours = WanDiT(CFG).eval()
    ours.load_state_dict(state, strict=True)
    ref = _diffusers_model()
    ref.load_state_dict({to_diffusers_key(k): v for k, v in state.items()}, strict=True)
    return ours, ref


def _inputs(batch, frames, height, width, ctx_len, ts, dtype=torch.float32):
    g = torch.Generator().manual_seed(batch * 1000 + frames * 100 + height * 10 + width + ctx_len)
    x = torch.randn(batch, CFG.in_channels, frames, height, width, generator=g, dtype=dtype)
    ctx = torch.randn(batch, ctx_len, CFG.text_dim, generator=g, dtype=dtype)
    return x, torch.tensor(ts, dtype=torch.float32), ctx


def _reference(ref, x, t, ctx) -> torch.Tensor:
    with torch.no_grad():
        return ref(x, t, ctx, return_dict=False)[0]


def test_key_rename_round_trip(models):
    ours, ref = models
    mapped = {to_diffusers_key(k): k for k in ours.state_dict()}
    assert set(mapped) == set(ref.state_dict())
    for theirs, mine in mapped.items():
        assert from_diffusers_key(theirs) == mine
    assert to_diffusers_key("blocks.17.norm3.weight") == "blocks.17.norm2.weight"
    assert from_diffusers_key("scale_shift_table") == "head.modulation"


@pytest.mark.parametrize(
    "key",
    ["nonsense", "blocks.0.norm1.weight", "blocks.0.modulation.weight", "blocks.x.ffn.0.weight",
     "head.norm.weight", "blocks.{}.ffn.0.weight", "rope.freqs_cos"],
)  # fmt: skip
def test_unknown_keys_raise(key):
    for fn in (to_diffusers_key, from_diffusers_key):
        with pytest.raises(KeyError, match="no Wan DiT counterpart"):
            fn(key)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_parity_with_diffusers(models, shape):
    ours, ref = models
    x, t, ctx = _inputs(*shape)
    expected = _reference(ref, x, t, ctx)
    got = ours(x, t, ctx)
    assert got.shape == expected.shape == x.shape
    assert got.dtype == torch.float32
    err = (got - expected).abs().max().item()
    print(f"fp32 {shape}: max|ours - diffusers| = {err:.3g} (output absmax {got.abs().max():.3g})")
    assert err <= 1e-4


def test_math_backend_matches_sdpa(models, state):
    ours, _ = models
    math_model = WanDiT(CFG, attn="math").eval()
    math_model.load_state_dict(state, strict=True)
    x, t, ctx = _inputs(*SHAPES[1])
    assert (math_model(x, t, ctx) - ours(x, t, ctx)).abs().max().item() <= 1e-5


def test_meta_construction_and_assign_load(models, state):
    ours, _ = models
    with torch.device("meta"):
        meta = WanDiT(CFG)
    assert all(p.is_meta for p in meta.parameters())
    meta.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    assert not any(p.is_meta for p in meta.parameters())
    for shape in SHAPES[:2]:
        x, t, ctx = _inputs(*shape)
        assert torch.equal(meta(x, t, ctx), ours(x, t, ctx))


def test_rope_tables_cached_per_grid(models):
    ours, _ = models
    a = ours.rope((3, 2, 2), "cpu")
    assert ours.rope((3, 2, 2), torch.device("cpu")) is a
    assert a[0].shape == (12, 1, CFG.head_dim // 2)


def test_bad_shapes_raise(models):
    ours, _ = models
    with pytest.raises(ValueError, match="divisible"):
        ours(torch.zeros(1, CFG.in_channels, 1, 5, 4), torch.tensor([1.0]), torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="timesteps"):
        ours(torch.zeros(2, CFG.in_channels, 1, 4, 4), torch.ones(3), torch.zeros(2, 2, 32))


def _bf16_islands(model: torch.nn.Module, keep) -> torch.nn.Module:
    """Cast to bf16 except the parameters (and buffers) ``keep`` selects."""
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if not keep(name):
            p.data = p.data.to(torch.bfloat16)
    return model


def test_keep_in_fp32_covers_diffusers(models):
    ours, _ = models
    names = [n for n, _ in ours.named_parameters()]
    kept = {n for n in names if keep_in_fp32(n)}
    assert {n for n in names if _keep_fp32(to_diffusers_key(n))} <= kept
    assert {n for n in kept if "blocks.1." in n} == {
        "blocks.1.modulation", "blocks.1.norm3.weight", "blocks.1.norm3.bias"
    }  # fmt: skip
    assert keep_in_fp32("time_projection.1") and not keep_in_fp32("blocks.0.ffn.0")


def test_bf16_weights_against_diffusers(models, state):
    ours32, ref32 = models
    ours = WanDiT(CFG).eval()
    ours.load_state_dict(state, strict=True)
    _bf16_islands(ours, keep_in_fp32)
    ref = _diffusers_model()
    ref.load_state_dict({to_diffusers_key(k): v for k, v in state.items()}, strict=True)
    _bf16_islands(ref, _keep_fp32)  # as diffusers' from_pretrained does
    assert ours.time_projection[1].weight.dtype == torch.float32
    assert ours.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    for shape in SHAPES:
        x, t, ctx = _inputs(*shape)
        exact = ours32(x, t, ctx)
        x16, ctx16 = x.to(torch.bfloat16), ctx.to(torch.bfloat16)
        got, theirs = ours(x16, t, ctx16), _reference(ref, x16, t, ctx16)
        assert got.dtype == torch.bfloat16
        rms = exact.pow(2).mean().sqrt().item()
        max_diff = (got.float() - theirs.float()).abs().max().item()
        err_ours, err_theirs, diff = (
            _rms(a, b) / rms for a, b in ((got, exact), (theirs, exact), (got, theirs))
        )
        print(
            f"bf16 {shape}: relative RMS error |ours-fp32| {err_ours:.3g}, |diffusers-fp32| "
            f"{err_theirs:.3g}, |ours-diffusers| {diff:.3g}; max|ours-diffusers| "
            f"{max_diff:.3g} (output absmax {exact.abs().max():.3g})"
        )
        # Our fp32 islands are a superset of diffusers' (temb, time_proj also fp32), so we are at
        # least about as close to the fp32 result, and within bf16 noise of diffusers.
        assert err_ours <= 1.2 * err_theirs
        assert diff <= 0.02


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).pow(2).mean().sqrt().item()


def test_chunked_ffn_and_attention_are_exact():
    import wanlite.models.dit as d
    from wanlite.ops.attention import chunked, resolve

    torch.manual_seed(0)
    model = d.WanDiT(TINY.dit).eval()
    model.load_state_dict(random_state_dict(model, "transformer", 0))
    x, t, ctx = torch.randn(1, 16, 3, 8, 12), torch.tensor([500.0]), torch.randn(1, 9, 32)
    full = model(x, t, ctx)
    for b in model.blocks:
        b.chunk = 7  # 72 tokens in chunks of 7
    model.attn = chunked(resolve("sdpa"), 5)
    diff = (model(x, t, ctx) - full).abs().max().item()
    print(f"chunked FFN + attention vs unchunked: max abs diff {diff:.1e}")
    assert diff <= 1e-5


def test_merged_padding_is_exact(models):
    """The zero padding after a prompt is attended to as one key with a log-count bias."""
    ours, _ = models
    x, t, _ = _inputs(2, 3, 6, 8, 1, (500.0, 500.0))
    ctx = torch.zeros(2, 24, CFG.text_dim)
    ctx[0, :5], ctx[1, :9] = torch.randn(5, CFG.text_dim), torch.randn(9, CFG.text_dim)
    temb = ours.time_embeddings(t, 2)
    full = ours.step(x, temb, ours.prepare_text(ctx))
    merged = ours.prepare_text(ctx, [5, 9])
    assert merged.ctx.shape[1] == 10 and merged.bias is not None  # 9 real + 1 merged pad key
    got = ours.step(x, temb, merged)
    one = ours.step(x[:1], ours.time_embeddings(t[:1], 1), ours.prepare_text(ctx[:1], [5]))
    diff = max((got - full).abs().max().item(), (one - full[:1]).abs().max().item())
    print(f"merged padding vs 24 padded keys: max abs diff {diff:.1e}")
    assert diff <= 1e-5
    assert ours.prepare_text(ctx[:1], [24]).bias is None  # no padding, nothing to merge


def _fresh(state) -> WanDiT:
    """A new model with the test weights (for tests that change the model they get)."""
    model = WanDiT(CFG).eval()
    model.load_state_dict(state, strict=True)
    return model


def test_fused_projections_are_exact_and_keep_names(state):
    from wanlite.models.dit import fuse_projections
    from wanlite.ops.quant import _joined

    model, (x, t, ctx) = _fresh(state), _inputs(*SHAPES[1])
    before = model(x, t, ctx)
    fuse_projections(model)
    attn = model.blocks[0].self_attn
    assert _joined([attn.q.weight, attn.k.weight, attn.v.weight]) is not None
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert (model(x, t, ctx) - before).abs().max().item() <= 1e-5


def test_compiled_blocks_match(state):
    from torch._dynamo.utils import counters

    from wanlite.models.dit import compile_blocks

    model, (x, t, ctx) = _fresh(state), _inputs(*SHAPES[1])
    eager = [model(x, t, c) for c in (ctx, ctx[:, :5])]
    compile_blocks(model)
    graphs = counters["stats"]["unique_graphs"]
    for c, ref in zip((ctx, ctx[:, :5]), eager):  # two text lengths: one graph (dynamic keys)
        diff = (model(x, t, c) - ref).abs().max().item()
        print(f"torch.compile vs eager, {c.shape[1]} text keys: max abs diff {diff:.1e}")
        assert diff <= 1e-4
    assert counters["stats"]["unique_graphs"] - graphs <= 1


def test_bucketed_text_keys_are_exact_and_compile_once(state):
    """Compiled blocks see text keys bucketed to a multiple of TEXT_BUCKET (filler keys at -inf
    bias): prompts of different lengths share a graph, and the output is the unbucketed one."""
    import torch._dynamo

    from wanlite.models import dit as d

    model, (x, t, ctx) = _fresh(state), _inputs(*SHAPES[1])
    lengths = [5]  # 5 real tokens, zero-padded to 40
    ctx = torch.cat([ctx[:1, :5], ctx.new_zeros(1, 35, ctx.shape[2])], 1)
    plain = model.prepare_text(ctx, lengths)
    model.text_bucket = 16
    bucketed = model.prepare_text(ctx, lengths)
    assert plain.ctx.shape[1] == 6 and bucketed.ctx.shape[1] == 16
    assert torch.isinf(bucketed.bias[..., 6:]).all()
    e, e0 = model.time_embeddings(t[:1].float(), 1)
    out_plain = model.step(x[:1], (e, e0), plain)
    out_bucket = model.step(x[:1], (e, e0), bucketed)
    assert (out_plain - out_bucket).abs().max().item() <= 1e-5
    # Compiled once per process: a second model (a new load) reuses the same compiled body.
    torch._dynamo.reset()
    d._COMPILED.clear()
    other = _fresh(state)
    d.compile_blocks(model)
    d.compile_blocks(other)
    assert model.blocks[0].compiled_body is other.blocks[0].compiled_body
    assert model.text_bucket == other.text_bucket == d.TEXT_BUCKET


def test_fp16_weights_keep_the_residual_stream_in_fp32(state):
    """fp16 weights: the stream between blocks is fp32, as in the original Wan
    (Wan-Video/Wan2.1 wan/modules/model.py, WanAttentionBlock.forward: ``x = x + y * e[2]``
    under ``amp.autocast(dtype=torch.float32)`` with fp32 ``e`` makes x fp32).  With gates
    large enough to push the stream past fp16's 65504, the output stays finite and close to
    the fp32 model's."""
    x, t, ctx = _inputs(*SHAPES[1])
    for gate in (1.0, 1e5):
        ours32, ours16 = _fresh(state), _fresh(state)
        for m in (ours32, ours16):
            for b in m.blocks:
                b.modulation.data[:, 2::3] *= gate  # gate1, gate2 (shift, scale, gate) x 2
        for name, p in ours16.named_parameters():
            if not keep_in_fp32(name):
                p.data = p.data.to(torch.float16)
        streams = []

        def hook(m, args, streams=streams):
            streams.append((args[0].dtype, args[0].abs().max().item()))

        ours32.head.register_forward_pre_hook(hook)
        ours16.blocks[-1].register_forward_pre_hook(hook)
        ours16.head.register_forward_pre_hook(hook)
        exact = ours32(x, t, ctx)
        got = ours16(x.half(), t, ctx.half())
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        assert [s[0] for s in streams] == [torch.float32] * 3
        rel = _rms(got, exact) / exact.pow(2).mean().sqrt().item()
        print(f"fp16 weights, gates x{gate:g}: stream max {streams[0][1]:.3g}, rel RMS {rel:.2g}")
        assert rel < 0.02
    assert streams[0][1] > 65504  # the fp32 model's stream: an fp16 one would be inf


def test_compiled_blocks_do_not_recompile_past_the_limit_on_a_request_mix(
    tiny_checkpoint, monkeypatch
):
    """A realistic mix of requests through ``wanlite.load(compile=True)``: two output sizes,
    CFG on (one batch of 2) and off (batch 1), prompts of different lengths, NAG on and off.
    Dynamo's graphs for the block body (counted by ``torch._dynamo.utils.counters``) stay
    within the variants ``dit.RECOMPILE_LIMIT`` is sized for: one per (batch, NAG, size), none
    per prompt length; nothing falls back to eager.  The Dynamo backend is "eager" here: guards
    and recompiles are Dynamo's whatever the backend (inductor compiles each graph, slowly on a
    CPU; ``test_compiled_blocks_match`` runs it)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import wanlite
    from wanlite.models import dit as d

    torch._dynamo.reset()
    monkeypatch.setattr(d, "_COMPILED", {(("dynamic", False),): d.CompiledBody(
        dynamic=False, backend="eager")})  # fmt: skip
    body = d._COMPILED[(("dynamic", False),)]
    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    short, long = "a fox", " ".join(["a red fox running through deep snow"] * 12)  # 1 | 2 buckets
    kw = dict(num_frames=5, num_inference_steps=2, seed=1, progress=False)
    opts = dict(device="cpu", compile=True, embed_cache=False, cfg_batch="on")
    before, seen = graphs(), {}
    for nag in (None, 11.0):
        pipe = wanlite.load(str(tiny_checkpoint), nag_scale=nag, **opts)
        for size in ((32, 32), (32, 48)):
            for guidance in (5.0, 1.0):
                for prompt in (short, long):
                    pipe.generate(prompt, height=size[0], width=size[1], guidance_scale=guidance,
                                  negative_prompt="blurry", **kw)  # fmt: skip
                    seen[nag, size, guidance, prompt] = graphs() - before
    # A longer prompt (another key bucket) never added a graph.
    assert all(seen[k[:3] + (long,)] == seen[k[:3] + (short,)] for k in seen)
    total = graphs() - before
    print(f"compiled block graphs for the mix: {total} (limit {d.RECOMPILE_LIMIT})")
    assert total <= 2 * 2 * 2  # batch 1 | 2 x NAG off | on x 2 sizes
    assert body.eager_calls == 0


def test_compiled_blocks_log_once_when_they_fall_back_to_eager(state, monkeypatch, caplog):
    """Past the recompile limit a new variant runs eagerly (same output), logged once."""
    import torch._dynamo

    from wanlite.models import dit as d

    torch._dynamo.reset()
    monkeypatch.setattr(d, "RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(d, "_COMPILED", {})
    model = _fresh(state)
    d.compile_blocks(model, backend="eager")
    eager = _fresh(state)
    # (torch without the compile argument reads the global limit; torch's own patch restores
    # it: pytest's monkeypatch would leave the config entry hidden after the test)
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level("WARNING"):
        for shape in SHAPES[:3]:  # three token grids: two past the limit of one
            x, t, ctx = _inputs(*shape)
            assert torch.allclose(model(x, t, ctx), eager(x, t, ctx), atol=1e-5)
    body = model.blocks[0].compiled_body
    assert body.eager_calls == 2 * CFG.num_layers
    assert sum("run eagerly" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rms_norm_matches_torch(dtype):
    """The q/k RMSNorm's three-pass CPU forward against ``nn.RMSNorm``'s, on a contiguous and
    on a strided input (a q slice of fused q/k/v projections)."""
    from wanlite.models.dit import RMSNorm

    g = torch.Generator().manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-6), torch.nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(64, generator=g) + 1)
        ref.weight.copy_(ours.weight)
    ours, ref = ours.to(dtype), ref.to(dtype)
    fused = torch.randn(2, 50, 3 * 64, generator=g).mul_(3).to(dtype)
    for x in (fused[..., 64:128].contiguous(), fused[..., 64:128]):
        a, b = ours(x), ref(x)
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        # fp32: rounding only; bf16: at most one rounding step of the bf16 result
        tol = 1e-6 if dtype == torch.float32 else 2**-7
        assert ((a.float() - b.float()).abs() <= tol * b.float().abs() + 1e-6).all()
