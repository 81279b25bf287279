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


@pytest.fixture(scope="session")
def tiny_pipe(tiny_checkpoint):
    from wanlite import Options
    from wanlite.pipeline import Pipeline

    return Pipeline(tiny_checkpoint, Options(device="cpu"))


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_checkpoint):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
