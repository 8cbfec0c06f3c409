"""A block's decode step as one call: the ``ops.block_step`` kernels bound to the layers' parameters and cache.

The model's ``Block`` is ``norm -> mixer (-> norm2 -> mlp)``; its decode step is
one ``mamba_block_step`` or ``mamba2_block_step`` (norm and mixer) and, with an
MLP, one ``mlp_block_step``. :func:`mixer_step` and :func:`mlp_step` check the
parameters and states once and return ``step(hidden_states, residual) -> (out,
new_residual)`` on ``(batch, d_model)`` rows; the decode loop calls that once per
block per token (``models.causal_lm.MambaLM.fused_decoder``).

The steps run the CPU kernels, in float32, for inference: they read the
parameters as they are when called, except ``A = -exp(A_log)``, which is taken
once here (parameters do not change during a decode loop). Layers without a
step (attention, an MLP with another activation, projections of another kind)
raise :class:`FusedStepUnsupported`, saying why; their model decodes unfused.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.layers.cache import Mamba2Cache, MambaCache
from lnlm_ssm.layers.mamba import Mamba
from lnlm_ssm.layers.mamba2 import Mamba2
from lnlm_ssm.layers.mlp import GatedMLP
from lnlm_ssm.layers.norm import LayerNorm, RMSNorm
from lnlm_ssm.layers.ssm import conv_weight
from lnlm_ssm.ops._backends import BackendUnavailableError
from lnlm_ssm.ops.block_step.interface import Step, prepare_block_step


class FusedStepUnsupported(ValueError):
    """The layer (or model) has no one-call decode step; the message says why."""


def _norm_params(norm: nn.Module) -> tuple:
    if isinstance(norm, RMSNorm):
        return norm.weight, None, norm.eps, True
    if isinstance(norm, LayerNorm):
        return norm.weight, norm.bias, norm.eps, False
    raise FusedStepUnsupported(f"the block norm {type(norm).__name__} has no fused step (RMSNorm and LayerNorm have)")


def projection(linear: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias) of a projection as a block step reads them: the one place a projection of another
    kind (a weight-only quantised one) would plug in, with a kernel for its format in the C++ ``project``."""
    if type(linear) is not nn.Linear:
        raise FusedStepUnsupported(f"{type(linear).__name__} projections have no fused step (nn.Linear has)")
    return linear.weight, linear.bias


def _check_float32(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise FusedStepUnsupported(
                f"the fused step runs float32 on the CPU; {type(module).__name__}.{name} is {p.dtype} on {p.device}"
            )


def _mamba_params(mixer: Mamba, cache: MambaCache) -> tuple:
    in_w, in_b = projection(mixer.in_proj)
    x_w, x_b = projection(mixer.x_proj)
    dt_w, dt_b = projection(mixer.dt_proj)
    out_w, out_b = projection(mixer.out_proj)
    if x_b is not None:
        raise FusedStepUnsupported("Mamba's x_proj has no bias in the fused step")
    with torch.no_grad():
        A = -torch.exp(mixer.A_log)
    return (
        in_w, in_b, conv_weight(mixer.conv1d), mixer.conv1d.bias, cache.conv_state, x_w, dt_w, dt_b, A, mixer.D,
        cache.ssm_state, out_w, out_b,
    )


def _mamba2_params(mixer: Mamba2, cache: Mamba2Cache) -> tuple:
    in_w, in_b = projection(mixer.in_proj)
    out_w, out_b = projection(mixer.out_proj)
    with torch.no_grad():
        A = -torch.exp(mixer.A_log)
    if mixer.rmsnorm:
        gate = (mixer.norm.weight, mixer.norm.eps, mixer.norm.group_size, mixer.norm.norm_before_gate)
    else:
        # No gated norm: the state update gates by silu(z); the other three are then unused.
        gate = (None, 1.0, mixer.d_inner, False)
    return (
        in_w, in_b, conv_weight(mixer.conv1d), mixer.conv1d.bias, cache.conv_state, mixer.dt_bias, A, mixer.D,
        cache.ssm_state, *mixer.dt_limit, *gate, out_w, out_b,
    )


def _prepare(op: str, params: tuple) -> Step:
    try:
        return prepare_block_step(op, params, backend="cpu")
    except BackendUnavailableError as err:
        raise FusedStepUnsupported(str(err)) from err


_MIXERS = {Mamba: ("mamba_block_step", _mamba_params), Mamba2: ("mamba2_block_step", _mamba2_params)}


def mixer_step(mixer: nn.Module, norm: nn.Module, cache) -> Step:
    """``norm -> mixer`` as one decode step on ``cache`` (the mixer's own, from ``allocate_cache``)."""
    if type(mixer) not in _MIXERS:
        raise FusedStepUnsupported(f"{type(mixer).__name__} layers have no fused step (Mamba and Mamba2 have)")
    _check_float32(mixer)
    _check_float32(norm)
    op, params = _MIXERS[type(mixer)]
    return _prepare(op, _norm_params(norm) + params(mixer, cache))


def mlp_step(mlp: nn.Module, norm: nn.Module) -> Step:
    """``norm -> mlp`` as one step (a GatedMLP with its default silu)."""
    if type(mlp) is not GatedMLP or mlp.activation is not F.silu:
        raise FusedStepUnsupported("only a GatedMLP with the silu activation has a fused step")
    _check_float32(mlp)
    _check_float32(norm)
    return _prepare("mlp_block_step", _norm_params(norm) + projection(mlp.fc1) + projection(mlp.fc2))
