"""MambaLM: an embedding, a stack of "Add -> Norm -> Mixer (-> Add -> Norm2 -> MLP)" blocks, a final norm, an LM head.

Parameter names are mamba_ssm's ``MambaLMHeadModel``'s, so its checkpoints load as is::

    backbone.embedding.weight                   (padded_vocab_size, d_model)
    backbone.layers.{i}.norm.weight
    backbone.layers.{i}.mixer.*                 Mamba, Mamba2 or Attention
    backbone.layers.{i}.norm2.weight            with an MLP (d_intermediate > 0)
    backbone.layers.{i}.mlp.fc1.weight / fc2.weight
    backbone.norm_f.weight
    lm_head.weight                              the embedding's tensor when tie_embeddings

A block does not add its own output to the residual stream: it passes
``(hidden_states, residual)`` on and the next block's norm adds them (fused in
RMSNorm). The residual stream is kept in fp32 when ``residual_in_fp32``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.generation import InferenceCache
from lnlm_ssm.generation import generate as _generate
from lnlm_ssm.layers.attention import Attention
from lnlm_ssm.layers.mamba import Mamba
from lnlm_ssm.layers.mamba2 import Mamba2
from lnlm_ssm.layers.mlp import GatedMLP
from lnlm_ssm.layers.norm import RMSNorm
from lnlm_ssm.ops import decode_linear
from lnlm_ssm.ops._backends import backend_for
from lnlm_ssm.models.config import ConfigError, MambaLMConfig, preset

__all__ = ["MambaLM", "MambaLMOutput"]

IGNORE_INDEX = -100


@dataclass
class MambaLMOutput:
    """``logits`` (batch, seqlen or num_last_tokens, vocab_size); ``loss`` when labels were given; the ``cache``."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    cache: Optional[InferenceCache] = None


class _LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with RMSNorm's "Add -> Norm" call, for configs with ``rms_norm=False`` (keys norm.weight/bias)."""

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        # Same dtype rules as rms_norm_fn: the sum in fp32 (or wider), y in x's dtype.
        compute = torch.promote_types(x.dtype, torch.float32)
        total = x.to(compute) if residual is None else x.to(compute) + residual.to(compute)
        y = F.layer_norm(total, self.normalized_shape, self.weight.to(compute), self.bias.to(compute), self.eps)
        y = y.to(x.dtype)
        if not prenorm:
            return y
        residual_dtype = torch.float32 if residual_in_fp32 else (x.dtype if residual is None else residual.dtype)
        return y, total.to(residual_dtype)


_MIXERS = {"Mamba1": Mamba, "Mamba2": Mamba2, "Attention": Attention}


class Block(nn.Module):
    """``norm -> mixer`` (and ``norm2 -> mlp``) on the residual stream; returns ``(hidden_states, residual)``."""

    def __init__(self, config: MambaLMConfig, layer_type: str, layer_idx: int, *, factory: dict, backend: str):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = _make_norm(config, factory, backend)
        if layer_type == "Attention":
            kwargs = config.attn_cfg
        else:
            kwargs = {k: v for k, v in config.ssm_cfg.items() if k != "layer"}
        try:
            self.mixer = _MIXERS[layer_type](config.d_model, **kwargs, layer_idx=layer_idx, backend=backend, **factory)
        except TypeError as err:
            cfg = "attn_cfg" if layer_type == "Attention" else "ssm_cfg"
            raise ConfigError(f"layer {layer_idx} ({layer_type}) does not take the {cfg} given: {err}") from err
        if config.d_intermediate > 0:
            self.norm2 = _make_norm(config, factory, backend)
            self.mlp = GatedMLP(
                config.d_model, hidden_features=config.d_intermediate, out_features=config.d_model, **factory
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


def _make_norm(config: MambaLMConfig, factory: dict, backend: str) -> nn.Module:
    if config.rms_norm:
        return RMSNorm(config.d_model, eps=config.norm_epsilon, backend=backend_for("rms_norm_fn", backend), **factory)
    return _LayerNorm(config.d_model, eps=config.norm_epsilon, **factory)


class Backbone(nn.Module):
    def __init__(self, config: MambaLMConfig, *, factory: dict, backend: str):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, **factory)
        self.layers = nn.ModuleList(
            Block(config, layer_type, i, factory=factory, backend=backend)
            for i, layer_type in enumerate(config.layer_types())
        )
        self.norm_f = _make_norm(config, factory, backend)

    def forward(self, hidden_states, caches, mask, position_ids):
        residual = None
        for i, layer in enumerate(self.layers):
            hidden_states, residual = layer(
                hidden_states, residual, None if caches is None else caches[i], mask, position_ids
            )
        return self.norm_f(hidden_states, residual=residual, prenorm=False, residual_in_fp32=self.residual_in_fp32)


class MambaLM(nn.Module):
    """A language model of Mamba-1, Mamba-2 and attention layers as ``config`` describes.

    ``backend`` is passed to every op of every layer that has a kernel for it,
    and "auto" (the fastest per device) to the others: ``backend="cpu"`` runs the
    scans, convs and decode steps on the C++ kernels and the norms, which have
    no C++ kernel, on their PyTorch one.
    """

    def __init__(self, config: MambaLMConfig, *, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, MambaLMConfig):
            raise TypeError(f"config must be a MambaLMConfig; got {type(config).__name__}")
        self.config = config
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.backbone = Backbone(config, factory=factory, backend=backend)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, **factory)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self._has_attention = "Attention" in config.layer_types()
        self._init_weights()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: MambaLMConfig, *, device=None, dtype=None, backend: str = "auto") -> "MambaLM":
        return cls(config, device=device, dtype=dtype, backend=backend)

    @classmethod
    def from_name(
        cls, name: str, *, device=None, dtype=None, backend: str = "auto", **overrides: Any
    ) -> "MambaLM":
        """A randomly initialised model of the preset ``name`` (see ``models.config.PRESETS``), fields overridden."""
        return cls(preset(name, **overrides), device=device, dtype=dtype, backend=backend)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *, device=None, dtype=None, strict: bool = True) -> "MambaLM":
        """Load a checkpoint in our layout, mamba_ssm's, or HF transformers' (Mamba, Mamba-2, Llama).

        A directory, or a hub repo id when huggingface_hub is installed; see
        ``lnlm_ssm.models.checkpoint.load_pretrained``.
        """
        from lnlm_ssm.models.checkpoint import load_pretrained

        return load_pretrained(path_or_repo_id, device=device, dtype=dtype, strict=strict)

    def save_pretrained(self, directory):
        """Write config.json and the weights; returns the directory. See ``models.checkpoint.save_pretrained``."""
        from lnlm_ssm.models.checkpoint import save_pretrained

        return save_pretrained(self, directory)

    def _init_weights(self) -> None:
        """The incumbent's initialisation (GPT-2 style, from the Mamba paper's code description).

        Embedding ~ N(0, 0.02); Linear biases zero (except those a mixer marked
        ``_no_reinit``, such as Mamba's dt bias); every projection that writes into the
        residual stream (out_proj, fc2) re-drawn as nn.Linear's default and scaled by
        1/sqrt(n_layer * residuals per layer), so that the stream's variance does not
        grow with depth.
        """
        residuals_per_layer = 2 if self.config.d_intermediate > 0 else 1
        scale = 1.0 / math.sqrt(self.config.n_layer * residuals_per_layer)
        with torch.no_grad():
            nn.init.normal_(self.backbone.embedding.weight, std=0.02)
            for module in self.backbone.layers.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    if not getattr(module.bias, "_no_reinit", False):
                        nn.init.zeros_(module.bias)
            for name, param in self.backbone.layers.named_parameters():
                if name.endswith(("out_proj.weight", "fc2.weight")):
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5))
                    param.mul_(scale)

    # -- inference state -----------------------------------------------------------------------

    def allocate_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None) -> InferenceCache:
        """Every layer's inference state for ``batch_size`` rows and up to ``max_seqlen`` positions (zeros).

        Defaults: the model's device and dtype (SSM states are kept in fp32 by the layers).
        """
        for name, value in (("batch_size", batch_size), ("max_seqlen", max_seqlen)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        weight = self.backbone.embedding.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        layers = [
            block.mixer.allocate_cache(batch_size, max_seqlen, device=device, dtype=dtype)
            for block in self.backbone.layers
        ]
        return InferenceCache(layers, batch_size, max_seqlen, device)

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        *,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        num_last_tokens: int = 0,
        cache: Optional[InferenceCache] = None,
    ) -> MambaLMOutput:
        """Logits (and loss) of ``input_ids`` (batch, seqlen) or ``inputs_embeds`` (batch, seqlen, d_model).

        - ``labels`` (batch, seqlen): the loss is the mean cross entropy of
          ``logits[:, :-1]`` against ``labels[:, 1:]`` (the labels are the inputs, not
          shifted), ignoring -100 and padded positions.
        - ``attention_mask`` (batch, seqlen): 1 real, 0 padding (padding on the left
          when a cache is continued). With a cache it covers only the new positions;
          the cache remembers the earlier ones.
        - ``position_ids`` (batch, seqlen), for attention's RoPE. Default: the count
          of real positions before each one (``cumsum(mask) - 1``, 0 on padding).
        - ``num_last_tokens > 0``: logits of the last that many positions only.
        - ``cache``: an ``InferenceCache`` (``allocate_cache``) to continue from and
          update in place; seqlen 1 takes every mixer's decode step.
        """
        hidden_states = self._embed(input_ids, inputs_embeds)
        batch, seqlen, _ = hidden_states.shape
        if not isinstance(num_last_tokens, int) or isinstance(num_last_tokens, bool) or num_last_tokens < 0:
            raise ValueError(f"num_last_tokens must be an integer >= 0 (0: all positions); got {num_last_tokens!r}")
        if labels is not None and num_last_tokens:
            raise ValueError("labels need the logits of every position: give num_last_tokens=0 with labels")
        new_mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (batch, seqlen):
                raise ValueError(
                    f"attention_mask must be a tensor of shape (batch, seqlen) = ({batch}, {seqlen}); got "
                    f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask!r}"
                )
            new_mask = attention_mask.to(device=hidden_states.device, dtype=torch.bool)
        if position_ids is not None and (
            not isinstance(position_ids, torch.Tensor) or position_ids.shape != (batch, seqlen)
        ):
            raise ValueError(f"position_ids must be a tensor of shape (batch, seqlen) = ({batch}, {seqlen})")

        if cache is None:
            mask, caches = new_mask, None
        else:
            self._check_cache(cache, batch, seqlen)
            mask, caches = cache.mask_with(new_mask, seqlen), cache.layers
        if position_ids is None and mask is not None and self._has_attention:
            position_ids = (mask.long().cumsum(dim=1) - 1).clamp_min(0)[:, -seqlen:]

        hidden_states = self.backbone(hidden_states, caches, mask, position_ids)
        if cache is not None:
            cache.advance(seqlen)
        if num_last_tokens:
            hidden_states = hidden_states[:, -num_last_tokens:]
        logits = self._logits(hidden_states)
        loss = None if labels is None else self._loss(logits, labels, new_mask)
        return MambaLMOutput(logits=logits, loss=loss, cache=cache)

    def decode_logits(self, input_ids: torch.Tensor, caches: list) -> torch.Tensor:
        """Logits (batch, vocab_size) of one decode step of ``input_ids`` (batch, 1) from the layer ``caches``.

        No mask and no positions: the new token is real and SSM layers need neither, so
        this is the step a CUDA graph captures (``generation``) for models without attention.
        """
        hidden_states = self.backbone(self.backbone.embedding(input_ids), caches, None, None)
        return self._logits(hidden_states[:, -1])

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids (batch, seqlen) and inputs_embeds (batch, seqlen, d_model)")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
                got = f"dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
                raise TypeError(f"input_ids must be an int32/int64 tensor; got {got}")
            if input_ids.ndim != 2 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids must have shape (batch, seqlen >= 1); got {tuple(input_ids.shape)}")
            return self.backbone.embedding(input_ids)
        d_model = self.config.d_model
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.ndim != 3 or inputs_embeds.shape[2] != d_model:
            raise ValueError(
                f"inputs_embeds must be a tensor of shape (batch, seqlen, d_model={d_model}); got "
                f"{tuple(getattr(inputs_embeds, 'shape', ())) or inputs_embeds!r}"
            )
        return inputs_embeds

    def _check_cache(self, cache, batch: int, seqlen: int) -> None:
        if not isinstance(cache, InferenceCache):
            raise TypeError(f"cache must be an InferenceCache (model.allocate_cache); got {type(cache).__name__}")
        if cache.batch_size != batch:
            raise ValueError(f"cache was allocated for batch {cache.batch_size}; the input has batch {batch}")
        if cache.seqlen + seqlen > cache.max_seqlen:
            raise ValueError(
                f"cache has seen {cache.seqlen} of max_seqlen={cache.max_seqlen} positions and cannot take "
                f"{seqlen} more; allocate_cache with a larger max_seqlen"
            )

    def _logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The padded vocab rows are never a token: skip them in the matmul rather than slice afterwards.
        return decode_linear(hidden_states, self.lm_head.weight[: self.config.vocab_size], backend=self.backend)

    @staticmethod
    def _loss(logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if labels.shape != logits.shape[:2]:
            raise ValueError(
                f"labels must have shape (batch, seqlen) = {tuple(logits.shape[:2])}; got {tuple(labels.shape)}"
            )
        labels = labels.to(logits.device)
        if mask is not None:
            labels = labels.masked_fill(~mask, IGNORE_INDEX)
        # At least fp32 (bf16 logits lose too much in the log-softmax); float64 stays float64.
        logits = logits[:, :-1].flatten(0, 1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, labels[:, 1:].flatten().long(), ignore_index=IGNORE_INDEX)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Sample a continuation of ``input_ids``; the arguments are ``lnlm_ssm.generation.generate``'s."""
        return _generate(self, input_ids, **kwargs)
