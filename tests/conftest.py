import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Keep the test cache out of the user's home unless CI (or the user) chose one.
os.environ.setdefault("WANLITE_CACHE", os.path.join(tempfile.gettempdir(), "wanlite-test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU, Triton kernels run in Triton's interpreter.  Set before anything imports triton
# (torch.compile does): triton.language's own jit functions are made for the interpreter only
# if it is on when triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint():
    from wanlite.weights.random_checkpoint import ensure_random_checkpoint

    return ensure_random_checkpoint("tiny")


# Tests that need a GPU carry ``@pytest.mark.cuda`` (registered in pyproject.toml); here they are
# skipped with one reason, and ``scripts/gpu_check.py`` lists and runs them on a GPU.
CUDA_SKIP_REASON = "needs a CUDA device"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_checkpoint):
    from wanlite import Options
    from wanlite.pipeline import Pipeline

    return Pipeline(tiny_checkpoint, Options(device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_checkpoint):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)


def _torchrun(script: str, args: list[str], world: int, timeout: float = 600) -> None:
    """Run ``script args`` under ``torch.distributed.run`` with ``world`` local ranks (one thread
    each, a free port); fail with the tail of its output if a rank fails.  The ranks share the
    launcher's session, so they are killed with it whatever happens."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
    cmd += ["--standalone", script, *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]


@pytest.fixture(scope="session")
def torchrun():
    """``torchrun(script, args, world)``: run a script under torch.distributed (``_torchrun``)."""
    return _torchrun
