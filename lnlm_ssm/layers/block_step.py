"""A decode step as one call: the ``ops.block_step`` kernels bound to the layers' parameters and caches.

The model's ``Block`` is ``norm -> mixer (-> norm2 -> mlp)``; its decode step is
one ``mamba_block_step``, ``mamba2_block_step`` or ``attention_block_step`` (norm and
mixer) and, with an MLP, one ``mlp_block_step``. :func:`mixer_step_params` and :func:`mlp_step_params`
give each its (op, params); :func:`decode_step` binds a token embedding, those
blocks and a final norm into ``step(input_ids (batch,)) -> (batch, d_model)``, one
C++ call per token (``ops.prepare_decode_step``), which the model's decode loop
calls (``models.causal_lm.MambaLM.fused_decoder``).

The steps run the CPU kernels, in float32, for inference: they read the
parameters as they are when called, except ``A = -exp(A_log)``, which is taken
once here (parameters do not change during a decode loop). A model quantised by
``lnlm_ssm.quantize_`` keeps its int8 or bf16 weights in every projection and
the embedding (the step widens them as it reads them, as the unfused forward's
kernels do). Layers without a step (another mixer, an MLP with another
activation, projections of another kind) raise :class:`FusedStepUnsupported`,
saying why; their model decodes op by op.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.layers.attention import Attention
from lnlm_ssm.layers.cache import AttentionCache, Mamba2Cache, MambaCache
from lnlm_ssm.layers.embedding import TokenEmbedding
from lnlm_ssm.layers.mamba import Mamba
from lnlm_ssm.layers.mamba2 import Mamba2
from lnlm_ssm.layers.mlp import GatedMLP
from lnlm_ssm.layers.norm import LayerNorm, RMSNorm
from lnlm_ssm.layers.quantized import QUANTIZED_MODULES, QuantizedEmbedding, QuantizedLinear
from lnlm_ssm.layers.ssm import conv_weight
from lnlm_ssm.ops._backends import BackendUnavailableError
from lnlm_ssm.ops.block_step.interface import prepare_decode_step

StepParams = tuple[str, tuple]  # (op name, its arguments after residual)


class FusedStepUnsupported(ValueError):
    """The layer (or model) has no one-call decode step; the message says why."""


def _norm_params(norm: nn.Module) -> tuple:
    if isinstance(norm, RMSNorm):
        return norm.weight, None, norm.eps, True
    if isinstance(norm, LayerNorm):
        return norm.weight, norm.bias, norm.eps, False
    raise FusedStepUnsupported(f"the norm {type(norm).__name__} has no fused step (RMSNorm and LayerNorm have)")


def projection(linear: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(weight, bias, scale) of a projection as a block step reads it: an ``nn.Linear``'s (scale None), or a
    ``QuantizedLinear``'s int8 weight and its scale, or bf16 weight (scale None)."""
    if type(linear) is QuantizedLinear:
        return linear.weight, linear.bias, linear.weight_scale
    if type(linear) is not nn.Linear:
        raise FusedStepUnsupported(f"{type(linear).__name__} projections have no fused step (nn.Linear has)")
    return linear.weight, linear.bias, None


def _check_float32(module: nn.Module) -> None:
    """Every parameter float32 on the CPU, but those of quantised modules (their formats are the ops' to check)."""
    quantized = {id(p) for m in module.modules() if isinstance(m, QUANTIZED_MODULES) for p in m.parameters()}
    for name, p in module.named_parameters():
        if id(p) in quantized:
            if p.device.type != "cpu":
                raise FusedStepUnsupported(f"the fused step runs on the CPU; {type(module).__name__}.{name} is on {p.device}")
            continue
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise FusedStepUnsupported(
                f"the fused step runs float32 on the CPU; {type(module).__name__}.{name} is {p.dtype} on {p.device}"
            )


def _mamba_params(mixer: Mamba, cache: MambaCache) -> tuple:
    in_w, in_b, in_s = projection(mixer.in_proj)
    x_w, x_b, x_s = projection(mixer.x_proj)
    dt_w, dt_b, dt_s = projection(mixer.dt_proj)
    out_w, out_b, out_s = projection(mixer.out_proj)
    if x_b is not None:
        raise FusedStepUnsupported("Mamba's x_proj has no bias in the fused step")
    with torch.no_grad():
        A = -torch.exp(mixer.A_log)
    return (
        in_w, in_b, conv_weight(mixer.conv1d), mixer.conv1d.bias, cache.conv_state, x_w, dt_w, dt_b, A, mixer.D,
        cache.ssm_state, out_w, out_b, in_s, x_s, dt_s, out_s,
    )


def _mamba2_params(mixer: Mamba2, cache: Mamba2Cache) -> tuple:
    in_w, in_b, in_s = projection(mixer.in_proj)
    out_w, out_b, out_s = projection(mixer.out_proj)
    with torch.no_grad():
        A = -torch.exp(mixer.A_log)
    if mixer.rmsnorm:
        gate = (mixer.norm.weight, mixer.norm.eps, mixer.norm.group_size, mixer.norm.norm_before_gate)
    else:
        # No gated norm: the state update gates by silu(z); the other three are then unused.
        gate = (None, 1.0, mixer.d_inner, False)
    return (
        in_w, in_b, conv_weight(mixer.conv1d), mixer.conv1d.bias, cache.conv_state, mixer.dt_bias, A, mixer.D,
        cache.ssm_state, *mixer.dt_limit, *gate, out_w, out_b, in_s, out_s,
    )


def _attention_params(mixer: Attention, cache: AttentionCache) -> tuple:
    in_w, in_b, in_s = projection(mixer.in_proj)
    out_w, out_b, out_s = projection(mixer.out_proj)
    return (
        in_w, in_b, cache.k, cache.v, mixer.num_heads, mixer.softmax_scale, mixer.sliding_window or 0,
        mixer.rotary_emb_dim, mixer.rotary_emb_base, mixer.rotary_emb_interleaved, out_w, out_b, in_s, out_s,
    )


_MIXERS = {
    Mamba: ("mamba_block_step", _mamba_params),
    Mamba2: ("mamba2_block_step", _mamba2_params),
    Attention: ("attention_block_step", _attention_params),
}


def mixer_step_params(mixer: nn.Module, norm: nn.Module, cache) -> StepParams:
    """``norm -> mixer`` as a block step on ``cache`` (the mixer's own, from ``allocate_cache``)."""
    if type(mixer) not in _MIXERS:
        raise FusedStepUnsupported(f"{type(mixer).__name__} layers have no fused step (Mamba, Mamba2, Attention have)")
    _check_float32(mixer)
    _check_float32(norm)
    op, params = _MIXERS[type(mixer)]
    return op, _norm_params(norm) + params(mixer, cache)


def mlp_step_params(mlp: nn.Module, norm: nn.Module) -> StepParams:
    """``norm -> mlp`` as a block step (a GatedMLP with its default silu)."""
    if type(mlp) is not GatedMLP or mlp.activation is not F.silu:
        raise FusedStepUnsupported("only a GatedMLP with the silu activation has a fused step")
    _check_float32(mlp)
    _check_float32(norm)
    fc1_w, fc1_b, fc1_s = projection(mlp.fc1)
    fc2_w, fc2_b, fc2_s = projection(mlp.fc2)
    return "mlp_block_step", _norm_params(norm) + (fc1_w, fc1_b, fc2_w, fc2_b, fc1_s, fc2_s)


def decode_step(embedding: nn.Module, blocks: list[StepParams], final_norm: nn.Module, *, timed: bool = False) -> Callable:
    """``step(input_ids (batch,), past, positions=None, key_mask=None) -> (batch, d_model)``: ``embedding``,
    the ``blocks`` and ``final_norm`` in one call per token, on the CPU kernels (the arguments after
    input_ids are the attention blocks'; ``timed``: see ``ops.prepare_decode_step``)."""
    if type(embedding) not in (TokenEmbedding, QuantizedEmbedding):
        raise FusedStepUnsupported(
            f"a {type(embedding).__name__} embedding has no fused step (TokenEmbedding and its quantised one have)"
        )
    _check_float32(embedding)
    _check_float32(final_norm)
    scale = embedding.weight_scale if type(embedding) is QuantizedEmbedding else None
    try:
        return prepare_decode_step(
            embedding.weight, embedding.vocab_size, blocks, _norm_params(final_norm), embedding_scale=scale,
            backend="cpu", timed=timed,
        )
    except BackendUnavailableError as err:
        raise FusedStepUnsupported(str(err)) from err
