import os

import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter. Triton reads
# this variable when a kernel (or one of its own helpers, at `import triton`) is
# decorated, so it must be set before anything imports triton: here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests run a bounded number of examples without per-example deadlines:
# first calls into torch are slow, and CI runs on 2 cores.
settings.register_profile("default", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
