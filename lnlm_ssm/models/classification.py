"""Task heads on a pretrained backbone: ``SequenceClassifier`` (one label per text) and ``TokenClassifier``
(one label per token), HF's ``*ForSequenceClassification`` / ``*ForTokenClassification``.

Parameter names::

    backbone.*          the backbone family's (``BACKBONES``): a MambaLM's, so its weights load as they are
    score.weight/bias   (num_labels, d_model): the new head

``from_pretrained`` (of either) reads a checkpoint of its own class, or any
checkpoint of a backbone family (ours, mamba_ssm, HF), whose LM head it drops for
a new, randomly initialised ``score``. The config stores ``id2label`` and
``label2id`` as HF does: ``{"0": "neg"}`` and ``{"neg": 0}`` in config.json.

Pooling (sequence classification) takes one vector per row from the hidden states:

- ``mean``: the mean over the real tokens, the default: on SSM stacks it trains far
  better than ``last`` (``benchmarks/finetune_quality.py``'s 6-package snippet task, a
  2-layer d_model 64 Mamba pretrained 150 steps, then 150 steps at lr 1e-3: held-out
  accuracy 0.30 with mean, 0.18 with last, chance 0.17; an earlier trial on a
  1M-parameter Mamba, 200 steps: 0.71 and 0.23);
- ``last``: the last real token, HF's convention for decoder-only models;
- ``first``: the first real token, the [CLS] of encoders.

``problem_type`` is inferred on the first forward with labels, as HF does:
``regression`` for ``num_labels == 1``, ``single_label_classification`` for
integer labels, ``multi_label_classification`` for float labels (one 0/1 column
per label); it is then kept in the config.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.checkpoint.load import CheckpointError
from lnlm_ssm.layers.quantized import quantization_of
from lnlm_ssm.models import registry
from lnlm_ssm.models.backbone import Backbone
from lnlm_ssm.models.base import PretrainedModel
from lnlm_ssm.models.config import ConfigError, MambaLMConfig
from lnlm_ssm.models.heads import IGNORE_INDEX
from lnlm_ssm.utils.dtypes import math_dtype

__all__ = ["ClassifierConfig", "ClassifierOutput", "SequenceClassifier", "TokenClassifier"]

logger = logging.getLogger(__name__)

# The families a head can sit on: architecture -> its config class. An encoder family adds itself here with
# a backbone module of the same call signature (embedding + ``backbone(hidden, None, mask, position_ids)``).
BACKBONES: dict[str, type] = {"MambaLM": MambaLMConfig}
POOLINGS = ("mean", "last", "first")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclass
class ClassifierConfig:
    """A head's config: the backbone's config fields, the labels, the pooling and the problem type."""

    backbone: dict[str, Any] = field(default_factory=dict)
    backbone_architecture: str = "MambaLM"
    num_labels: int = 2
    id2label: dict[str, str] = field(default_factory=dict)
    label2id: dict[str, int] = field(default_factory=dict)
    pooling: str = "mean"
    problem_type: Optional[str] = None

    def __post_init__(self) -> None:
        if self.backbone_architecture not in BACKBONES:
            raise ConfigError(
                f"backbone_architecture must be one of {sorted(BACKBONES)}; got {self.backbone_architecture!r}"
            )
        if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 1:
            raise ConfigError(f"num_labels must be an int >= 1; got {self.num_labels!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}; got {self.pooling!r}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"problem_type must be one of {PROBLEM_TYPES} or None; got {self.problem_type!r}")
        # JSON keys are strings: id2label is stored {"0": name}, as HF's config.json stores it.
        if not self.id2label:
            self.id2label = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        self.id2label = {str(k): str(v) for k, v in self.id2label.items()}
        if sorted(self.id2label, key=int) != [str(i) for i in range(self.num_labels)]:
            raise ConfigError(
                f"id2label must name the ids 0..{self.num_labels - 1} (num_labels={self.num_labels}); "
                f"got ids {sorted(self.id2label)}"
            )
        if not self.label2id:
            self.label2id = {name: int(i) for i, name in self.id2label.items()}
        self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
        self.backbone_config()  # validates the backbone's fields

    def backbone_config(self):
        return BACKBONES[self.backbone_architecture].from_dict(self.backbone)

    @property
    def d_model(self) -> int:
        return self.backbone["d_model"]

    @property
    def vocab_size(self) -> int:
        return self.backbone["vocab_size"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassifierConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ClassifierConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


@dataclass
class ClassifierOutput:
    """``logits``: (batch, num_labels) or, per token, (batch, seqlen, num_labels); ``loss`` when labels were given."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


class _Classifier(PretrainedModel):
    """A backbone and a linear ``score`` head; subclasses pick the positions it scores and the loss."""

    main_weight = "backbone.embedding.weight"

    def __init__(self, config: ClassifierConfig, *, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise TypeError(f"config must be a ClassifierConfig; got {type(config).__name__}")
        self.config = config
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        backbone_config = config.backbone_config()
        self.backbone = Backbone(backbone_config, factory=factory, backend=backend)
        self.score = nn.Linear(config.d_model, config.num_labels, **factory)
        self._has_attention = "Attention" in backbone_config.layer_types()
        with torch.no_grad():
            nn.init.normal_(self.score.weight, std=0.02)
            nn.init.zeros_(self.score.bias)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *, device=None, dtype=None, strict: bool = True, **head: Any):
        """A classifier from a checkpoint of one (``head`` must then agree with it), or a new head on the
        backbone of any checkpoint of a family in ``BACKBONES`` (ours, mamba_ssm, HF), dropping its LM head.

        ``head``: ClassifierConfig fields (num_labels, id2label, label2id, pooling, problem_type).
        """
        unknown = sorted(set(head) - {"num_labels", "id2label", "label2id", "pooling", "problem_type"})
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unknown head arguments {unknown}")
        model = registry.from_pretrained(path_or_repo_id, device=device, dtype=dtype, strict=strict)
        if isinstance(model, _Classifier):
            if not isinstance(model, cls):
                raise CheckpointError(
                    f"{str(path_or_repo_id)!r} holds a {model.architecture}, not a {cls.__name__}: load it with "
                    f"{model.architecture}.from_pretrained"
                )
            stored = model.config.to_dict()
            # id2label's ids may be ints, as in HF's Python configs; config.json's are strings.
            asked = {k: {str(i): n for i, n in v.items()} if k == "id2label" else v for k, v in head.items()}
            differ = {k: (stored[k], v) for k, v in asked.items() if stored[k] != v}
            if differ:
                raise CheckpointError(
                    f"{str(path_or_repo_id)!r} holds a {cls.__name__} whose head differs from the one asked for; "
                    f"fields (checkpoint, asked): {differ}"
                )
            return model
        if model.architecture not in BACKBONES:
            raise CheckpointError(
                f"{str(path_or_repo_id)!r} holds a {model.architecture}, which has no backbone a "
                f"{cls.__name__} can use; backbones: {sorted(BACKBONES)}"
            )
        if quantization_of(model) is not None:
            raise CheckpointError(
                f"{str(path_or_repo_id)!r} holds a model quantised to {quantization_of(model)} for inference: put "
                "a head on the unquantised weights"
            )
        config = ClassifierConfig(backbone=model.config.to_dict(), backbone_architecture=model.architecture, **head)
        weight = model.backbone.embedding.weight
        classifier = cls(config, device=weight.device, dtype=weight.dtype)
        classifier.backbone.load_state_dict(model.backbone.state_dict())
        logger.warning(
            "%s: a new head (score.weight, score.bias; %d labels) on the backbone of %s, its LM head dropped: "
            "train it before use",
            cls.__name__, config.num_labels, path_or_repo_id,
        )
        return classifier

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The backbone's output (batch, seqlen, d_model) of ``input_ids``; ``attention_mask``: 1 real, 0 pad."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a tensor of shape (batch, seqlen >= 1); got {input_ids!r}")
        mask = position_ids = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}; "
                    f"got {getattr(attention_mask, 'shape', attention_mask)!r}"
                )
            mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
            if self._has_attention:
                position_ids = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
        hidden = self.backbone.embedding(input_ids)
        return self.backbone(hidden, None, mask, position_ids)

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden)


class SequenceClassifier(_Classifier):
    """One label (or value) per sequence: ``forward(input_ids, attention_mask=None, labels=None)``.

    ``labels`` (batch,) int for single-label classification or regression with
    ``num_labels == 1``; (batch, num_labels) float for multi-label classification
    or multi-output regression. The loss is HF's: MSE, cross entropy, or binary
    cross entropy with logits.
    """

    architecture = "SequenceClassifier"

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> ClassifierOutput:
        hidden = self.hidden_states(input_ids, attention_mask)
        logits = self._scores(pool(hidden, attention_mask, self.config.pooling))
        loss = None if labels is None else self._loss(logits, labels)
        return ClassifierOutput(logits=logits, loss=loss)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        config = self.config
        if config.problem_type is None:
            if config.num_labels == 1:
                config.problem_type = "regression"
            elif not labels.dtype.is_floating_point:
                config.problem_type = "single_label_classification"
            else:
                config.problem_type = "multi_label_classification"
        labels = labels.to(logits.device)
        logits = logits.to(math_dtype(logits.dtype))
        if config.problem_type == "regression":
            if config.num_labels == 1:
                return F.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if config.problem_type == "single_label_classification":
            if labels.shape != logits.shape[:1] or labels.dtype.is_floating_point:
                raise ValueError(
                    f"single-label classification takes integer labels of shape (batch,) = {tuple(logits.shape[:1])}; "
                    f"got {labels.dtype} of shape {tuple(labels.shape)}"
                )
            return F.cross_entropy(logits, labels.long())
        if labels.shape != logits.shape:
            raise ValueError(
                f"multi-label classification takes 0/1 labels of shape (batch, num_labels) = {tuple(logits.shape)}; "
                f"got {tuple(labels.shape)}"
            )
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class TokenClassifier(_Classifier):
    """One label per token: ``forward(input_ids, attention_mask=None, labels=None)``; ``labels`` (batch, seqlen)
    int, -100 (and padding) ignored; the loss is the mean cross entropy of the others."""

    architecture = "TokenClassifier"

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> ClassifierOutput:
        logits = self._scores(self.hidden_states(input_ids, attention_mask))
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(labels.shape)}"
                )
            labels = labels.to(logits.device).long()
            if attention_mask is not None:
                labels = labels.masked_fill(~attention_mask.to(labels.device, torch.bool), IGNORE_INDEX)
            loss = F.cross_entropy(
                logits.flatten(0, 1).to(math_dtype(logits.dtype)), labels.flatten(), ignore_index=IGNORE_INDEX
            )
        return ClassifierOutput(logits=logits, loss=loss)


def pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], pooling: str) -> torch.Tensor:
    """One vector per row (batch, d_model) of ``hidden`` (batch, seqlen, d_model): see the module docstring."""
    batch, seqlen, _ = hidden.shape
    if attention_mask is None:
        mask = torch.ones(batch, seqlen, dtype=torch.bool, device=hidden.device)
    else:
        mask = attention_mask.to(device=hidden.device, dtype=torch.bool)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row of attention_mask must mark at least one real token")
    if pooling == "mean":
        weights = mask.to(hidden.dtype)
        return (hidden * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
    positions = torch.arange(seqlen, device=hidden.device).expand(batch, seqlen)
    if pooling == "last":
        index = torch.where(mask, positions, -1).amax(dim=1)
    else:
        index = torch.where(mask, positions, seqlen).amin(dim=1)
    return hidden[torch.arange(batch, device=hidden.device), index]


registry.register(SequenceClassifier, ClassifierConfig)
registry.register(TokenClassifier, ClassifierConfig)

