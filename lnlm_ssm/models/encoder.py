"""Encoder: the bidirectional stack BERT, RoBERTa, ALBERT and ELECTRA share, as ``EncoderConfig`` describes it.

``embeddings -> (embedding_proj) -> blocks -> (norm_f)``: input ids (batch, seqlen)
-> hidden states (batch, seqlen, d_model), and with ``add_pooler`` BERT's pooled
first token. A block is post-norm (BERT's)::

    x = norm(x + mixer(x));  x = norm2(x + mlp(x))

or, with ``prenorm``, ``x = x + mixer(norm(x)); x = x + mlp(norm2(x))`` and a final
``norm_f``. Norms are LayerNorms with biases, the MLP is ``fc1 -> act -> fc2``.
The mixer of each block is ``ENCODER_MIXERS[char]`` for its ``layer_pattern``
character ("A" attention, "B" BiMamba, "H" Hydra: the last two from
``layers.bidirectional``), built with ``d_model``, the defaults below and ``mixer_cfg[char]``;
a new bidirectional mixer is one entry there.

Parameter names::

    embeddings.token.weight, .position.weight, .token_type.weight, .norm.*   (layers.EncoderEmbedding)
    embedding_proj.weight, .bias        E -> d_model, when embedding_size is set
    layers.{b}.mixer.*                  Attention: in_proj (rows [q, k, v]), out_proj, with biases
    layers.{b}.norm.*, layers.{b}.mlp.fc1.*, .fc2.*, layers.{b}.norm2.*
    norm_f.*                            prenorm only
    pooler.dense.*                      add_pooler only

where ``b`` counts the distinct blocks (``num_hidden_groups * inner_group_num``);
ALBERT's shared layers run the same block several times (``block_order``).

``attention_mask`` (batch, seqlen) marks real tokens (1) and padding (0); encoders
pad on the right. Pad keys get no attention score, so a padded row's real
positions equal that row alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lnlm_ssm.checkpoint.convert import hf_albert, hf_bert, hf_electra, hf_roberta
from lnlm_ssm.layers.attention import Attention
from lnlm_ssm.layers.bidirectional import BiMamba, Hydra
from lnlm_ssm.layers.embedding import EncoderEmbedding
from lnlm_ssm.layers.mlp import MLP
from lnlm_ssm.layers.norm import LayerNorm
from lnlm_ssm.models import registry
from lnlm_ssm.models.base import PretrainedModel
from lnlm_ssm.models.config import ConfigError, EncoderConfig
from lnlm_ssm.ops._backends import backend_for

__all__ = ["ENCODER_MIXERS", "Encoder", "EncoderBlock", "EncoderOutput"]

# layer_pattern character -> the bidirectional mixer of that block.
ENCODER_MIXERS: dict[str, type] = {"A": Attention, "B": BiMamba, "H": Hydra}


def mixer_defaults(config: EncoderConfig, char: str) -> dict[str, Any]:
    """The keyword arguments a mixer gets from the config's own fields; ``mixer_cfg[char]`` overrides them."""
    if char == "A":
        return {"num_heads": config.num_heads, "causal": False, "qkv_proj_bias": True, "out_proj_bias": True}
    return {}


@dataclass
class EncoderOutput:
    """``last_hidden_state`` (batch, seqlen, d_model); ``pooled`` (batch, d_model) with a pooler."""

    last_hidden_state: torch.Tensor
    pooled: Optional[torch.Tensor] = None


class EncoderBlock(nn.Module):
    """A mixer and an MLP, each with a residual and a LayerNorm, post-norm or (``prenorm``) pre-norm."""

    def __init__(self, config: EncoderConfig, char: str, layer_idx: int, *, factory: dict, backend: str):
        super().__init__()
        if char not in ENCODER_MIXERS:
            raise ConfigError(
                f"layer_pattern {config.layer_pattern!r} has the character {char!r}, which names no encoder mixer; "
                f"known: {sorted(ENCODER_MIXERS)}"
            )
        self.prenorm = config.prenorm
        kwargs = {**mixer_defaults(config, char), **config.mixer_cfg.get(char, {})}
        try:
            self.mixer = ENCODER_MIXERS[char](config.d_model, **kwargs, layer_idx=layer_idx, backend=backend, **factory)
        except TypeError as err:
            raise ConfigError(f"block {layer_idx} ({char!r}) does not take the mixer_cfg given: {err}") from err
        norm_backend = backend_for("layer_norm_fn", backend)
        self.norm = LayerNorm(config.d_model, eps=config.layer_norm_eps, backend=norm_backend, **factory)
        self.mlp = MLP(config.d_model, config.d_intermediate, activation=config.hidden_act, **factory)
        self.norm2 = LayerNorm(config.d_model, eps=config.layer_norm_eps, backend=norm_backend, **factory)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.prenorm:
            hidden_states = hidden_states + self.dropout(self.mixer(self.norm(hidden_states), mask=mask))
            return hidden_states + self.dropout(self.mlp(self.norm2(hidden_states)))
        hidden_states = self.norm(hidden_states + self.dropout(self.mixer(hidden_states, mask=mask)))
        return self.norm2(hidden_states + self.dropout(self.mlp(hidden_states)))


class Pooler(nn.Module):
    """BERT's pooler: ``tanh(dense(hidden_states[:, 0]))``, the first ([CLS]) token."""

    def __init__(self, d_model: int, *, factory: dict):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model, **factory)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class Encoder(PretrainedModel):
    """The bare encoder: hidden states of every position (and the pooled first token with ``add_pooler``).

    Reads HF ``BertModel``, ``RobertaModel``, ``AlbertModel`` and ``ElectraModel``
    checkpoints. ``pooler``: build the pooler or not, whatever ``add_pooler``
    says (the pre-training models decide for themselves). ``embeddings``: an
    ``EncoderEmbedding`` to share (ELECTRA's generator shares the discriminator's)
    instead of a new one.
    """

    architecture = "Encoder"
    main_weight = "embeddings.token.weight"

    def __init__(
        self,
        config: EncoderConfig,
        *,
        device=None,
        dtype=None,
        backend: str = "auto",
        pooler: Optional[bool] = None,
        embeddings: Optional[EncoderEmbedding] = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"config must be an EncoderConfig; got {type(config).__name__}")
        self.config = config
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        if embeddings is None:
            embeddings = EncoderEmbedding(
                config.vocab_size,
                config.embedding_dim,
                max_positions=config.max_position_embeddings,
                type_vocab_size=config.type_vocab_size,
                norm_eps=config.layer_norm_eps,
                backend=backend_for("layer_norm_fn", backend),
                **factory,
            )
        self.embeddings = embeddings
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.embedding_proj = (
            None if config.embedding_size is None else nn.Linear(config.embedding_size, config.d_model, **factory)
        )
        self.layers = nn.ModuleList(
            EncoderBlock(config, char, i, factory=factory, backend=backend) for i, char in enumerate(config.layer_chars())
        )
        self._order = config.block_order()
        self.norm_f = (
            LayerNorm(config.d_model, eps=config.layer_norm_eps, backend=backend_for("layer_norm_fn", backend), **factory)
            if config.prenorm
            else None
        )
        self.pooler = Pooler(config.d_model, factory=factory) if (config.add_pooler if pooler is None else pooler) else None
        self._init_weights()

    def _init_weights(self) -> None:
        """BERT's initialisation: linear and embedding weights ~ N(0, 0.02), biases 0, norms 1 and 0.

        A mixer other than attention keeps its own initialisation (its dt bias, A_log, ...).
        """
        own = {id(m) for block in self.layers if not isinstance(block.mixer, Attention) for m in block.mixer.modules()}
        with torch.no_grad():
            for module in self.modules():
                if id(module) in own:
                    continue
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> EncoderOutput:
        """Hidden states of ``input_ids`` (batch, seqlen).

        - ``attention_mask`` (batch, seqlen): 1 real, 0 padding (on the right).
        - ``token_type_ids`` (batch, seqlen): segment ids (default 0).
        - ``position_ids`` (batch, seqlen): default ``position_offset + 0, 1, ...``; with
          ``position_offset > 0`` (RoBERTa) the non-pad tokens (ids != pad_token_id)
          count up from it and pad tokens take ``position_offset - 1``.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a tensor of shape (batch, seqlen >= 1); got {got}")
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
                raise ValueError(
                    f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}; got {got}"
                )
            mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if position_ids is None and self.embeddings.position is not None:
            position_ids = self.default_position_ids(input_ids)
        hidden_states = self.embedding_dropout(self.embeddings(input_ids, position_ids, token_type_ids))
        if self.embedding_proj is not None:
            hidden_states = self.embedding_proj(hidden_states)
        for b in self._order:
            hidden_states = self.layers[b](hidden_states, mask)
        if self.norm_f is not None:
            hidden_states = self.norm_f(hidden_states)
        pooled = None if self.pooler is None else self.pooler(hidden_states)
        return EncoderOutput(last_hidden_state=hidden_states, pooled=pooled)

    def default_position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``position_offset + 0, 1, ...``; RoBERTa's rule (see ``forward``) when ``position_offset > 0``."""
        offset = self.config.position_offset
        if offset == 0:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        real = (input_ids != self.config.pad_token_id).long()
        return real.cumsum(dim=1) * real + (offset - 1)


registry.register(Encoder, EncoderConfig, converters=(hf_bert.BARE, hf_roberta.BARE, hf_albert.BARE, hf_electra.BARE))
