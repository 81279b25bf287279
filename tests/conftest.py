import os
import tempfile

import pytest
import torch

# Keep the test cache out of the user's home unless CI (or the user) chose one.
os.environ.setdefault("WANLITE_CACHE", os.path.join(tempfile.gettempdir(), "wanlite-test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_checkpoint():
    from wanlite.random_checkpoint import ensure_random_checkpoint

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
