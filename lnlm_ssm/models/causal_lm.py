"""MambaLM: the causal language model of Mamba-1, Mamba-2 and attention layers (``models.backbone``) with an LM head.

Parameter names are mamba_ssm's ``MambaLMHeadModel``'s, so its checkpoints load as is::

    backbone.*                                  see models.backbone
    lm_head.weight                              the embedding's tensor when tie_embeddings

Quantised by ``lnlm_ssm.quantize_``, every projection's and the embedding's
``weight`` is int8 (beside its fp32 ``weight_scale``) or bf16; the head shares the
embedding's tensors when tied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from lnlm_ssm.checkpoint.convert import hf_gpt2, hf_llama, hf_mamba, hf_mamba2, mamba_ssm
from lnlm_ssm.generation.decode import generate as _generate
from lnlm_ssm.layers.base import declared_parameter_names
from lnlm_ssm.layers.block_step import FusedStepUnsupported
from lnlm_ssm.layers.cache import InferenceCache
from lnlm_ssm.layers.embedding import check_token_ids
from lnlm_ssm.layers.quantized import QuantizedLinear, compute_dtype, quantization_of
from lnlm_ssm.models import registry
from lnlm_ssm.models.backbone import Backbone
from lnlm_ssm.models.base import PretrainedModel
from lnlm_ssm.models.config import PRESETS, MambaLMConfig
from lnlm_ssm.models.heads import causal_lm_loss, lm_logits
from lnlm_ssm.utils.checks import check_nonnegative_int, check_positive_int

__all__ = ["MambaLM", "MambaLMOutput"]


@dataclass
class MambaLMOutput:
    """``logits`` (batch, seqlen or num_last_tokens, vocab_size); ``loss`` when labels were given; the ``cache``."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    cache: Optional[InferenceCache] = None


class MambaLM(PretrainedModel):
    """A language model of Mamba-1, Mamba-2 and attention layers as ``config`` describes.

    ``backend`` is passed to every op of every layer that has a kernel for it,
    and "auto" (the fastest per device) to the others: ``backend="cpu"`` runs the
    scans, convs and decode steps on the C++ kernels and the norms, which have
    no C++ kernel, on their PyTorch one.
    """

    architecture = "MambaLM"
    main_weight = "backbone.embedding.weight"

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
        return cls(registry.preset(name, **overrides), device=device, dtype=dtype, backend=backend)

    def tied_weights(self) -> dict[str, str]:
        if not self.config.tie_embeddings:
            return {}
        tied = {"lm_head.weight": "backbone.embedding.weight"}
        if quantization_of(self) == "int8":
            tied["lm_head.weight_scale"] = "backbone.embedding.weight_scale"
        return tied

    def _init_weights(self) -> None:
        """The incumbent's initialisation (GPT-2 style, from the Mamba paper's code description).

        Embedding ~ N(0, 0.02); Linear biases zero (except those a mixer declares in
        ``keep_init``, such as Mamba's dt bias); every projection that writes into the
        residual stream (out_proj, fc2) re-drawn as nn.Linear's default and scaled by
        1/sqrt(n_layer * residuals per layer), so that the stream's variance does not
        grow with depth.
        """
        residuals_per_layer = 2 if self.config.d_intermediate > 0 else 1
        scale = 1.0 / math.sqrt(self.config.n_layer * residuals_per_layer)
        keep = declared_parameter_names(self.backbone.layers, "keep_init")
        with torch.no_grad():
            nn.init.normal_(self.backbone.embedding.weight, std=0.02)
            for name, module in self.backbone.layers.named_modules():
                if isinstance(module, nn.Linear) and module.bias is not None and f"{name}.bias" not in keep:
                    nn.init.zeros_(module.bias)
            for name, param in self.backbone.layers.named_parameters():
                if name.endswith(("out_proj.weight", "fc2.weight")):
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5))
                    param.mul_(scale)

    # -- inference state -----------------------------------------------------------------------

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, *, device=None, dtype=None, track_grad: bool = False
    ) -> InferenceCache:
        """Every layer's inference state for ``batch_size`` rows and up to ``max_seqlen`` positions (zeros).

        Defaults: the model's device and dtype (SSM states are kept in fp32 by the layers).
        ``track_grad``: forwards through the cache keep the autograd graph of its states
        (``layers.cache``), for training on a prefix run once (``objectives.dpo``).
        """
        check_positive_int("batch_size", batch_size)
        check_positive_int("max_seqlen", max_seqlen)
        embedding = self.backbone.embedding
        device = embedding.weight.device if device is None else torch.device(device)
        dtype = compute_dtype(embedding) if dtype is None else dtype
        layers = [
            block.mixer.allocate_cache(batch_size, max_seqlen, device=device, dtype=dtype)
            for block in self.backbone.layers
        ]
        return InferenceCache(layers, batch_size, max_seqlen, device, track_grad=track_grad)

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
        check_nonnegative_int("num_last_tokens (0: all positions)", num_last_tokens)
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

        if self.backbone.position_embedding is not None:
            hidden_states = hidden_states + self._position_embedding(position_ids, cache, batch, seqlen)
        hidden_states = self.backbone(hidden_states, caches, mask, position_ids)
        if cache is not None:
            cache.advance(seqlen)
        if num_last_tokens:
            hidden_states = hidden_states[:, -num_last_tokens:]
        logits = self._logits(hidden_states)
        loss = None if labels is None else causal_lm_loss(logits, labels, new_mask)
        return MambaLMOutput(logits=logits, loss=loss, cache=cache)

    def _position_embedding(self, position_ids, cache, batch: int, seqlen: int) -> torch.Tensor:
        """The learned position embedding (GPT-2's) of ``position_ids``, by default the positions after the cache's."""
        table = self.backbone.position_embedding
        if position_ids is None:
            past = 0 if cache is None else cache.seqlen
            position_ids = torch.arange(past, past + seqlen, device=table.weight.device).expand(batch, seqlen)
        check_token_ids(position_ids, table.num_embeddings, name="position_ids", size_name="max_position_embeddings")
        return table(position_ids)

    def decode_logits(self, input_ids: torch.Tensor, caches: list) -> torch.Tensor:
        """Logits (batch, vocab_size) of one decode step of ``input_ids`` (batch, 1) from the layer ``caches``.

        No mask and no positions: the new token is real and SSM layers need neither, so
        this is the step a CUDA graph captures (``generation``) for models without attention.
        """
        if self.backbone.position_embedding is not None:
            raise ValueError("decode_logits takes no positions, which a model with learned positions needs: use forward")
        hidden_states = self.backbone(self.backbone.embedding(input_ids), caches, None, None)
        return self._logits(hidden_states[:, -1])

    def fused_decoder(self, cache: InferenceCache) -> Callable[[torch.Tensor], torch.Tensor]:
        """The decode step with one call per block, on the CPU: ``step(input_ids (batch, 1)) -> logits (batch, vocab)``.

        Each call takes one new token per row through every block (``Backbone.fused_step``:
        the C++ block steps, float32 math; every projection, the embedding and the LM head
        may be quantised by ``quantize_``), advances ``cache`` by one position, and returns
        what ``model(input_ids, cache=cache).logits[:, -1]`` returns, within fp32
        rounding; the new tokens are real (no mask), as in ``generate``'s decode loop.
        It is built for one ``cache`` and reads the parameters as they are, except
        Mamba's ``-exp(A_log)``, taken when it is built. Raises ``FusedStepUnsupported``
        saying why for a model without one (not float32 on the CPU; a backend other
        than "auto" or "cpu"; a layer of a kind without a block step).
        """
        if self.backend not in ("auto", "cpu"):
            raise FusedStepUnsupported(f"the fused step runs the cpu kernels; this model's backend is {self.backend!r}")
        if self.backbone.position_embedding is not None:
            raise FusedStepUnsupported("the fused step has no learned position embedding")
        if not isinstance(cache, InferenceCache):
            raise TypeError(f"cache must be an InferenceCache (model.allocate_cache); got {type(cache).__name__}")
        hidden = self.backbone.fused_step(cache.layers)
        if not (
            (type(self.lm_head) is nn.Linear and self.lm_head.weight.dtype == torch.float32)
            or type(self.lm_head) is QuantizedLinear
        ):
            raise FusedStepUnsupported("the fused step needs a float32 nn.Linear LM head or its quantised one")

        @torch.no_grad()  # the C++ step has no backward
        def step(input_ids: torch.Tensor) -> torch.Tensor:
            if not isinstance(input_ids, torch.Tensor) or input_ids.shape != (cache.batch_size, 1):
                raise ValueError(
                    f"input_ids must be a tensor of shape (batch, 1) = ({cache.batch_size}, 1); got "
                    f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids!r}"
                )
            self._check_cache(cache, cache.batch_size, 1)
            past, positions, key_mask = cache.seqlen, None, None
            if self._has_attention:
                # As forward: the keys seen so far (if any was padding) and the new one, which is real;
                # the rotary position counts the real positions before it.
                key_mask = cache.mask_with(None, 1)
                positions = None if key_mask is None else key_mask.sum(dim=1) - 1
            logits = self._logits(hidden(input_ids[:, 0], past, positions, key_mask))
            cache.set_seqlen(past + 1)
            return logits

        return step

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids (batch, seqlen) and inputs_embeds (batch, seqlen, d_model)")
        if input_ids is not None:
            if isinstance(input_ids, torch.Tensor) and (input_ids.ndim != 2 or input_ids.shape[1] == 0):
                raise ValueError(f"input_ids must have shape (batch, seqlen >= 1); got {tuple(input_ids.shape)}")
            return self.backbone.embedding(input_ids)  # checks the ids' dtype and range
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
        return lm_logits(hidden_states, self.lm_head, self.config.vocab_size, self.backend)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Sample a continuation of ``input_ids``; the arguments are ``lnlm_ssm.generation.generate``'s."""
        return _generate(self, input_ids, **kwargs)


registry.register(
    MambaLM,
    MambaLMConfig,
    converters=(mamba_ssm.CONVERTER, hf_mamba.CONVERTER, hf_mamba2.CONVERTER, hf_llama.CONVERTER, hf_gpt2.CONVERTER),
    presets=PRESETS,
)
