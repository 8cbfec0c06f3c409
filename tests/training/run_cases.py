"""What the training tests share: stopping a run the way a kill would."""

import pytest

from lnlm_ssm.training import loop, train


class Killed(Exception):
    pass


def train_until_killed(monkeypatch, config, kill_before_step):
    """Run ``config`` and stop it as a kill would, just before 0-based step ``kill_before_step``."""
    real = loop.lr_at

    def lr_at(step, cfg):
        if step == kill_before_step:
            raise Killed
        return real(step, cfg)

    with monkeypatch.context() as m:
        m.setattr(loop, "lr_at", lr_at)
        with pytest.raises(Killed):
            train(config)
