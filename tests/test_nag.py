"""NAG (``wanlite.ops.nag``): the combination against the formula, the pipeline against diffusers'
``WanPipeline`` with a NAG cross-attention processor written here, the off path unchanged, the
options, the CLI flags, torch.compile, and CFG-parallel / Ulysses under torchrun.

The diffusers side is an independent implementation: an ``attn2`` processor that attends to the
prompt and to the negative prompt (its 512-token padded embedding, text-embedded by diffusers'
own ``condition_embedder``) and combines them in the order of Kijai's ``WanVideoNAG``, on the
conditional forwards only (a pre-hook on the transformer tells them from the unconditional ones).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wanlite.ops.nag import NAG, guide

REQ = dict(height=32, width=48, num_frames=5, num_inference_steps=3, seed=5, progress=False)
PROMPT, NEG = "a red fox running through snow", "blurry, low quality, dark"


def _load(ckpt, **kw):
    import wanlite

    return wanlite.load(str(ckpt), device="cpu", dtype="float32", embed_cache=False, **kw)


# --- the combination ----------------------------------------------------------------------------


def _formula(z_pos, z_neg, scale, tau, alpha):
    """The formula token by token in float64 (no eps: it is 1e-7 against norms of ~D): (the
    result, and whether the tau cap applied to each token)."""
    out, capped = torch.empty_like(z_pos, dtype=torch.float64), []
    for b in range(z_pos.shape[0]):
        for i in range(z_pos.shape[1]):
            p, n = z_pos[b, i].double(), z_neg[b, i].double()
            g = p * scale - n * (scale - 1)
            ratio = g.abs().sum() / p.abs().sum()
            capped.append(bool(ratio > tau))
            if ratio > tau:
                g = g * (tau * p.abs().sum() / g.abs().sum())
            out[b, i] = g * alpha + p * (1 - alpha)
    return out, capped


@pytest.mark.parametrize("scale,tau,alpha", [(11.0, 2.5, 0.25), (3.0, 1.5, 0.5), (2.0, 8.0, 1.0)])
def test_guide_matches_the_formula_with_and_without_the_cap(scale, tau, alpha):
    g = torch.Generator().manual_seed(0)
    z_pos = torch.randn(2, 40, 64, generator=g)
    # Half the tokens: a negative close to the positive (g stays near z_pos: no cap); the
    # other half an unrelated negative (g grows ~scale times: capped at tau for small tau).
    z_neg = torch.randn(2, 40, 64, generator=g)
    z_neg[:, ::2] = z_pos[:, ::2] + 0.01 * z_neg[:, ::2]
    before = z_pos.clone(), z_neg.clone()
    got = guide(z_pos, z_neg, NAG(scale, tau, alpha))
    want, capped = _formula(z_pos, z_neg, scale, tau, alpha)
    assert torch.equal(z_pos, before[0]) and torch.equal(z_neg, before[1])  # inputs untouched
    assert got.dtype == torch.float32 and got.shape == z_pos.shape
    assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    if tau < 3:  # the cap bites on the unrelated half and not on the close half
        assert any(capped) and not all(capped)
    else:
        assert not any(capped[0::2])


def test_guide_keeps_the_dtype_and_maps_zero_tokens_to_zero():
    z = torch.randn(1, 8, 32)
    z[0, 3] = 0.0
    neg = torch.randn(1, 8, 32)
    neg[0, 3] = 0.0  # 0/0 ratio: counted as 10 (> tau), g is 0 anyway
    out = guide(z, neg, NAG(11.0))
    assert torch.isfinite(out).all() and not out[0, 3].any()
    half = guide(z.bfloat16(), neg.bfloat16(), NAG(11.0))
    assert half.dtype == torch.bfloat16
    assert (half.float() - out).abs().max().item() <= 0.05 * out.abs().max().item()
    same = guide(z, z, NAG(5.0, alpha=0.6))  # negative == positive: no change (up to rounding)
    assert (same - z).abs().max().item() <= 1e-5


# --- against diffusers -----------------------------------------------------------------------


def _kijai(z_pos, z_neg, scale, tau, alpha):
    """Kijai's WanVideoNAG order of operations, written out (fp32)."""
    g = z_pos * scale - z_neg * (scale - 1)
    n_pos = torch.norm(z_pos, p=1, dim=-1, keepdim=True)
    n_g = torch.norm(g, p=1, dim=-1, keepdim=True)
    ratio = torch.nan_to_num(n_g / n_pos, nan=10.0)
    g = torch.where(ratio > tau, g * (n_pos * tau) / (n_g + 1e-7), g)
    return g * alpha + z_pos * (1 - alpha), ratio > tau


class DiffusersNAG:
    """An ``attn2`` processor for diffusers' ``WanAttention``: NAG when ``state["cond"]``."""

    def __init__(self, state: dict, negative: torch.Tensor, p: NAG):
        self.state, self.negative, self.p = state, negative, p

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):  # fmt: skip
        def heads(t):
            return t.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        q = heads(attn.norm_q(attn.to_q(hidden_states)))

        def attend(ctx):
            k, v = heads(attn.norm_k(attn.to_k(ctx))), heads(attn.to_v(ctx))
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

        z = attend(encoder_hidden_states)
        if self.state["cond"]:
            z, capped = _kijai(z, attend(self.negative), self.p.scale, self.p.tau, self.p.alpha)
            self.state["capped"] += int(capped.sum())
            self.state["tokens"] += capped.numel()
        return attn.to_out[1](attn.to_out[0](z))


def _diffusers_nag(pipe, p: NAG, guidance: float, seed: int, **size):
    tr = pipe.transformer
    with torch.no_grad():
        neg = pipe.encode_prompt(NEG, do_classifier_free_guidance=False, max_sequence_length=512)
        negative = tr.condition_embedder.text_embedder(neg[0])  # [1, 512, D], padding included
    state = dict(cond=True, capped=0, tokens=0, forwards=[])

    def which_pass(module, args, kwargs):
        # the pipeline's own negative embedding may differ from ours by float rounding (~1e-6)
        ctx = kwargs["encoder_hidden_states"]
        state["cond"] = not torch.allclose(ctx, neg[0], rtol=0, atol=1e-4)
        state["forwards"].append(state["cond"])

    old = [b.attn2.processor for b in tr.blocks]
    hook = tr.register_forward_pre_hook(which_pass, with_kwargs=True)
    try:
        for b in tr.blocks:
            b.attn2.set_processor(DiffusersNAG(state, negative, p))
        out = pipe(prompt=PROMPT, negative_prompt=NEG, guidance_scale=guidance, **size,
                   generator=torch.Generator("cpu").manual_seed(seed),
                   output_type="latent").frames  # fmt: skip
    finally:
        hook.remove()
        for b, o in zip(tr.blocks, old):
            b.attn2.set_processor(o)
    return out, state


@pytest.mark.parametrize(
    "guidance,cfg_batch,p",
    [
        (1.0, "auto", NAG(11.0)),  # the accelerator-LoRA case: no CFG, NAG alone
        (5.0, "on", NAG(11.0)),  # CFG as one batch of 2: NAG on row 0 only
        (5.0, "off", NAG(3.0, tau=1.5, alpha=0.5)),  # CFG as two forwards
    ],
)
def test_latents_match_diffusers_with_a_nag_processor(
    tiny_checkpoint, diffusers_pipe, guidance, cfg_batch, p
):
    req = dict(REQ, guidance_scale=guidance)
    pipe = _load(tiny_checkpoint, nag_scale=p.scale, nag_tau=p.tau, nag_alpha=p.alpha,
                 cfg_batch=cfg_batch)  # fmt: skip
    ours = pipe.generate(PROMPT, negative_prompt=NEG, output_type="latent", **req)
    size = {k: REQ[k] for k in ("height", "width", "num_frames", "num_inference_steps")}
    ref, state = _diffusers_nag(diffusers_pipe, p, guidance, REQ["seed"], **size)
    diff = (ours.latents - ref).abs().max().item()
    print(f"NAG {p}, guidance {guidance}, cfg_batch {cfg_batch}: latents max abs diff {diff:.2e}"
          f" ({state['capped']} of {state['tokens']} token rows capped)")  # fmt: skip
    assert diff <= 1e-4
    steps = REQ["num_inference_steps"]
    assert state["forwards"] == ([True, False] if guidance > 1 else [True]) * steps
    assert 0 < state["capped"] < state["tokens"]  # the case exercises the cap, and not only
    assert ours.stats["cfg_batched"] == (cfg_batch == "on" and guidance > 1)
    assert ours.stats["dit_forwards"] == steps * (2 if guidance > 1 else 1)


# --- the pipeline ----------------------------------------------------------------------------


def _old_cross_attention(self, x, kv, bias, attn, nag=None):
    """``Attention.cross_attention`` as it was before NAG (verbatim)."""
    assert nag is None
    q = self._heads(self.norm_q(self.q(x))).transpose(1, 2)
    k, v = kv
    if bias is None:
        out = attn(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), bias)
        out = out.to(q.dtype)
    return self.o(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("guidance,cfg_batch", [(1.0, "auto"), (5.0, "on"), (5.0, "off")])
def test_nag_off_is_bit_identical(tiny_checkpoint, monkeypatch, guidance, cfg_batch):
    from wanlite.models.dit import Attention

    req = dict(REQ, guidance_scale=guidance)
    plain = _load(tiny_checkpoint, cfg_batch=cfg_batch).generate(PROMPT, negative_prompt=NEG, **req)
    off = _load(tiny_checkpoint, cfg_batch=cfg_batch, nag_scale=None, nag_tau=7.0, nag_alpha=1.0)
    video = off.generate(PROMPT, negative_prompt=NEG, **req)
    assert torch.equal(video.latents, plain.latents)
    assert np.array_equal(video.frames, plain.frames)
    # ... and the same ops as the cross-attention before NAG existed
    monkeypatch.setattr(Attention, "cross_attention", _old_cross_attention)
    before = _load(tiny_checkpoint, cfg_batch=cfg_batch)
    before = before.generate(PROMPT, negative_prompt=NEG, **req)
    assert torch.equal(before.latents, plain.latents)


def test_negative_prompt_steers_at_guidance_1(tiny_checkpoint):
    req = dict(REQ, guidance_scale=1.0)
    pipe = _load(tiny_checkpoint, nag_scale=11.0)
    a = pipe.generate(PROMPT, negative_prompt=NEG, **req)
    b = pipe.generate(PROMPT, negative_prompt="bright, sharp", **req)
    off = _load(tiny_checkpoint).generate(PROMPT, negative_prompt=NEG, **req)
    off_b = _load(tiny_checkpoint).generate(PROMPT, negative_prompt="bright, sharp", **req)
    assert torch.equal(off.latents, off_b.latents)  # without NAG the negative does nothing
    assert not torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, off.latents)
    assert a.stats["dit_forwards"] == REQ["num_inference_steps"] and a.stats["cfg_steps"] == 0
    assert torch.equal(pipe.generate(PROMPT, negative_prompt=NEG, **req).latents, a.latents)


@pytest.mark.parametrize("guidance,cfg_batch", [(1.0, "auto"), (5.0, "on"), (5.0, "off")])
def test_negative_kv_is_computed_once_per_generation(tiny_checkpoint, monkeypatch, guidance,
                                                     cfg_batch):  # fmt: skip
    """The text K/V per block: the prompt's (or the CFG pair's) and the negative prompt's, once
    each whatever the step count; the unconditional pass shares NAG's negative text."""
    from wanlite.models.configs import TINY
    from wanlite.models.dit import Attention

    calls = []
    real = Attention.context_kv
    monkeypatch.setattr(Attention, "context_kv", lambda s, ctx: calls.append(1) or real(s, ctx))
    pipe = _load(tiny_checkpoint, nag_scale=11.0, cfg_batch=cfg_batch)
    pipe.generate(PROMPT, negative_prompt=NEG, **dict(REQ, guidance_scale=guidance))
    assert len(calls) == 2 * TINY.dit.num_layers


def test_negative_embedding_comes_from_the_cache(tiny_checkpoint, monkeypatch, tmp_path):
    import wanlite

    monkeypatch.setenv("WANLITE_CACHE", str(tmp_path))
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", dtype="float32", nag_scale=11.0)
    req = dict(REQ, guidance_scale=1.0)
    first = pipe.generate(PROMPT, negative_prompt=NEG, **req)
    monkeypatch.setattr(pipe, "_encode", lambda *a: pytest.fail("the text encoder ran"))
    again = pipe.generate(PROMPT, negative_prompt=NEG, **req)
    assert torch.equal(first.latents, again.latents)


def test_offload_modes_and_step_cache_with_nag(tiny_checkpoint):
    """The negative K/V are made where the block's weights are (streamed blocks: bit for bit the
    resident result, torch's GEMMs as streamed blocks use); the step caches keep NAG."""
    req = dict(REQ, guidance_scale=1.0, num_inference_steps=4, negative_prompt=NEG)
    kw = dict(nag_scale=11.0, linear="aten")
    resident = _load(tiny_checkpoint, offload="none", **kw).generate(PROMPT, **req)
    for offload in ("model", "blocks"):
        pipe = _load(tiny_checkpoint, offload=offload, **kw)
        video = pipe.generate(PROMPT, **req)
        assert pipe.placement.offload == offload
        assert torch.equal(video.latents, resident.latents), offload
    pipe = _load(tiny_checkpoint, cache="firstblock", cache_threshold=1.0, **kw)
    cached = pipe.generate(PROMPT, **req)
    assert 0 < cached.stats["dit_forwards_skipped"] < 4
    plain = _load(tiny_checkpoint, cache="firstblock", cache_threshold=1.0, linear="aten")
    assert not torch.equal(plain.generate(PROMPT, **req).latents, cached.latents)


# --- options and CLI -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,value",
    [("nag_scale", 1.0), ("nag_scale", 0.5), ("nag_scale", 0), ("nag_scale", True),
     ("nag_scale", float("nan")), ("nag_scale", "11"), ("nag_tau", 0.0), ("nag_tau", -1.0),
     ("nag_tau", float("inf")), ("nag_alpha", -0.1), ("nag_alpha", 1.5), ("nag_alpha", None)],
)  # fmt: skip
def test_bad_nag_options_name_the_option(name, value):
    from wanlite.options import Options

    with pytest.raises(ValueError, match=name):
        Options(**{name: value})


def test_nag_option_defaults():
    from wanlite.options import Options

    o = Options()
    assert (o.nag_scale, o.nag_tau, o.nag_alpha) == (None, 2.5, 0.25)
    assert Options(nag_scale=11, nag_tau=1, nag_alpha=0).nag_scale == 11
    assert NAG(11.0) == NAG(11.0, 2.5, 0.25)


def test_cli_flags(tiny_checkpoint, tmp_path, capsys):
    from wanlite.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert all(f in text for f in ("--nag-scale", "--nag-tau", "--nag-alpha"))
    out = tmp_path / "v.mp4"
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "a cat", "--out", str(out)]
    args += ["--height", "16", "--width", "16", "--num-frames", "1", "--num-inference-steps", "1"]
    args += ["--guidance-scale", "1", "--negative-prompt", "a dog", "--quiet"]
    assert main(args + ["--nag-scale", "1"]) == 2
    assert "nag_scale must be a number > 1" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--nag-scale", "11", "--nag-tau", "3", "--nag-alpha", "0.5"]) == 0
    assert out.is_file()


# --- torch.compile ----------------------------------------------------------------------------


def test_compiled_blocks_with_nag_match_eager():
    from wanlite.models.configs import TINY
    from wanlite.models.dit import NagText, WanDiT, compile_blocks
    from wanlite.weights.random_checkpoint import random_state_dict

    with torch.device("meta"):
        skeleton = WanDiT(TINY.dit)
    state = random_state_dict(skeleton, "transformer", seed=3)
    model = WanDiT(TINY.dit).eval()
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, TINY.dit.in_channels, 3, 6, 8, generator=g)
    ctx = torch.zeros(3, 512, TINY.dit.text_dim)
    for row, n in enumerate((7, 4, 9)):  # prompt, its CFG negative, NAG's negative
        ctx[row, :n] = torch.randn(n, TINY.dit.text_dim, generator=g)
    temb = model.time_embeddings(torch.tensor([700.0]), 1)

    def run():
        text = model.prepare_text(ctx[:2], [7, 4])  # the batched CFG pair, NAG on row 0
        text.nag = NagText(NAG(11.0), model.prepare_text(ctx[2:], [9]))
        return model.step(x, temb, text)

    eager = run()
    compile_blocks(model)
    diff = (run() - eager).abs().max().item()
    print(f"NAG, torch.compile vs eager: max abs diff {diff:.1e}")
    assert diff <= 1e-4


# --- CFG-parallel and Ulysses under torchrun ----------------------------------------------------

PARALLEL = {  # name: (parallel, guidance)
    "cfg2": ("cfg=2", 5.0),
    "cfg2_nocfg": ("cfg=2", 1.0),
    "u2": ("ulysses=2", 1.0),
    "u2_cfg": ("ulysses=2", 5.0),
}
ODD = dict(height=17, width=35, num_frames=6, num_inference_steps=3, seed=3, progress=False)


def _parallel_run(ckpt, parallel, guidance):
    pipe = _load(ckpt, cfg_batch="on", parallel=parallel, nag_scale=11.0)
    return pipe.generate("a red boat", negative_prompt=NEG, guidance_scale=guidance, **ODD)


def worker(out: Path) -> None:
    from wanlite.weights.random_checkpoint import ensure_random_checkpoint

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for name, (parallel, guidance) in PARALLEL.items():
        video = _parallel_run(ensure_random_checkpoint("tiny"), parallel, guidance)
        np.savez(out / f"{name}.{rank}.npz", latents=video.latents.numpy(), frames=video.frames)
        (out / f"{name}.{rank}.json").write_text(json.dumps(video.stats))


@pytest.fixture(scope="module")
def parallel_runs(tiny_checkpoint, tmp_path_factory, torchrun):
    out = tmp_path_factory.mktemp("nag_parallel")
    torchrun(__file__, [str(out)], 2)
    return out


@pytest.mark.parametrize("name", list(PARALLEL))
def test_parallel_ranks_match_single_process(tiny_checkpoint, parallel_runs, name):
    from wanlite.options import Options

    parallel, guidance = PARALLEL[name]
    ref = _parallel_run(tiny_checkpoint, None, guidance)
    for rank in range(2):
        got = np.load(parallel_runs / f"{name}.{rank}.npz")
        diff = np.abs(got["latents"] - ref.latents.numpy()).max()
        print(f"{name} rank {rank}: latents max abs diff {diff:.1e}")
        assert diff <= 1e-5
        stats = json.loads((parallel_runs / f"{name}.{rank}.json").read_text())
        assert stats["dit_forwards"] == ref.stats["dit_forwards"]
        assert stats["parallel"] == Options(parallel=parallel).parallel  # it did run split


if __name__ == "__main__":  # the torchrun worker
    worker(Path(sys.argv[1]))
