import torch

import wanlite


def test_repeated_prompts_skip_the_encoder(tiny_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("WANLITE_CACHE", str(tmp_path))
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", offload="none")
    kw = dict(height=16, width=16, num_frames=1, num_inference_steps=1, seed=0, progress=False)
    first = pipe.generate("a cat", negative_prompt="dark", **kw)
    calls = []
    real = pipe._encode
    monkeypatch.setattr(
        pipe, "_encode", lambda texts, place: calls.append(texts) or real(texts, place)
    )
    again = pipe.generate("a cat", negative_prompt="dark", **kw)
    assert calls == [] and torch.equal(first.latents, again.latents)
    pipe.generate("a dog", negative_prompt="dark", **kw)
    assert calls == [["a dog"]]  # only the new prompt is encoded
    # On disk: a new pipeline (same model) finds both without encoding.
    fresh = wanlite.load(str(tiny_checkpoint), device="cpu", offload="none")
    monkeypatch.setattr(
        fresh, "_encode", lambda texts, place: calls.append(texts) or real(texts, place)
    )
    assert torch.equal(fresh.generate("a cat", negative_prompt="dark", **kw).latents, first.latents)
    assert calls == [["a dog"]]
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 3


def test_cache_can_be_disabled(tiny_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("WANLITE_CACHE", str(tmp_path))
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", embed_cache=False)
    pipe.generate("x", height=16, width=16, num_frames=1, num_inference_steps=1, progress=False)
    assert not (tmp_path / "embeddings").exists()
