"""Training: the loop (``loop``, which takes an Objective), its settings (``config``), resumable state
(``state``), logs (``metrics``), data parallelism (``distributed``) and sweeps sharing a corpus (``sweep``)."""

from lnlm_ssm.training.config import TrainConfig, TrainConfigError
from lnlm_ssm.training.distributed import DistInfo, full_state_dicts, load_full_state_dicts, wrap_model
from lnlm_ssm.training.loop import train
from lnlm_ssm.training.state import TrainCheckpointError

__all__ = [
    "DistInfo",
    "TrainCheckpointError",
    "TrainConfig",
    "TrainConfigError",
    "full_state_dicts",
    "load_full_state_dicts",
    "train",
    "wrap_model",
]
