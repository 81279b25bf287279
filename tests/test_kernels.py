"""Tests for ``wanlite.kernels`` (the repository's top-level ``kernels/``).

The Triton kernel runs under ``TRITON_INTERPRET=1`` on the CPU (no GPU needed; triton is in
the test extra, so these run in CI), against the torch reference on tiny shapes; the
reference itself is checked against SDPA with the token mask.  Timing on a GPU is
scripts/gpu_check.py's (``kernel_timings``).
"""

import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit runs: kernels run in the interpreter
if sys.platform == "linux":  # the test extra installs triton there: never skip in CI
    import triton  # noqa: F401
else:
    pytest.importorskip("triton")

from wanlite.kernels import block_sparse, reference  # noqa: E402
from wanlite.ops import radial  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _interpreted():
    """block_sparse with its kernel in the interpreter (reloaded if imported before the env)."""
    if type(block_sparse._forward).__name__ != "InterpretedFunction":
        import importlib

        importlib.reload(block_sparse)
    assert type(block_sparse._forward).__name__ == "InterpretedFunction"
    return block_sparse


def random_mask(nq: int, nk: int, seed: int, density: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(nq, nk, generator=g) < density
    mask[torch.arange(nq), torch.arange(nq) % nk] = True  # every query block keeps one
    return mask


def qkv(b, h, length, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, length, h, d, generator=g).to(dtype).transpose(1, 2) for _ in range(3)]


def test_block_lists_round_trip():
    mask = random_mask(7, 7, 1)
    idx, cnt = reference.block_lists(mask)
    assert idx.dtype == cnt.dtype == torch.int32 and idx.shape == (7, int(cnt.max()))
    assert torch.equal(cnt, mask.sum(-1).int())
    for m in range(7):  # ascending kept columns, then zero padding
        assert torch.equal(idx[m, : cnt[m]].long(), mask[m].nonzero().flatten())
        assert not idx[m, cnt[m] :].any()
    assert torch.equal(reference.lists_to_mask(idx, cnt, 7), mask)
    per_head = torch.stack([random_mask(5, 5, s) for s in range(6)]).view(2, 3, 5, 5)
    assert torch.equal(reference.lists_to_mask(*reference.block_lists(per_head), 5), per_head)


def test_reference_equals_sdpa_under_the_token_mask():
    block, length = 8, 45  # a partial last block
    mask = random_mask(6, 6, 2)
    q, k, v = qkv(2, 3, length, 16)
    ref = reference.block_sparse_attention(q, k, v, *reference.block_lists(mask), block)
    tok = radial.token_mask(mask, length, block)
    torch.testing.assert_close(ref, F.scaled_dot_product_attention(q, k, v, attn_mask=tok))


# (length, block, block_m, block_n): one tile per block, several tiles per block (query and
# key), sequence ends inside a block and inside a tile.
CASES = [(64, 16, 16, 16), (70, 32, 16, 16), (50, 32, 32, 16), (33, 16, 16, 16)]


@pytest.mark.parametrize("length,block,block_m,block_n", CASES)
def test_triton_kernel_equals_the_reference(length, block, block_m, block_n):
    bs = _interpreted()
    nb = math.ceil(length / block)
    mask = random_mask(nb, nb, length)
    q, k, v = qkv(1, 2, length, 16, seed=length)
    idx, cnt = reference.block_lists(mask)
    out = bs.attention(q, k, v, idx, cnt, block, block_m=block_m, block_n=block_n)
    torch.testing.assert_close(out, reference.block_sparse_attention(q, k, v, idx, cnt, block),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_triton_kernel_per_head_lists_and_full_mask():
    bs = _interpreted()
    length, block = 48, 16
    q, k, v = qkv(2, 2, length, 16, seed=3)
    masks = torch.stack([random_mask(3, 3, s, 0.3) for s in range(4)]).view(2, 2, 3, 3)
    idx, cnt = reference.block_lists(masks)  # VSA-style: a different selection per head
    out = bs.attention(q, k, v, idx, cnt, block, block_m=16, block_n=16)
    torch.testing.assert_close(out, reference.block_sparse_attention(q, k, v, idx, cnt, block),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    full = torch.ones(3, 3, dtype=torch.bool)  # all blocks kept: dense attention
    out = bs.attention(q, k, v, *reference.block_lists(full), block, block_m=16, block_n=16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_triton_kernel_runs_the_radial_mask():
    bs = _interpreted()
    grid, block = (5, 4, 5), 16  # 100 tokens, 7 blocks
    mask = radial.grid_mask(grid, 0.2, block)
    assert not mask.all()
    q, k, v = qkv(1, 2, 100, 16, seed=4)
    fn = bs.function(mask, block)
    torch.testing.assert_close(fn(q, k, v), radial.sparse_attention(q, k, v, mask, block),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_kernel_input_errors():
    bs = _interpreted()
    q, k, v = qkv(1, 1, 32, 16)
    idx, cnt = reference.block_lists(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="divide"):
        bs.attention(q, k, v, idx, cnt, 16, block_m=32)
    with pytest.raises(ValueError, match="query blocks"):
        bs.attention(q, k, v, idx, cnt, 8)
    q12, k12, v12 = qkv(1, 1, 32, 12)
    with pytest.raises(ValueError, match="power of two"):
        bs.attention(q12, k12, v12, idx, cnt, 16)


def test_kernels_folder_is_wanlite_kernels_and_never_shadows_pypi_kernels():
    # kernels/ has no __init__.py: from the repository root a top-level ``import kernels``
    # finds the PyPI package (transformers imports it when installed), not this folder.
    assert not (REPO / "kernels" / "__init__.py").exists()
    link = REPO / "wanlite" / "kernels"
    assert link.is_symlink() and link.resolve() == (REPO / "kernels").resolve()
    code = "import kernels, wanlite.kernels.block_sparse; print(getattr(kernels, '__file__', 0))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(REPO / "kernels") not in out.stdout


def test_wheel_ships_the_kernels_as_wanlite_kernels(tmp_path):
    # Built from a copy (the build writes build/ and egg-info beside the sources), links kept.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("wanlite", "kernels"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
           "-w", str(tmp_path / "dist"), str(src)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("wanlite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"wanlite/kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")}
    assert shipped and shipped <= names
    assert not any(n.startswith("kernels/") for n in names)
