"""Objectives: the causal-LM objective is the model's own loss, evaluated in bits per byte; names are checked."""

import math

import pytest
import torch

from lnlm_ssm.models import MambaLM
from lnlm_ssm.objectives import OBJECTIVES, CausalLMObjective, get_objective
from lnlm_ssm.training import TrainConfig, TrainConfigError


def test_causal_lm_objective_is_the_next_token_loss():
    model = MambaLM.from_name("mamba-tiny", n_layer=2)
    batch = torch.randint(0, 257, (2, 16))
    out = get_objective("clm")(model, batch)
    logits = model(batch).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.backbone.embedding.weight.grad is not None


def test_causal_lm_eval_metrics_are_loss_and_bits_per_byte():
    metrics = CausalLMObjective().eval_metrics(math.log(2) * 3.0, bytes_per_token=1.5)
    assert metrics["eval_loss"] == pytest.approx(math.log(2) * 3.0)
    assert metrics["eval_bpb"] == pytest.approx(2.0)


def test_unknown_objective_names_the_choices():
    choices = (
        r"\('clm', 'mlm', 'sop', 'electra', 'plm', 'span', 'seq2seq', 'classify', 'token-classify', 'sft', "
        r"'reward', 'dpo'\)"
    )
    with pytest.raises(ValueError, match=rf"objective must be one of {choices}, got 'ul2'"):
        get_objective("ul2")
    with pytest.raises(TrainConfigError, match="objective must be one of"):
        TrainConfig(objective="ul2")
    assert set(OBJECTIVES) == {
        "clm", "mlm", "sop", "electra", "plm", "span", "seq2seq", "classify", "token-classify", "sft", "reward", "dpo"
    }
    assert TrainConfig().objective == "clm"
