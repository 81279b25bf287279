import pytest
import torch

import wanlite
from wanlite.cli import main
from wanlite.runtime.lifecycle import QUANT_META, quantize_checkpoint
from wanlite.weights.tensorstore import TensorStore

KW = dict(prompt="a boat", height=16, width=32, num_frames=5, num_inference_steps=2, seed=3)


def test_quantized_checkpoint_loads_directly_and_matches(tiny_checkpoint, tmp_path):
    out = tmp_path / "q8"
    argv = ["convert", "--model", str(tiny_checkpoint), "--quant", "int8", "--out-dir", str(out)]
    assert main(argv) == 0
    files = sorted((out / "transformer").glob("*.safetensors"))
    store = TensorStore(files)
    assert store.metadata[QUANT_META] == "int8"
    assert any(e.dtype == torch.int8 for e in store.entries.values())
    pre = wanlite.load(str(out), device="cpu", offload="none")
    fly = wanlite.load(str(tiny_checkpoint), device="cpu", quant="int8", offload="none")
    # The DiT: the same int8 weights and scales, quantized in RAM or read from the file.
    pre_dit = pre.components["transformer"].module.state_dict()
    fly_dit = fly.components["transformer"].module.state_dict()
    assert pre_dit.keys() == fly_dit.keys()
    assert all(torch.equal(t, fly_dit[k]) for k, t in pre_dit.items())
    assert any(t.dtype == torch.int8 for t in pre_dit.values())
    # The umT5 is quantized only in the file: in RAM it is used as stored (once per prompt).
    assert pre.components["text_encoder"].quant == "int8"
    assert fly.components["text_encoder"].quant == "none"
    a, b = pre.generate(**KW, progress=False), fly.generate(**KW, progress=False)
    assert 0 < (a.latents - b.latents).abs().max() < 0.2
    disk = lambda p: sum(f.stat().st_size for f in (p / "transformer").glob("*.safetensors"))  # noqa: E731
    # Tiny shapes are dominated by the (kept) embedders; at full size blocks are ~97 %.
    assert disk(out) < 0.7 * disk(tiny_checkpoint)


def test_quantized_checkpoint_cannot_be_reloaded_as_another_mode(tiny_checkpoint, tmp_path):
    out = quantize_checkpoint(tiny_checkpoint, tmp_path / "q8", "int8")
    with pytest.raises(ValueError, match="stored as int8"):
        wanlite.load(str(out), device="cpu", quant="fp8")
    with pytest.raises(ValueError, match="not empty"):
        quantize_checkpoint(tiny_checkpoint, out, "int8")


def test_phase_memory_is_reported_per_phase(tiny_checkpoint):
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", offload="blocks")
    v = pipe.generate(**KW, progress=False)
    assert set(v.peak_memory) == {"encode", "denoise", "decode"}


def test_the_streamed_umt5_reads_each_layer_once_per_encode(tiny_checkpoint):
    """The umT5 streamer does not prefetch layer 0 again after its last layer (it runs one
    forward per new prompt, often the call's last: that read, a whole layer, was wasted); the
    DiT's streamer still does (the next forward starts at block 0).  One encode reads each
    layer tensor exactly once and leaves nothing pending."""
    from wanlite import Options
    from wanlite.pipeline import Pipeline
    from wanlite.runtime.planner import Estimate, Placement

    opts = Options(device="cpu", dtype="float32", offload="blocks", embed_cache=False)
    pipe = Pipeline(tiny_checkpoint, opts)
    place = Placement("blocks", False, False, Estimate(0, 0, 0))
    pipe._acquire("transformer", place)
    assert pipe.components["transformer"].streamer.wrap
    pipe.components["transformer"].release()
    pipe.encode_texts(["a red fox"], place)
    t5 = pipe.components["text_encoder"].streamer
    assert not t5.wrap and not t5.pending
    assert t5.reads == sum(len(n) for n in t5.names)
    pipe.components["text_encoder"].release()
