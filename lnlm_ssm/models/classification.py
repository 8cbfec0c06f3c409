"""Task heads on a pretrained backbone: ``SequenceClassifier`` (one label per text) and ``TokenClassifier``
(one label per token), HF's ``*ForSequenceClassification`` / ``*ForTokenClassification``.

Parameter names::

    backbone.*          the backbone family's (``BACKBONES``): a MambaLM's ``backbone`` or an ``Encoder``,
                        so its weights load as they are
    pooler.dense.*      (d_model, d_model), with ``pooler``: BERT's pooler, RoBERTa's ``classifier.dense``
    score.weight/bias   (num_labels, d_model): the new head

``from_pretrained`` (of either) reads a checkpoint of its own class (ours, or HF
``BertForSequenceClassification``, ``RobertaForSequenceClassification``,
``AlbertForSequenceClassification``, ``ElectraForSequenceClassification``,
``BertForTokenClassification``, ``RobertaForTokenClassification``,
``AlbertForTokenClassification``, ``ElectraForTokenClassification``), or any
checkpoint of a backbone family (ours, mamba_ssm, HF: a causal LM, or an encoder
of any of its pre-training models), whose pre-training head it drops for a new,
randomly initialised ``score`` (and ``pooler``, unless the checkpoint has BERT's).
The config stores ``id2label`` and ``label2id`` as HF does: ``{"0": "neg"}`` and
``{"neg": 0}`` in config.json.

Pooling (sequence classification) takes one vector per row from the hidden states:

- ``mean``: the mean over the real tokens, the default: on SSM stacks it trains far
  better than ``last`` (``benchmarks/finetune_quality.py``'s 6-package snippet task, a
  2-layer d_model 64 Mamba pretrained 150 steps, then 150 steps at lr 1e-3: held-out
  accuracy 0.30 with mean, 0.18 with last, chance 0.17; an earlier trial on a
  1M-parameter Mamba, 200 steps: 0.71 and 0.23);
- ``last``: the last real token, HF's convention for decoder-only models;
- ``first``: the first real token, the [CLS] of encoders; their default.

``pooler`` (sequence classification): ``tanh(dense(pooled))`` before ``score``,
BERT's pooler and RoBERTa's classification head, both on the first token; the
default on encoders (so their HF checkpoints map exactly), not on causal stacks.
An encoder's head also has its dropout (``hidden_dropout``) before ``score``, as HF's.

``problem_type`` is inferred on the first forward with labels, as HF does:
``regression`` for ``num_labels == 1``, ``single_label_classification`` for
integer labels, ``multi_label_classification`` for float labels (one 0/1 column
per label); it is then kept in the config.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.checkpoint.convert import hf_albert, hf_bert, hf_electra, hf_roberta
from lnlm_ssm.checkpoint.load import CheckpointError
from lnlm_ssm.layers.attention import Attention
from lnlm_ssm.layers.quantized import quantization_of
from lnlm_ssm.models import registry
from lnlm_ssm.models.backbone import Backbone
from lnlm_ssm.models.base import PretrainedModel
from lnlm_ssm.models.config import ConfigError, EncoderConfig, MambaLMConfig
from lnlm_ssm.models.encoder import Encoder
from lnlm_ssm.models.heads import IGNORE_INDEX
from lnlm_ssm.utils.dtypes import math_dtype

__all__ = ["ClassifierConfig", "ClassifierOutput", "SequenceClassifier", "TokenClassifier"]

logger = logging.getLogger(__name__)


def _causal_hidden(backbone: Backbone, input_ids: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    # Attention layers number the positions of a right-padded row from its first real token.
    position_ids = None
    if mask is not None and any(isinstance(layer.mixer, Attention) for layer in backbone.layers):
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
    return backbone(backbone.embedding(input_ids), None, mask, position_ids)


def _encoder_hidden(encoder: Encoder, input_ids: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return encoder(input_ids, mask).last_hidden_state


@dataclass(frozen=True)
class BackboneFamily:
    """What a head needs of a backbone family.

    - ``config_class``: its config; ``build(config, factory, backend)``: the backbone module;
    - ``hidden(backbone, input_ids, mask)``: its last hidden states (batch, seqlen, d_model), mask bool or None;
    - ``sources``: architecture -> (backbone module, its config) of a model of it (what a new head goes on);
    - ``pooling``, ``pooler``: the head defaults; ``framed``: its inputs are ``[CLS] text [SEP]``, as in pre-training.
    """

    config_class: type
    build: Callable[[Any, dict, str], nn.Module]
    hidden: Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
    sources: dict[str, Callable[[nn.Module], tuple[nn.Module, Any]]]
    pooling: str
    pooler: bool
    framed: bool


# The families a head can sit on, by backbone_architecture.
BACKBONES: dict[str, BackboneFamily] = {
    "MambaLM": BackboneFamily(
        MambaLMConfig,
        lambda config, factory, backend: Backbone(config, factory=factory, backend=backend),
        _causal_hidden,
        {"MambaLM": lambda model: (model.backbone, model.config)},
        pooling="mean", pooler=False, framed=False,
    ),
    "Encoder": BackboneFamily(
        EncoderConfig,
        lambda config, factory, backend: Encoder(config, backend=backend, pooler=False, **factory),
        _encoder_hidden,
        {
            "Encoder": lambda model: (model, model.config),
            "MaskedLM": lambda model: (model.encoder, model.config),
            "SentenceOrderMaskedLM": lambda model: (model.encoder, model.config),
            "ReplacedTokenDetector": lambda model: (model.encoder, model.config),
            "ElectraPretraining": lambda model: (model.discriminator.encoder, model.config.discriminator),
        },
        pooling="first", pooler=True, framed=True,
    ),
}
POOLINGS = ("mean", "last", "first")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# The pooler's activation: BERT's, RoBERTa's and ALBERT's tanh; ELECTRA's classification head's GELU.
POOLER_ACTIVATIONS = {"tanh": torch.tanh, "gelu": F.gelu}


@dataclass
class ClassifierConfig:
    """A head's config: the backbone's config fields, the labels, the pooling (and pooler) and the problem type."""

    backbone: dict[str, Any] = field(default_factory=dict)
    backbone_architecture: str = "MambaLM"
    num_labels: int = 2
    id2label: dict[str, str] = field(default_factory=dict)
    label2id: dict[str, int] = field(default_factory=dict)
    pooling: Optional[str] = None  # None: the backbone family's default
    pooler: Optional[bool] = None  # None: the backbone family's default
    problem_type: Optional[str] = None
    pooler_act: str = "tanh"

    def __post_init__(self) -> None:
        if self.backbone_architecture not in BACKBONES:
            raise ConfigError(
                f"backbone_architecture must be one of {sorted(BACKBONES)}; got {self.backbone_architecture!r}"
            )
        if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 1:
            raise ConfigError(f"num_labels must be an int >= 1; got {self.num_labels!r}")
        family = BACKBONES[self.backbone_architecture]
        if self.pooling is None:
            self.pooling = family.pooling
        if self.pooler is None:
            self.pooler = family.pooler
        if not isinstance(self.pooler, bool):
            raise ConfigError(f"pooler must be a bool or None; got {self.pooler!r}")
        if self.pooler_act not in POOLER_ACTIVATIONS:
            raise ConfigError(f"pooler_act must be one of {tuple(POOLER_ACTIVATIONS)}; got {self.pooler_act!r}")
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
        return BACKBONES[self.backbone_architecture].config_class.from_dict(self.backbone)

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


# The fields of a head (what from_pretrained takes beside a backbone checkpoint).
HEAD_FIELDS = {f.name for f in dataclasses.fields(ClassifierConfig)} - {"backbone", "backbone_architecture"}


@dataclass
class ClassifierOutput:
    """``logits``: (batch, num_labels) or, per token, (batch, seqlen, num_labels); ``loss`` when labels were given."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


class _Classifier(PretrainedModel):
    """A backbone and a linear ``score`` head; subclasses pick the positions it scores and the loss."""

    # A MambaLM backbone's. The registry looks up one name per class: a stored encoder classifier
    # (backbone.embeddings.token.weight) loads in torch's default dtype unless given one.
    main_weight = "backbone.embedding.weight"

    def __init__(self, config: ClassifierConfig, *, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise TypeError(f"config must be a ClassifierConfig; got {type(config).__name__}")
        self.config = config
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        backbone_config = config.backbone_config()
        self.family = BACKBONES[config.backbone_architecture]
        self.backbone = self.family.build(backbone_config, factory, backend)
        self.dropout = nn.Dropout(getattr(backbone_config, "hidden_dropout", 0.0))
        self.score = nn.Linear(config.d_model, config.num_labels, **factory)
        with torch.no_grad():
            nn.init.normal_(self.score.weight, std=0.02)
            nn.init.zeros_(self.score.bias)

    @property
    def framed(self) -> bool:
        """Whether inputs are ``[CLS] text [SEP]``, as the backbone was pre-trained on (encoders)."""
        return self.family.framed

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *, device=None, dtype=None, strict: bool = True, **head: Any):
        """A classifier from a checkpoint of one (``head`` must then agree with it), or a new head on the
        backbone of any checkpoint of a family in ``BACKBONES`` (ours, mamba_ssm, HF), dropping its pre-training
        head.

        ``head``: ClassifierConfig fields (num_labels, id2label, label2id, pooling, pooler, pooler_act,
        problem_type).
        """
        unknown = sorted(set(head) - HEAD_FIELDS)
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
        found = [(name, family) for name, family in BACKBONES.items() if model.architecture in family.sources]
        if not found:
            sources = sorted(a for family in BACKBONES.values() for a in family.sources)
            raise CheckpointError(
                f"{str(path_or_repo_id)!r} holds a {model.architecture}, which has no backbone a "
                f"{cls.__name__} can use; backbones are those of {sources}"
            )
        if quantization_of(model) is not None:
            raise CheckpointError(
                f"{str(path_or_repo_id)!r} holds a model quantised to {quantization_of(model)} for inference: put "
                "a head on the unquantised weights"
            )
        (name, family), = found
        backbone, backbone_config = family.sources[model.architecture](model)
        config = ClassifierConfig(backbone=backbone_config.to_dict(), backbone_architecture=name, **head)
        weight = next(backbone.parameters())
        classifier = cls(config, device=weight.device, dtype=weight.dtype)
        # An encoder saved with BERT's pooler (HF BertModel) brings it; the classifier's own encoder has none.
        weights = {k: t for k, t in backbone.state_dict().items() if not k.startswith("pooler.")}
        classifier.backbone.load_state_dict(weights)
        new = ["score"]
        pooler = getattr(classifier, "pooler", None)
        if pooler is not None:
            if getattr(backbone, "pooler", None) is not None:
                pooler.load_state_dict(backbone.pooler.state_dict())
            else:
                new.insert(0, "pooler.dense")
        logger.warning(
            "%s: a new head (%s; %d labels) on the backbone of %s (a %s), its pre-training head dropped: "
            "train it before use",
            cls.__name__, ", ".join(new), config.num_labels, path_or_repo_id, model.architecture,
        )
        return classifier

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The backbone's output (batch, seqlen, d_model) of ``input_ids``; ``attention_mask``: 1 real, 0 pad."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a tensor of shape (batch, seqlen >= 1); got {input_ids!r}")
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}; "
                    f"got {getattr(attention_mask, 'shape', attention_mask)!r}"
                )
            mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        return self.family.hidden(self.backbone, input_ids, mask)

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(self.dropout(hidden))


class SequenceClassifier(_Classifier):
    """One label (or value) per sequence: ``forward(input_ids, attention_mask=None, labels=None)``.

    ``labels`` (batch,) int for single-label classification or regression with
    ``num_labels == 1``; (batch, num_labels) float for multi-label classification
    or multi-output regression. The loss is HF's: MSE, cross entropy, or binary
    cross entropy with logits.
    """

    architecture = "SequenceClassifier"

    def __init__(self, config: ClassifierConfig, *, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__(config, device=device, dtype=dtype, backend=backend)
        self.pooler = PoolerHead(config.d_model, config.pooler_act, device=device, dtype=dtype) if config.pooler else None

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> ClassifierOutput:
        hidden = self.hidden_states(input_ids, attention_mask)
        pooled = pool(hidden, attention_mask, self.config.pooling)
        if self.pooler is not None:
            pooled = self.pooler(pooled)
        logits = self._scores(pooled)
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


class PoolerHead(nn.Module):
    """``act(dense(pooled))``: BERT's pooler (tanh), RoBERTa's classification head before its output projection
    (tanh), ELECTRA's (GELU)."""

    def __init__(self, d_model: int, act: str = "tanh", *, device=None, dtype=None) -> None:
        super().__init__()
        self.act = POOLER_ACTIVATIONS[act]
        self.dense = nn.Linear(d_model, d_model, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.normal_(self.dense.weight, std=0.02)
            nn.init.zeros_(self.dense.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(pooled))


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


registry.register(
    SequenceClassifier,
    ClassifierConfig,
    converters=(
        hf_bert.SEQUENCE_CLASSIFIER, hf_roberta.SEQUENCE_CLASSIFIER, hf_albert.SEQUENCE_CLASSIFIER,
        hf_electra.SEQUENCE_CLASSIFIER,
    ),
)
registry.register(
    TokenClassifier,
    ClassifierConfig,
    converters=(
        hf_bert.TOKEN_CLASSIFIER, hf_roberta.TOKEN_CLASSIFIER, hf_albert.TOKEN_CLASSIFIER, hf_electra.TOKEN_CLASSIFIER,
    ),
)

