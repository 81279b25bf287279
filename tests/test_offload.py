"""Every offload mode gives the same video; quantized modes stay close to it."""

import numpy as np
import pytest
import torch

import wanlite
from wanlite.offload import BlockStreamer, RowEmbedding

KW = dict(prompt="a fox", height=32, width=48, num_frames=5, num_inference_steps=2, seed=1)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    # torch's GEMMs: streamed blocks always use them, so the modes can be compared bit for bit
    # (the packed oneDNN GEMMs of resident blocks are tested against them in test_pipeline).
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", offload="none", linear="aten")
    return pipe.generate(**KW, progress=False)


@pytest.mark.parametrize("offload", ["model", "blocks"])
def test_offload_modes_are_exact(tiny_checkpoint, reference, offload):
    pipe = wanlite.load(
        str(tiny_checkpoint), device="cpu", offload=offload, linear="aten", embed_cache=False
    )
    video = pipe.generate(**KW, progress=False)
    assert pipe.placement.offload == offload
    assert torch.equal(video.latents, reference.latents)
    assert np.array_equal(video.frames, reference.frames)
    # Released after their phases: nothing stays resident between calls.
    assert all(c.module is None for c in pipe.components.values())


@pytest.mark.parametrize("quant", ["int8", "fp8"])
@pytest.mark.parametrize("offload", ["none", "blocks"])
def test_quantized_modes_are_close(tiny_checkpoint, reference, quant, offload):
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", quant=quant, offload=offload)
    video = pipe.generate(**KW, progress=False)
    diff = (video.latents - reference.latents).abs().max().item()
    mse = np.mean((video.frames.astype(float) - reference.frames.astype(float)) ** 2)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    print(f"{quant}/{offload}: latents max abs diff {diff:.4f}, PSNR {psnr:.1f} dB")
    assert 0 < diff < 0.2 and psnr > 35  # random weights: drift, not quality
    # The umT5 runs once per prompt: it is used as stored, never quantized in RAM, and the
    # embedding cache is keyed on what ran (the unquantized encoder).
    assert pipe.components["text_encoder"]._compact is None
    assert pipe.components["text_encoder"].quant == "none"


def test_block_streamer_materializes_one_block_at_a_time():
    blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    weights = {
        f"blocks.{i}.{n}": p.detach().clone()
        for i, b in enumerate(blocks)
        for n, p in b.named_parameters()
    }
    x = torch.randn(2, 4)
    expected = x
    for b in blocks:
        expected = b(expected)
    resident = []

    def source(name):
        resident.append(sum(not p.is_meta for b in blocks for p in b.parameters()))
        return weights[name]

    streamer = BlockStreamer(blocks, "blocks", source, torch.device("cpu"))
    assert all(p.is_meta for p in blocks.parameters())
    y = x
    for b in blocks:
        y = b(y)
    streamer.close()
    assert torch.equal(y, expected)
    assert max(resident) <= 2  # the running block's 2 tensors at most (weight, bias)


def test_row_embedding_reads_only_the_rows_asked_for():
    table = torch.randn(100, 8)
    asked = []

    def rows(r):
        asked.append(list(r))
        return table[r]

    emb = RowEmbedding(rows, torch.float32)
    ids = torch.tensor([[5, 7, 5, 0]])
    assert torch.equal(emb(ids), table[ids])
    assert asked == [[0, 5, 7]]


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_token_embedding_is_read_by_rows_even_when_resident(tiny_checkpoint, quant):
    """umT5's token embedding (4 GiB in fp32 at full size) is never read whole: a prompt's rows
    are read on demand, with offload off too, and the int8 copy in RAM leaves it out."""
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", offload="none", quant=quant)
    t5 = pipe.components["text_encoder"]
    assert isinstance(t5.module.token_embedding, RowEmbedding)
    assert not any(k.startswith("token_embedding") for k in t5._compact or {})
    vocab = pipe.cfg.t5.vocab_size
    held = [*t5.module.parameters(), *(t5._compact or {}).values()]
    assert not any(vocab in t.shape for t in held)  # no [vocab, d_model] table in RAM


def test_streamed_blocks_hand_their_memory_to_the_compute_stream(monkeypatch):
    """On CUDA a block's tensors are allocated on the prefetch stream and read on the compute
    stream: each must be recorded on the compute stream before the block runs, or the
    allocator may give its memory to the next prefetch while kernels still read it.  The
    stream logic is run here with stand-ins for the CUDA stream, event and record_stream."""
    from wanlite import offload

    blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    weights = {
        f"blocks.{i}.{n}": p.detach().clone()
        for i, b in enumerate(blocks)
        for n, p in b.named_parameters()
    }
    handed, waited = [], []

    class Stream:
        def wait_event(self, event):
            waited.append(event)

    compute = Stream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(offload, "hand_over", lambda ts, s: handed.append((len(list(ts)), s)))
    streamer = BlockStreamer(blocks, "blocks", weights.__getitem__, torch.device("cpu"))
    monkeypatch.setattr(
        streamer,
        "_read",
        lambda i: ({rel: weights[full] for rel, full in streamer.names[i].items()}, f"event{i}"),
    )
    y = torch.randn(2, 4)
    for b in blocks:
        y = b(y)
    streamer.close()
    assert waited == ["event0", "event1", "event2"]
    assert handed == [(2, compute)] * 3  # weight and bias of every block, on the compute stream
