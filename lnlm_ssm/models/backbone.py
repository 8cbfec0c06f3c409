"""The backbone every stacked model shares: token embedding, a stack of blocks, a final norm.

A block is ``norm -> mixer (-> norm2 -> mlp)`` on the residual stream. It does
not add its own output to the stream: it passes ``(hidden_states, residual)`` on
and the next block's norm adds them (fused in RMSNorm). The residual stream is
kept in fp32 when ``residual_in_fp32``.

Parameter names are mamba_ssm's::

    embedding.weight                 (padded_vocab_size, d_model)
    position_embedding.weight        (max_position_embeddings, d_model), learned positions only (GPT-2)
    layers.{i}.norm.weight
    layers.{i}.mixer.*               Mamba, Mamba2 or Attention
    layers.{i}.norm2.weight          with an MLP (d_intermediate > 0)
    layers.{i}.mlp.fc1.weight / fc2.weight   (and .bias with mlp_bias)
    norm_f.weight
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lnlm_ssm.layers.attention import Attention
from lnlm_ssm.layers.block_step import decode_step, mixer_step_params, mlp_step_params
from lnlm_ssm.layers.embedding import TokenEmbedding
from lnlm_ssm.layers.mamba import Mamba
from lnlm_ssm.layers.mamba2 import Mamba2
from lnlm_ssm.layers.mlp import MLP, GatedMLP, activation_fn
from lnlm_ssm.layers.norm import LayerNorm, RMSNorm
from lnlm_ssm.models.config import ConfigError, MambaLMConfig
from lnlm_ssm.ops._backends import backend_for

MIXERS = {"Mamba1": Mamba, "Mamba2": Mamba2, "Attention": Attention}


def make_norm(config: MambaLMConfig, factory: dict, backend: str) -> nn.Module:
    if config.rms_norm:
        return RMSNorm(config.d_model, eps=config.norm_epsilon, backend=backend_for("rms_norm_fn", backend), **factory)
    return LayerNorm(config.d_model, eps=config.norm_epsilon, backend=backend_for("layer_norm_fn", backend), **factory)


class Block(nn.Module):
    """``norm -> mixer`` (and ``norm2 -> mlp``) on the residual stream; returns ``(hidden_states, residual)``."""

    def __init__(self, config: MambaLMConfig, layer_type: str, layer_idx: int, *, factory: dict, backend: str):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = make_norm(config, factory, backend)
        if layer_type == "Attention":
            kwargs = config.attn_cfg
        else:
            kwargs = {k: v for k, v in config.ssm_cfg.items() if k != "layer"}
        try:
            self.mixer = MIXERS[layer_type](config.d_model, **kwargs, layer_idx=layer_idx, backend=backend, **factory)
        except TypeError as err:
            cfg = "attn_cfg" if layer_type == "Attention" else "ssm_cfg"
            raise ConfigError(f"layer {layer_idx} ({layer_type}) does not take the {cfg} given: {err}") from err
        if config.d_intermediate > 0:
            self.norm2 = make_norm(config, factory, backend)
            if config.mlp_type == "plain":
                self.mlp = MLP(
                    config.d_model, config.d_intermediate, activation=config.mlp_act, bias=config.mlp_bias, **factory
                )
            else:
                self.mlp = GatedMLP(
                    config.d_model, hidden_features=config.d_intermediate, out_features=config.d_model,
                    activation=activation_fn(config.mlp_act), bias=config.mlp_bias, **factory,
                )
        else:
            self.norm2 = self.mlp = None

    def forward(self, hidden_states, residual, cache, mask, position_ids):
        hidden_states, residual = self.norm(
            hidden_states, residual=residual, prenorm=True, residual_in_fp32=self.residual_in_fp32
        )
        hidden_states = self.mixer(hidden_states, cache, mask=mask, position_ids=position_ids)
        if self.mlp is not None:
            hidden_states, residual = self.norm2(
                hidden_states, residual=residual, prenorm=True, residual_in_fp32=self.residual_in_fp32
            )
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def step_params(self, cache) -> list:
        """This block's decode step on its ``cache`` as block steps (``layers.block_step``): (op, params) pairs.

        Raises ``FusedStepUnsupported`` for a block without one.
        """
        steps = [mixer_step_params(self.mixer, self.norm, cache)]
        if self.mlp is not None:
            steps.append(mlp_step_params(self.mlp, self.norm2))
        return steps


class Backbone(nn.Module):
    """Embedding, blocks and final norm: input ids (batch, seqlen) -> hidden states (batch, seqlen, d_model)."""

    def __init__(self, config: MambaLMConfig, *, factory: dict, backend: str):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.embedding = TokenEmbedding(config.vocab_size, config.padded_vocab_size, config.d_model, **factory)
        self.position_embedding = (
            nn.Embedding(config.max_position_embeddings, config.d_model, **factory)
            if config.max_position_embeddings
            else None
        )
        self.layers = nn.ModuleList(
            Block(config, layer_type, i, factory=factory, backend=backend)
            for i, layer_type in enumerate(config.layer_types())
        )
        self.norm_f = make_norm(config, factory, backend)

    def forward(self, hidden_states, caches, mask, position_ids):
        residual = None
        for i, layer in enumerate(self.layers):
            hidden_states, residual = layer(
                hidden_states, residual, None if caches is None else caches[i], mask, position_ids
            )
        return self.norm_f(hidden_states, residual=residual, prenorm=False, residual_in_fp32=self.residual_in_fp32)

    def fused_step(self, caches: list) -> Callable[[torch.Tensor], torch.Tensor]:
        """The decode step as one C++ call (``layers.block_step.decode_step``) on the layer ``caches``:
        ``step(input_ids (batch,), past, positions=None, key_mask=None) -> hidden states (batch, d_model)``
        after the final norm (past, positions and key_mask: for attention blocks).

        Raises ``FusedStepUnsupported`` when a block has no fused step.
        """
        blocks = [step for layer, cache in zip(self.layers, caches) for step in layer.step_params(cache)]
        return decode_step(self.embedding, blocks, self.norm_f)
