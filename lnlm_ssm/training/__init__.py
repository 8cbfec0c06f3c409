"""Training: the data pipeline (corpus preparation and window sampling) and the training loop."""

from lnlm_ssm.training.checkpoint import TrainCheckpointError
from lnlm_ssm.training.config import TrainConfig, TrainConfigError
from lnlm_ssm.training.data import AminoAcidTokenizer, Corpus, WindowSampler, default_corpus_dir, prepare_corpus
from lnlm_ssm.training.distributed import DistInfo, full_state_dicts, load_full_state_dicts, wrap_model
from lnlm_ssm.training.loop import train

__all__ = [
    "AminoAcidTokenizer",
    "Corpus",
    "DistInfo",
    "TrainCheckpointError",
    "TrainConfig",
    "TrainConfigError",
    "WindowSampler",
    "default_corpus_dir",
    "full_state_dicts",
    "load_full_state_dicts",
    "prepare_corpus",
    "train",
    "wrap_model",
]
