"""Checkpoints on disk: reading (``load``), writing (``save``), and converters from foreign layouts (``convert``).

This tier knows files and key names, not model classes: ``models.registry`` builds
the model a checkpoint describes (``lnlm_ssm.from_pretrained``).
"""

from lnlm_ssm.checkpoint.load import CheckpointError, read_checkpoint
from lnlm_ssm.checkpoint.save import save_pretrained

__all__ = ["CheckpointError", "read_checkpoint", "save_pretrained"]
