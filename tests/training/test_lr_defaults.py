"""The learning rate a run gets when it names none: the objective's (smaller for fine-tuning), min_lr a tenth."""

import pytest

from lnlm_ssm.objectives import OBJECTIVES, FinetuneObjective, Objective
from lnlm_ssm.training.config import TrainConfig


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_each_objective_has_its_default_lr(objective):
    finetune = issubclass(OBJECTIVES[objective], FinetuneObjective)
    extra = {"init_from": "base", "data": "rows.jsonl"} if finetune else {}
    config = TrainConfig(objective=objective, **extra)
    assert config.lr == (FinetuneObjective.default_lr if finetune else Objective.default_lr)
    assert config.min_lr == pytest.approx(config.lr / 10)
    assert TrainConfig(**config.to_dict()) == config


def test_fine_tuning_steps_are_smaller_and_given_values_win():
    assert FinetuneObjective.default_lr < Objective.default_lr == 3e-3
    assert TrainConfig().min_lr == pytest.approx(3e-4)
    config = TrainConfig(objective="classify", init_from="base", data="rows.jsonl", lr=2e-4)
    assert (config.lr, config.min_lr) == (2e-4, pytest.approx(2e-5))
    assert TrainConfig(lr=1e-2, min_lr=0.0).min_lr == 0.0
