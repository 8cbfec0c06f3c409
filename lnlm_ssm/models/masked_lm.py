"""The encoder pre-training models: BERT's masked LM, ALBERT's with sentence order, ELECTRA's discriminator and pair.

- ``MaskedLM``: ``Encoder`` + the MLM head, its decoder tied to the token embedding
  (HF ``BertForMaskedLM``, ``RobertaForMaskedLM``, ``AlbertForMaskedLM``, and
  ``ElectraForMaskedLM``, ELECTRA's generator);
- ``SentenceOrderMaskedLM``: the same with the pooler and ALBERT's sentence-order
  head (HF ``AlbertForPreTraining``);
- ``ReplacedTokenDetector``: ELECTRA's discriminator, a logit per token (HF
  ``ElectraForPreTraining``);
- ``ElectraPretraining``: the generator and the discriminator of ELECTRA's
  pre-training, sharing their embeddings; ``objectives.electra`` calls
  ``pair.generator(...)`` and ``pair.discriminator(...)``.

Every forward takes ``(input_ids, attention_mask=None, token_type_ids=None,
position_ids=None, labels=None)`` as ``Encoder.forward`` and HF do. Parameter names::

    encoder.*                           see models.encoder
    mlm_head.dense.*, .norm.*           dense: d_model -> E, norm over E
    mlm_head.decoder.weight, .bias      weight: encoder.embeddings.token.weight when tie_embeddings
    sop_head.*                          d_model -> 2, on the pooled first token
    rtd_head.dense.*, rtd_head.out.*    d_model -> d_model -> 1

A checkpoint of the bare encoder (HF ``BertModel``, ...) is an ``Encoder``:
``MaskedLM.from_pretrained`` refuses it (a CheckpointError naming what it holds)
rather than invent an untrained head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.checkpoint.convert import hf_albert, hf_bert, hf_electra, hf_roberta
from lnlm_ssm.layers.embedding import EncoderEmbedding
from lnlm_ssm.models import registry
from lnlm_ssm.models.base import PretrainedModel
from lnlm_ssm.models.config import ALBERT_PRESETS, ELECTRA_PRESETS, ENCODER_PRESETS, ElectraConfig, EncoderConfig
from lnlm_ssm.models.encoder import Encoder
from lnlm_ssm.models.heads import MaskedLMHead, ReplacedTokenHead, masked_lm_loss, replaced_token_loss
from lnlm_ssm.ops._backends import backend_for
from lnlm_ssm.utils.dtypes import math_dtype

__all__ = [
    "ElectraPretraining",
    "MaskedLM",
    "MaskedLMOutput",
    "ReplacedTokenDetector",
    "SentenceOrderMaskedLM",
    "TokenDetectionOutput",
]


@dataclass
class MaskedLMOutput:
    """``logits`` (batch, seqlen, vocab_size); ``loss`` when labels were given; ``hidden_states``, the encoder's
    last; ``sop_logits`` (batch, 2) of ``SentenceOrderMaskedLM``."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None
    sop_logits: Optional[torch.Tensor] = None


@dataclass
class TokenDetectionOutput:
    """``logits`` (batch, seqlen): > 0 says "replaced"; ``loss`` when labels were given; the encoder's last
    ``hidden_states``."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None


def _init_linear(*modules: nn.Module) -> None:
    """BERT's initialisation of the heads: weights ~ N(0, 0.02), biases 0 (norms keep ones and zeros)."""
    with torch.no_grad():
        for module in modules:
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=0.02)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)


class MaskedLM(PretrainedModel):
    """An encoder with BERT's MLM head: logits over the vocabulary at every position.

    ``labels`` (batch, seqlen): the original ids at the masked positions, -100
    elsewhere (HF's convention, no shift); the loss is their mean cross entropy.
    ``embeddings``: an ``EncoderEmbedding`` to share (see ``Encoder``).
    """

    architecture = "MaskedLM"
    main_weight = "encoder.embeddings.token.weight"
    # Whether the encoder has BERT's pooler (the sentence-order head reads it).
    pooled: bool = False

    def __init__(
        self,
        config: EncoderConfig,
        *,
        device=None,
        dtype=None,
        backend: str = "auto",
        embeddings: Optional[EncoderEmbedding] = None,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(
            config, device=device, dtype=dtype, backend=backend, pooler=self.pooled, embeddings=embeddings
        )
        self.config = config
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.mlm_head = MaskedLMHead(
            config.d_model, config.embedding_dim, config.vocab_size, config.head_act, config.layer_norm_eps,
            factory=factory, backend=backend_for("layer_norm_fn", backend),
        )
        _init_linear(self.mlm_head)
        if config.tie_embeddings:
            self.mlm_head.decoder.weight = self.encoder.embeddings.token.weight

    def tied_weights(self) -> dict[str, str]:
        return {"mlm_head.decoder.weight": self.main_weight} if self.config.tie_embeddings else {}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> MaskedLMOutput:
        """Logits (batch, seqlen, vocab_size) of ``input_ids``; the arguments as ``Encoder.forward``'s, and ``labels``."""
        hidden_states = self.encoder(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        logits = self.mlm_head(hidden_states)
        loss = None if labels is None else masked_lm_loss(logits, labels)
        return MaskedLMOutput(logits=logits, loss=loss, hidden_states=hidden_states)


class SentenceOrderMaskedLM(MaskedLM):
    """ALBERT's pre-training model: ``MaskedLM`` plus the pooler and the sentence-order head.

    ``sentence_order_label`` (batch,): 0 when the two segments are in their
    original order, 1 when swapped; the loss is the MLM loss plus the mean cross
    entropy of ``sop_logits`` (either alone when only its labels are given).
    """

    architecture = "SentenceOrderMaskedLM"
    pooled = True

    def __init__(self, config: EncoderConfig, *, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__(config, device=device, dtype=dtype, backend=backend)
        self.sop_head = nn.Linear(config.d_model, 2, device=device, dtype=dtype)
        _init_linear(self.sop_head)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        sentence_order_label: Optional[torch.Tensor] = None,
    ) -> MaskedLMOutput:
        encoded = self.encoder(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.mlm_head(encoded.last_hidden_state)
        sop_logits = self.sop_head(encoded.pooled)
        losses = []
        if labels is not None:
            losses.append(masked_lm_loss(logits, labels))
        if sentence_order_label is not None:
            if not isinstance(sentence_order_label, torch.Tensor) or sentence_order_label.shape != (logits.shape[0],):
                got = getattr(sentence_order_label, "shape", sentence_order_label)
                raise ValueError(f"sentence_order_label must have shape (batch,) = ({logits.shape[0]},); got {got}")
            sop = sop_logits.to(math_dtype(sop_logits.dtype))
            losses.append(F.cross_entropy(sop, sentence_order_label.to(sop.device).long()))
        loss = sum(losses) if losses else None
        return MaskedLMOutput(logits=logits, loss=loss, hidden_states=encoded.last_hidden_state, sop_logits=sop_logits)


class ReplacedTokenDetector(PretrainedModel):
    """ELECTRA's discriminator: an encoder and a per-token logit that the token was replaced.

    ``labels`` (batch, seqlen): 1 replaced, 0 original, -100 ignored; padding
    (``attention_mask`` 0) is ignored too. The loss is the mean binary cross entropy.
    """

    architecture = "ReplacedTokenDetector"
    main_weight = "encoder.embeddings.token.weight"

    def __init__(self, config: EncoderConfig, *, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        self.encoder = Encoder(config, device=device, dtype=dtype, backend=backend, pooler=False)
        self.config = config
        self.backend = backend
        self.rtd_head = ReplacedTokenHead(config.d_model, config.hidden_act, factory={"device": device, "dtype": dtype})
        _init_linear(self.rtd_head)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> TokenDetectionOutput:
        hidden_states = self.encoder(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        logits = self.rtd_head(hidden_states)
        loss = None if labels is None else replaced_token_loss(logits, labels, attention_mask)
        return TokenDetectionOutput(logits=logits, loss=loss, hidden_states=hidden_states)


class ElectraPretraining(PretrainedModel):
    """ELECTRA's pair: ``generator`` (a ``MaskedLM``) and ``discriminator`` (a ``ReplacedTokenDetector``).

    As in the paper, the generator uses the discriminator's embeddings (token,
    position and token type, and their norm: one module), and its MLM decoder is
    tied to their token table. It has no forward of its own: the ELECTRA
    objective masks, runs the generator, samples replacements from it and runs
    the discriminator on them. ``discriminator`` alone is what is fine-tuned.
    """

    architecture = "ElectraPretraining"
    main_weight = "discriminator.encoder.embeddings.token.weight"

    def __init__(self, config: ElectraConfig, *, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, ElectraConfig):
            raise TypeError(f"config must be an ElectraConfig; got {type(config).__name__}")
        self.config = config
        self.backend = backend
        self.discriminator = ReplacedTokenDetector(config.discriminator, device=device, dtype=dtype, backend=backend)
        self.generator = MaskedLM(
            config.generator, device=device, dtype=dtype, backend=backend,
            embeddings=self.discriminator.encoder.embeddings,
        )

    def tied_weights(self) -> dict[str, str]:
        shared = {
            f"generator.encoder.embeddings.{name}": f"discriminator.encoder.embeddings.{name}"
            for name in self.discriminator.encoder.embeddings.state_dict()
        }
        if self.config.generator.tie_embeddings:
            shared["generator.mlm_head.decoder.weight"] = self.main_weight
        return shared


registry.register(
    MaskedLM,
    EncoderConfig,
    converters=(hf_bert.MLM, hf_roberta.MLM, hf_albert.MLM, hf_electra.GENERATOR),
    presets=ENCODER_PRESETS,
)
registry.register(SentenceOrderMaskedLM, EncoderConfig, converters=(hf_albert.PRETRAINING,), presets=ALBERT_PRESETS)
registry.register(ReplacedTokenDetector, EncoderConfig, converters=(hf_electra.DISCRIMINATOR,))
registry.register(ElectraPretraining, ElectraConfig, presets=ELECTRA_PRESETS)
