"""TensorStore: plain reads, casts through the memory map, and in-place views, all equal."""

import torch
from safetensors.torch import save_file

from wanlite.runtime.memory import cpu_current_bytes
from wanlite.weights.tensorstore import TensorStore


def _store(tmp_path, tensors):
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return TensorStore([path])


def test_reads_casts_and_views_agree(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(7, 5, generator=g),
        "b": torch.randn(3, generator=g).bfloat16(),
        "q": torch.randint(-127, 127, (4, 4), generator=g, dtype=torch.int8),
        "empty": torch.zeros(0, 3),
    }
    store = _store(tmp_path, tensors)
    for k, t in tensors.items():
        assert torch.equal(store.get(k), t) and torch.equal(store.view(k), t)
    assert torch.equal(store.get("a", torch.bfloat16), tensors["a"].bfloat16())
    assert torch.equal(store.get("b", torch.float32), tensors["b"].float())
    assert store.get("q", torch.bfloat16).dtype == torch.int8  # quantized: never cast here
    store.close()


def test_cast_while_reading_leaves_no_mapped_pages(tmp_path):
    """A cast through the memory map drops the mapped range after: the process keeps only the
    cast tensor (bf16, half of the fp32 bytes), not the fp32 pages it read."""
    big = torch.randn(64 * 2**20 // 4)  # 64 MiB fp32
    store = _store(tmp_path, {"w": big})
    before = cpu_current_bytes()
    out = store.get("w", torch.bfloat16)
    grown = cpu_current_bytes() - before
    assert torch.equal(out, big.bfloat16())
    assert grown < 48 * 2**20, grown  # the 32 MiB result, not 32 + 64 MiB
    view = store.view("w")
    view.sum()  # touching the view maps the file pages in place: no copy is made
    assert view.data_ptr() != out.data_ptr()
    del view
    store.close()
