"""Checkpoints written by the version before the model library (commit 4439f4f) load, and give its logits.

``tests/fixtures/legacy/<preset>/`` holds what that version's ``save_pretrained``
wrote and the logits it computed (``expected.safetensors``; see ``make.py`` there).
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lnlm_ssm
from lnlm_ssm import MambaLM
from lnlm_ssm.models import preset
from lnlm_ssm.ops import available_backends
from lnlm_ssm.utils.testing import assert_close

FIXTURES = Path(__file__).parents[1] / "fixtures" / "legacy"
PRESETS = ("mamba-tiny", "mamba2-tiny", "hybrid-tiny", "gpt-tiny")


@pytest.mark.parametrize("name", PRESETS)
def test_legacy_checkpoint_loads_bit_exact(name):
    directory = FIXTURES / name
    model = lnlm_ssm.from_pretrained(directory)
    assert type(model) is MambaLM
    assert model.config == preset(name)
    stored = load_file(directory / "model.safetensors")
    state = model.state_dict()
    assert set(stored) <= set(state) and set(state) - set(stored) <= {"lm_head.weight"}
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", PRESETS)
def test_legacy_checkpoint_gives_the_old_logits(name, backend):
    if backend not in available_backends():
        pytest.skip(f"backend {backend!r} is not built here")
    directory = FIXTURES / name
    expected = load_file(directory / "expected.safetensors")
    loaded = MambaLM.from_pretrained(directory)
    model = MambaLM(loaded.config, backend=backend).eval()
    model.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        logits = model(expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    assert_close(logits, expected[f"logits_{backend}"], torch.float32, msg=f"{name} on {backend}")
