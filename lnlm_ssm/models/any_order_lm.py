"""AnyOrderLM: a causal MambaLM (Mamba, Mamba-2, hybrid) trained and sampled in any order (σ-GPT, arXiv 2404.09562).

The sequence is read in a factorisation order z (a permutation of the
positions). Step t reads

    E[x_{z_t}] + P_in(z_t) + P_target(z_{t+1})

(the token, its position, and the position asked for next) and its logits are
the distribution of ``x_{z_{t+1}}``. The last step asks for no position
(``P_target`` contributes zero). With the identity order and both position
tables zero, this is exactly the wrapped MambaLM.

What the causal layers see under a permuted order: the stack is causal in the
order, not in the text. The depthwise causal conv of a Mamba layer mixes the
last ``d_conv`` *steps* — the tokens at positions z_{t-3}, ..., z_t, which are
in general not neighbours in the text — so its locality prior becomes a prior on
what was read last; where a token sits is known only through the position
embeddings added at the input. The SSM state summarises every step so far in
reading order, and attention layers of a hybrid apply RoPE at the step index t,
not at the position z_t. The PLM objective therefore reads the context in text
order (``data.permutation.factorisation_orders``), where the conv sees true
neighbours, and only the predicted tokens in a random order.

Parameter names: the MambaLM's under ``lm.`` (``lm.backbone.*``,
``lm.lm_head.weight``), then ``position_in.weight`` and ``position_target.weight``
(max_positions, d_model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lnlm_ssm.generation.any_order import check_order, generate_any_order, infill_canvas
from lnlm_ssm.layers.cache import InferenceCache
from lnlm_ssm.models import registry
from lnlm_ssm.models.base import PretrainedModel
from lnlm_ssm.models.causal_lm import MambaLM, MambaLMOutput
from lnlm_ssm.models.config import ConfigError, MambaLMConfig
from lnlm_ssm.utils.checks import check_positive_int

__all__ = ["AnyOrderLM", "AnyOrderLMConfig"]


@dataclass
class AnyOrderLMConfig(MambaLMConfig):
    """A MambaLMConfig and ``max_positions``, the rows of the two position tables (the longest sequence)."""

    max_positions: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            check_positive_int("max_positions", self.max_positions)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def backbone_config(self) -> MambaLMConfig:
        """The wrapped MambaLM's config: every field but ``max_positions``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(MambaLMConfig)}
        return MambaLMConfig.from_dict(fields)


class AnyOrderLM(PretrainedModel):
    """A MambaLM reading in any factorisation order, with input and target position embeddings (module docstring)."""

    architecture = "AnyOrderLM"
    main_weight = "lm.backbone.embedding.weight"

    def __init__(self, config: AnyOrderLMConfig, *, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, AnyOrderLMConfig):
            raise TypeError(f"config must be an AnyOrderLMConfig; got {type(config).__name__}")
        self.config = config
        self.lm = MambaLM(config.backbone_config(), device=device, dtype=dtype, backend=backend)
        factory = {"device": device, "dtype": dtype}
        self.position_in = nn.Embedding(config.max_positions, config.d_model, **factory)
        self.position_target = nn.Embedding(config.max_positions, config.d_model, **factory)
        with torch.no_grad():  # as the token embedding
            nn.init.normal_(self.position_in.weight, std=0.02)
            nn.init.normal_(self.position_target.weight, std=0.02)

    def tied_weights(self) -> dict[str, str]:
        return {f"lm.{copy}": f"lm.{source}" for copy, source in self.lm.tied_weights().items()}

    def allocate_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None) -> InferenceCache:
        """The wrapped MambaLM's inference state (``MambaLM.allocate_cache``)."""
        return self.lm.allocate_cache(batch_size, max_seqlen, device=device, dtype=dtype)

    def forward(
        self, input_ids: torch.Tensor, order=None, *, labels: Optional[torch.Tensor] = None
    ) -> MambaLMOutput:
        """Logits of ``input_ids`` (batch, seqlen), given in text order, read in ``order``.

        ``order`` (seqlen,) or (batch, seqlen): a permutation of ``0..seqlen-1``
        (default: the identity, a plain causal LM). ``logits[:, t]`` is the
        distribution of the token at position ``order[:, t + 1]``; the last step's
        logits predict nothing. ``labels`` (batch, seqlen), in text order like the
        input: the loss is the mean cross entropy of every step's prediction,
        ignoring -100.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a tensor of shape (batch, seqlen >= 1); got {input_ids!r:.80}")
        batch, seqlen = input_ids.shape
        if order is None:
            order = torch.arange(seqlen, device=input_ids.device)
        order = check_order(order, seqlen, batch, full=True).to(input_ids.device)
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
                raise ValueError(f"labels must be a tensor of shape (batch, seqlen) = {tuple(input_ids.shape)}")
            labels = labels.to(input_ids.device).gather(1, order)
        next_positions = torch.cat([order[:, 1:], order.new_full((batch, 1), -1)], dim=1)
        return self._run(input_ids.gather(1, order), order, next_positions, labels=labels)

    def ordered_logits(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        next_positions: torch.Tensor,
        *,
        cache: Optional[InferenceCache] = None,
        num_last_tokens: int = 0,
    ) -> torch.Tensor:
        """Logits (batch, steps, vocab) of ``tokens`` (batch, steps) already in reading order.

        ``positions``: where each token sits; ``next_positions``: the position each
        step predicts (-1: none). ``cache`` (``allocate_cache``) is continued and
        updated in place, as MambaLM's.
        """
        return self._run(tokens, positions, next_positions, cache=cache, num_last_tokens=num_last_tokens).logits

    def _run(self, tokens, positions, next_positions, *, labels=None, cache=None, num_last_tokens=0) -> MambaLMOutput:
        for name, t in (("positions", positions), ("next_positions", next_positions)):
            if not isinstance(t, torch.Tensor) or t.shape != tokens.shape:
                raise ValueError(f"{name} must be a tensor of shape {tuple(tokens.shape)} (as tokens)")
        limit = self.config.max_positions
        if positions.min() < 0 or next_positions.min() < -1:
            raise ValueError("positions must be >= 0 and next_positions >= -1 (-1: no next position)")
        if positions.max() >= limit or next_positions.max() >= limit:
            raise ValueError(
                f"positions must be below max_positions={limit}; got up to "
                f"{max(int(positions.max()), int(next_positions.max()))}: the sequence is too long for this model"
            )
        has_next = (next_positions >= 0).unsqueeze(-1)
        embeds = (
            self.lm.backbone.embedding(tokens)
            + self.position_in(positions)
            + self.position_target(next_positions.clamp_min(0)) * has_next
        )
        return self.lm(inputs_embeds=embeds, labels=labels, cache=cache, num_last_tokens=num_last_tokens)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, order, **sampling: Any) -> torch.Tensor:
        """``input_ids`` (batch, seqlen) with the positions ``order`` lists filled in that order; the others are
        kept. Arguments: ``generation.any_order.generate_any_order``'s (temperature, top_k, top_p, generator)."""
        return generate_any_order(self, input_ids, order, **sampling)

    def infill(self, prefix: torch.Tensor, suffix: torch.Tensor, length: int, **sampling: Any) -> torch.Tensor:
        """The ``length`` tokens (batch, length) between ``prefix`` (batch, p) and ``suffix`` (batch, s), filled
        left to right."""
        total = prefix.shape[1] + length + suffix.shape[1] if isinstance(prefix, torch.Tensor) else None
        if total is not None and isinstance(suffix, torch.Tensor) and total > self.config.max_positions:
            raise ValueError(
                f"prefix ({prefix.shape[1]}) + length ({length}) + suffix ({suffix.shape[1]}) = {total} positions; "
                f"this model has max_positions={self.config.max_positions}"
            )
        input_ids, order = infill_canvas(prefix, suffix, length)
        filled = self.generate(input_ids, order, **sampling)
        return filled[:, prefix.shape[1] : prefix.shape[1] + length]


_BYTE_VOCAB = 261  # the byte tokenizer's 257 ids and 4 special tokens
_TINY_MAMBA2 = {"layer": "Mamba2", "d_state": 32, "headdim": 32, "chunk_size": 64}
PRESETS: dict[str, dict[str, Any]] = {
    "mamba-plm-tiny": dict(
        d_model=128, n_layer=8, vocab_size=_BYTE_VOCAB, ssm_cfg={"layer": "Mamba1"}, max_positions=512
    ),
    "hybrid-plm-tiny": dict(
        d_model=128,
        n_layer=8,
        vocab_size=_BYTE_VOCAB,
        layer_pattern="MMMA",
        ssm_cfg=_TINY_MAMBA2,
        attn_cfg={"num_heads": 4, "head_dim": 32, "rotary_emb_dim": 32},
        max_positions=512,
    ),
}

registry.register(AnyOrderLM, AnyOrderLMConfig, presets=PRESETS)
