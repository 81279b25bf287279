"""Every offload mode gives the same video; quantized modes stay close to it."""

import numpy as np
import pytest
import torch

import wanlite
from wanlite.runtime.offload import BlockStreamer, RowEmbedding

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


def test_streamed_reads_are_reported_beside_the_phases(tiny_checkpoint, reference):
    """offload="blocks": the prefetch thread's reads are counted in ``prefetch_seconds``
    (beside the compute) and the compute's waits for them in ``prefetch_wait_seconds``; a
    resident call has neither."""
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", offload="blocks", linear="aten")
    video = pipe.generate(**KW, progress=False)
    assert video.prefetch_seconds > 0
    assert 0 <= video.prefetch_wait_seconds <= sum(video.timings.values())
    again = pipe.generate(**KW, progress=False)  # per call: the components' totals split
    total = sum(c.prefetch_seconds()[0] for c in pipe.components.values())
    assert again.prefetch_seconds > 0
    assert total == pytest.approx(video.prefetch_seconds + again.prefetch_seconds)
    assert reference.prefetch_seconds == reference.prefetch_wait_seconds == 0


def test_cpu_streamer_returns_each_freed_block_to_the_os(monkeypatch):
    """On the CPU each released block is trimmed from glibc's heap (without it a 1.3B forward
    under offload="blocks" kept ~70 MB per block: bench_budgets.py, docs/memory.md)."""
    from wanlite.runtime import offload

    trims = []
    monkeypatch.setattr(offload, "trim", lambda: trims.append(1))
    blocks, weights = _linear_blocks()
    streamer = BlockStreamer(blocks, "blocks", weights.__getitem__, torch.device("cpu"), 0)
    y = torch.randn(2, 4)
    for b in blocks:
        y = b(y)
    streamer.close()
    assert len(trims) == len(blocks)


def test_streamed_umt5_is_read_once_for_both_texts(tiny_checkpoint, monkeypatch):
    """With CFG the prompt and the negative prompt go through a streamed umT5 in one pass:
    each of its layers is read once per call, not once per text."""
    from wanlite.models import t5

    reads = []
    read = BlockStreamer._read

    def counted(self, i):
        if isinstance(self.blocks[i], t5.Block):
            reads.append(i)
        return read(self, i)

    monkeypatch.setattr(BlockStreamer, "_read", counted)
    pipe = wanlite.load(
        str(tiny_checkpoint), device="cpu", offload="blocks", linear="aten", embed_cache=False
    )
    pipe.generate(**KW, progress=False)  # guidance 5: the prompt and " " both encoded
    assert sorted(reads) == list(range(pipe.cfg.t5.num_layers))


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
    from wanlite.runtime import offload

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


def _linear_blocks(n=3):
    blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(n))
    weights = {
        f"blocks.{i}.{k}": p.detach().clone()
        for i, b in enumerate(blocks)
        for k, p in b.named_parameters()
    }
    return blocks, weights


@pytest.mark.parametrize("keep_blocks", [0, 1, 3])
def test_streamed_blocks_are_read_once_within_the_keep_budget(keep_blocks):
    """Host copies are kept up to ``keep_bytes``: a kept tensor is read (and LoRA-merged, and on
    CUDA pinned) once for all forwards; past the budget the rest is read again each forward."""
    blocks, weights = _linear_blocks()
    per_block = 4 * 4 * 4 + 4 * 4  # weight and bias, fp32
    x, expected = torch.randn(2, 4), None
    streamer = BlockStreamer(
        blocks, "blocks", weights.__getitem__, torch.device("cpu"), int(keep_blocks * per_block)
    )
    for _ in range(3):  # three forwards
        y = x
        for b in blocks:
            y = b(y)
        expected = y if expected is None else expected
        assert torch.equal(y, expected)
    streamer.pending[0].result()  # block 0, prefetched for a next forward
    kept = len(streamer.kept)
    streamer.close()
    assert kept == int(keep_blocks * 2)  # tensors that fit (weight before bias in each block)
    # 3 forwards of 6 tensors, kept ones read once; + block 0's unkept ones, prefetched again
    assert streamer.reads == kept + 3 * (6 - kept) + (2 - min(kept, 2))
    assert not streamer.kept  # dropped on close


def test_lora_blocks_are_merged_once_when_kept(tiny_checkpoint, tmp_path, monkeypatch):
    """A LoRA'd DiT with its blocks streamed: with a keep budget (CUDA's; none on the CPU)
    each block weight is merged once for all forwards, and the output is the same."""
    from safetensors.torch import save_file

    from wanlite.models.configs import read_model_config
    from wanlite.models.dit import to_diffusers_key
    from wanlite.options import Options
    from wanlite.runtime.lifecycle import components
    from wanlite.weights.lora import dit_shapes

    cfg = read_model_config(tiny_checkpoint)
    g, sd = torch.Generator().manual_seed(0), {}
    for name, shape in dit_shapes(cfg.dit).items():  # PEFT keys on every block linear
        if name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2:
            k = "transformer." + to_diffusers_key(name).removesuffix(".weight")
            sd[f"{k}.lora_A.weight"] = torch.randn(2, shape[1], generator=g)
            sd[f"{k}.lora_B.weight"] = torch.randn(shape[0], 2, generator=g) * 0.05
    save_file(sd, str(tmp_path / "l.safetensors"))
    opts = Options(lora=[(str(tmp_path / "l.safetensors"), 1.0)], cast_cache="off")
    x, t = torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0])
    ctx = torch.randn(1, 5, cfg.dit.text_dim)
    outs = []
    for keep in (0, 2**40):
        dit = components(tiny_checkpoint, cfg, opts, torch.device("cpu"), torch.float32)
        dit = dit["transformer"]
        merges = []

        def counted(n, *a, merges=merges, merged=dit.lora.merged):
            merges.append(n)
            return merged(n, *a)

        monkeypatch.setattr(dit.lora, "merged", counted)
        module = dit.acquire(stream_blocks=True)
        assert dit.streamer.keep_bytes == 0  # the CPU keeps nothing by default
        dit.streamer.keep_bytes = keep
        outs.append([module(x, t, ctx) for _ in range(3)])
        dit.streamer.pending[0].result()  # block 0, prefetched for a next forward
        dit.release()
        per_forward = len(sd) // 2  # block linears (2 blocks)
        assert len(merges) == (3 * per_forward + per_forward // 2 if keep == 0 else per_forward)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_to_device_packs_tensors_into_few_copies():
    """The batched host-to-device copy (``offload._batched``), run on the CPU unpinned: every
    tensor comes back equal, as a view of one of a few chunks, at aligned offsets; a tensor
    bigger than a chunk crosses alone."""
    from wanlite.runtime import offload

    g = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(100 + i, generator=g) for i in range(10)}  # ~400 B each
    state["big"] = torch.randn(2000, generator=g)  # 8 KB: over a chunk
    state["q"] = torch.randint(-128, 127, (33,), dtype=torch.int8, generator=g)
    state["h"] = torch.randn(3, 5, generator=g).to(torch.bfloat16).t()  # non-contiguous
    out = offload._batched(iter(state.items()), torch.device("cpu"), 2048, pin=False)
    assert list(out) == [n for n in state if n != "big"] + ["big"] or set(out) == set(state)
    for name, t in state.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t)
    chunks = {out[n].untyped_storage().data_ptr() for n in state if n != "big"}
    assert len(chunks) == 3  # 10 x ~420 B + 33 B + 30 B in 2 KiB chunks (256 B aligned)
    assert all(out[n].storage_offset() * out[n].element_size() % 256 == 0 for n in state)
    assert out["big"].untyped_storage().data_ptr() not in chunks
    # On the CPU nothing is copied at all.
    assert offload.to_device(iter(state.items()), torch.device("cpu"))["w0"] is state["w0"]


@pytest.mark.cuda
def test_cuda_batched_load_and_pinned_kept_blocks():
    """On a GPU: the batched load gives the same tensors, and streamed blocks are kept pinned
    (read once) with the same outputs as resident ones."""
    from wanlite.runtime.offload import to_device

    dev = torch.device("cuda")
    blocks, weights = _linear_blocks()
    moved = to_device(iter(weights.items()), dev, chunk_bytes=256)  # several chunks
    assert all(moved[k].is_cuda and torch.equal(moved[k].cpu(), w) for k, w in weights.items())
    x = torch.randn(2, 4)
    expected = x
    for b in blocks:
        expected = b(expected)
    streamer = BlockStreamer(blocks, "blocks", weights.__getitem__, dev, keep_bytes=2**20)
    for _ in range(2):
        y = x.to(dev)
        for b in blocks:
            y = b(y)
        torch.testing.assert_close(y.cpu(), expected)
    assert streamer.reads == 6 and all(t.is_pinned() for t in streamer.kept.values())
    streamer.close()


def test_model_offload_keeping_the_dit_reads_it_once(tiny_checkpoint, reference, monkeypatch):
    """ "model" with ``keep_dit`` (the planner's choice when the budget holds the DiT): the
    umT5 and the VAE are released after their phases, the DiT stays for the next call, and the
    video is the resident one's."""
    import dataclasses

    from wanlite.runtime import planner

    choose = planner.choose
    monkeypatch.setattr(
        planner,
        "choose",
        lambda *a, **k: dataclasses.replace(choose(*a, **k), offload="model", keep_dit=True),
    )
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", linear="aten", embed_cache=False)
    dit = pipe.components["transformer"]
    first = pipe.generate(**KW, progress=False)
    module, loads = dit.module, dit.load_seconds
    second = pipe.generate(**KW, progress=False)
    assert module is not None and dit.module is module and dit.load_seconds == loads
    assert pipe.components["text_encoder"].module is None and pipe.components["vae"].module is None
    assert torch.equal(first.latents, reference.latents) and torch.equal(
        second.latents, first.latents
    )
