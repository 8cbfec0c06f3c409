import os

import pytest
import torch
from hypothesis import settings

# Property tests run a bounded number of examples without per-example deadlines:
# first calls into torch are slow, and CI runs on 2 cores.
settings.register_profile("default", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
