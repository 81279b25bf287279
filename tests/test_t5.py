"""Our umT5 encoder against transformers' UMT5EncoderModel on the same random weights."""

from __future__ import annotations

import pytest
import torch

from wanlite.models import t5
from wanlite.models.configs import TINY
from wanlite.weights.random_checkpoint import random_state_dict

transformers = pytest.importorskip("transformers")

CFG = TINY.t5
L = 512
LENGTHS = (1, 7, 300, 512)  # real tokens per row, incl. a single token and a full row


def ours_from(sd: dict[str, torch.Tensor], cfg=CFG) -> t5.UMT5Encoder:
    with torch.device("meta"):
        model = t5.UMT5Encoder(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def reference_from(sd: dict[str, torch.Tensor], cfg=CFG, attn: str | None = None):
    config = transformers.UMT5Config(**cfg.to_diffusers())
    if attn is not None:
        config._attn_implementation = attn
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(config)
    theirs = {t5.to_diffusers_key(k): v for k, v in sd.items()}
    for alias, canonical in t5.TIED_ALIASES.items():  # transformers lists the tied name too
        theirs[alias] = theirs[canonical]
    model.load_state_dict(theirs, strict=True, assign=True)
    model.tie_weights()
    assert model.encoder.embed_tokens.weight is model.shared.weight
    if model.shared.weight.dtype == torch.float16:  # what from_pretrained(dtype=fp16) does
        for name in model._keep_in_fp32_modules:
            for module_name, module in model.named_modules():
                if module_name.endswith("." + name):
                    module.float()
    return model.eval().requires_grad_(False)


def random_weights(seed: int = 0, dtype=torch.float32, cfg=CFG) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = t5.UMT5Encoder(cfg)
    return random_state_dict(model, "text_encoder", seed, dtype=dtype)


def padded_batch(lengths=LENGTHS, length=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CFG.vocab_size, (len(lengths), length), generator=g)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n - 1] = 1  # </s>
    return ids * mask, mask  # pad id 0 after the real tokens, as the tokenizer makes them


@torch.no_grad()
def run_both(sd, ids, mask, attn=None):
    ours = ours_from(sd)(ids, mask)
    ref = reference_from(sd, attn=attn)(input_ids=ids, attention_mask=mask).last_hidden_state
    return ours, ref


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_transformers_fp32(attn):
    ids, mask = padded_batch()
    ours, ref = run_both(random_weights(0), ids, mask, attn)
    assert ours.shape == (len(LENGTHS), L, CFG.d_model) and ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    print(f"fp32 vs transformers ({attn}), all {L} positions: max|diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_matches_transformers_bf16_weights_fp32_compute():
    sd = {k: v.float() for k, v in random_weights(1, torch.bfloat16).items()}
    ids, mask = padded_batch(seed=1)
    ours, ref = run_both(sd, ids, mask)
    diff = (ours - ref).abs().max().item()
    print(f"bf16 weights, fp32 compute: max|diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_compute_close_to_fp32(dtype):
    """Computing in bf16/fp16 (attention core fp32): at least as close to the fp32 result of the
    same weights as transformers computing in that dtype."""
    weights = random_weights(2, torch.bfloat16)
    ids, mask = padded_batch(seed=2)
    truth = ours_from({k: v.float() for k, v in weights.items()})(ids, mask)
    sd = {k: v.to(dtype) for k, v in weights.items()}
    ours = ours_from(sd)(ids, mask)
    assert ours.dtype == dtype
    ref = reference_from(sd)(input_ids=ids, attention_mask=mask).last_hidden_state
    err = (ours.float() - truth).abs().max().item()
    ref_err = (ref.float() - truth).abs().max().item()
    scale = truth.abs().max().item()
    print(
        f"{dtype} compute: ours max err {err:.3g}, transformers {ref_err:.3g} (|x|max {scale:.3g})"
    )
    assert torch.isfinite(ours).all()
    assert err <= 0.03 * scale
    assert err <= 1.25 * ref_err


@torch.no_grad()
def test_fp16_ffn_output_runs_in_fp32_like_transformers():
    """FFN outputs beyond the fp16 range (T5's known overflow): the output projection runs in
    fp32 and the residual stream stays fp32, as transformers does with ``wo`` kept in fp32."""
    weights = random_weights(7, torch.bfloat16)
    for k in weights:
        if k.endswith("ffn.fc2.weight"):
            weights[k] = weights[k].float() * 3e4
    ids, mask = padded_batch(seed=7)
    fp32 = ours_from({k: v.float() for k, v in weights.items()})
    peaks = []
    hooks = [
        b.ffn.register_forward_hook(lambda m, i, o: peaks.append(o.abs().max()))
        for b in fp32.blocks
    ]
    truth = fp32(ids, mask)
    for h in hooks:
        h.remove()
    fp16_max = torch.finfo(torch.float16).max
    assert max(peaks).item() > fp16_max  # the case this test is about: fp16 would overflow
    ref = reference_from({k: v.half() for k, v in weights.items()})
    ref = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    scale = truth.abs().max().item()
    for stored in ("fp32", "fp16"):  # fc2 loaded in fp32 (keep_in_fp32) or as the rest
        sd = {
            k: v.float() if stored == "fp32" and t5.keep_in_fp32(k) else v.half()
            for k, v in weights.items()
        }
        ours = ours_from(sd)(ids, mask)
        assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
        diff = (ours.float() - ref.float()).abs().max().item()
        err = (ours.float() - truth).abs().max().item()
        print(f"fp16, fc2 stored {stored}: vs transformers {diff:.3g}, vs fp32 {err:.3g}")
        assert diff <= 4 * torch.finfo(torch.float16).eps * scale
        assert err <= 0.01 * scale


@torch.no_grad()
def test_real_tokens_independent_of_padding_length():
    """Outputs at real tokens are the same whether the batch is padded to 512 or trimmed."""
    ids, mask = padded_batch(lengths=(5, 40))
    model = ours_from(random_weights(3))
    full = model(ids, mask)
    trimmed = model(ids[:, :40], mask[:, :40])
    for i, n in enumerate((5, 40)):
        assert (full[i, :n] - trimmed[i, :n]).abs().max().item() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_each_equals_one_forward_per_text(dtype):
    """Texts of different lengths through the layers in one pass give, bit for bit, what one
    ``forward`` per text gives; each layer module is called once for all of them."""
    model = ours_from(random_weights(4)).to(dtype)
    texts = [padded_batch(lengths=(n,), length=n, seed=n) for n in (1, 9, 30)]
    calls = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    together = model.encode_each(texts)
    assert calls == [3] * CFG.num_layers
    for (ids, mask), out in zip(texts, together):
        assert out.shape == (1, ids.shape[1], CFG.d_model) and out.dtype == dtype
        assert torch.equal(out, model(ids, mask))


def test_relative_buckets_match_transformers():
    config = transformers.UMT5Config(**CFG.to_diffusers())
    attn = transformers.models.umt5.modeling_umt5.UMT5Attention(config, True)
    for n in (1, 2, 17, 512, 1100):
        pos = torch.arange(n)
        expected = attn._relative_position_bucket(pos[None, :] - pos[:, None])
        got = t5.relative_buckets(n, CFG.num_buckets, CFG.max_distance)
        assert torch.equal(got, expected), n


def test_meta_construction_and_assign_loading():
    with torch.device("meta"):
        model = t5.UMT5Encoder(CFG)
    assert all(p.is_meta for p in model.parameters())
    assert not list(model.buffers())  # nothing derived is stored
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * CFG.num_layers and all(m.bias is None for m in linears)
    sd = random_weights(4, torch.bfloat16)
    model.load_state_dict(sd, strict=True, assign=True)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.bfloat16
        assert p.data_ptr() == sd[name].data_ptr()  # assigned, not copied
    ids, mask = padded_batch(lengths=(3, 9), length=16)
    assert model(ids, mask).dtype == torch.bfloat16


BLOCK_PARAMS = ("norm1", "attn.q", "attn.k", "attn.v", "attn.o", "norm2")
BLOCK_PARAMS += ("ffn.gate.0", "ffn.fc1", "ffn.fc2", "pos_embedding.embedding")


def test_key_names_round_trip():
    with torch.device("meta"):
        ours = t5.UMT5Encoder(CFG)
        ref = transformers.UMT5EncoderModel(transformers.UMT5Config(**CFG.to_diffusers()))
    names = [n for n, _ in ours.named_parameters()]
    expected = {
        "token_embedding.weight",
        "norm.weight",
        *(f"blocks.{i}.{s}.weight" for i in range(CFG.num_layers) for s in BLOCK_PARAMS),
    }
    assert set(names) == expected
    theirs = {t5.to_diffusers_key(n) for n in names}
    assert theirs | set(t5.TIED_ALIASES) == set(ref.state_dict())
    assert all(t5.from_diffusers_key(t5.to_diffusers_key(n)) == n for n in names)
    assert t5.from_diffusers_key("encoder.embed_tokens.weight") == "token_embedding.weight"
    assert t5.from_diffusers_key("encoder.block.11.layer.1.DenseReluDense.wo.weight") == (
        "blocks.11.ffn.fc2.weight"
    )
    for bad in ("encoder.block.0.layer.2.layer_norm.weight", "lm_head.weight", "blocks.x.norm1"):
        with pytest.raises(KeyError, match="layer.2|lm_head|blocks.x"):
            t5.from_diffusers_key(bad)
    with pytest.raises(KeyError, match="shared.weight"):
        t5.to_diffusers_key("shared.weight")


def test_save_pretrained_tied_embedding(tmp_path):
    """What transformers writes for the tied embedding: only ``shared.weight``; the loader
    maps it (and the alias, if another writer kept it) to ``token_embedding.weight``."""
    from safetensors import safe_open

    ref = reference_from(random_weights(5))
    ref.save_pretrained(tmp_path)
    keys = set()
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    print(
        "save_pretrained embedding keys:", sorted(k for k in keys if "embed" in k or "shared" in k)
    )
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys
    assert {t5.from_diffusers_key(k) for k in keys} == set(random_weights(5))


def test_checkpoint_file_round_trip(tmp_path):
    """A bf16 safetensors file in the transformers layout (as the random checkpoint writer makes
    it): ``UMT5EncoderModel.from_pretrained`` and our rename-and-assign load agree."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = random_weights(6, torch.bfloat16)
    save_file(
        {t5.to_diffusers_key(k): v for k, v in weights.items()}, tmp_path / "model.safetensors"
    )
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_diffusers()))
    ref = transformers.UMT5EncoderModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    sd = {}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for key in sorted(f.keys()):
            if key not in t5.TIED_ALIASES:
                sd[t5.from_diffusers_key(key)] = f.get_tensor(key).float()
    ids, mask = padded_batch(seed=6)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    diff = (ours_from(sd)(ids, mask) - expected).abs().max().item()
    print(f"from_pretrained vs ours on the same file: max|diff| = {diff:.2e}")
    assert diff <= 1e-4
