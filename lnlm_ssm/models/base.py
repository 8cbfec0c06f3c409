"""``PretrainedModel``: what every model family shares — saving, loading, and its place in the registry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Union

import torch
from torch import nn

from lnlm_ssm.checkpoint.save import save_pretrained
from lnlm_ssm.models import registry


class PretrainedModel(nn.Module):
    """Base class of the model families.

    A subclass sets ``architecture`` (the name config.json records and the
    registry knows it by) and ``main_weight`` (the weight whose stored dtype a
    loaded model is built in), keeps its config as ``self.config`` (with
    ``to_dict``/``from_dict``), takes ``(config, *, device=None, dtype=None)``,
    and registers itself with ``models.registry.register``.
    """

    architecture: ClassVar[str]
    main_weight: ClassVar[str]
    # "int8" or "bf16" once lnlm_ssm.quantize_ has quantised the model's weights (saved with them).
    quantization: Optional[str] = None

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: Union[str, os.PathLike],
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        strict: bool = True,
    ):
        """This family's model from a checkpoint in our layout or any foreign layout it registered.

        A directory, or a hub repo id when huggingface_hub is installed; see
        ``models.registry.from_pretrained``. A checkpoint of another family is
        an error (``lnlm_ssm.from_pretrained`` builds whatever a checkpoint holds).
        """
        return registry.from_pretrained(path_or_repo_id, device=device, dtype=dtype, strict=strict, expect=cls)

    def save_pretrained(self, directory: Union[str, os.PathLike], *, card: Optional[Mapping[str, Any]] = None) -> Path:
        """Write config.json, the weights and a model card (README.md, with the facts ``card`` gives), atomically;
        returns the directory. See ``checkpoint.save``."""
        return save_pretrained(self, directory, card=card)

    def tied_weights(self) -> dict[str, str]:
        """``{name: name it is tied to}`` for the weights stored once (none by default)."""
        return {}
