"""Decode steps of whole blocks, one call each: ``mamba_block_step``, ``mamba2_block_step``, ``mlp_block_step``,
``attention_block_step``.

A decode step of a block is some twenty small ops (the norm, the projections,
the conv and state updates or the attention, and the glue between them). Called one by one
from Python, each pays its interpreter, argument checks and dispatch on top of its
work: for a 130M Mamba on two cores that added up to about a third of a token's
time. These ops do a block's whole step in one call; the CPU kernel
(``csrc/cpu/block_step.cpp``) is made of the kernels the unfused step calls, and
``reference.py`` states what it computes.

Each op comes in two forms:

- the function, e.g. ``mamba_block_step(hidden_states, residual, *params, backend=)``,
  which checks every argument on every call;
- ``prepare_block_step(op, params, backend=) -> step``, which checks the parameters
  and states once and returns ``step(hidden_states, residual) -> (out, new_residual)``
  that checks only its two inputs (not for ``attention_block_step``, whose cache slot,
  positions and key mask change with every step).

and ``prepare_decode_step(embedding, vocab_size, blocks, final_norm) -> step`` binds a
whole decode step: the token embedding, the blocks in turn and the final norm,
``step(input_ids (batch,)) -> (batch, d_model)``, on the CPU in one C++ call (what a
decode loop calls once per token: from Python, one call per block cost ~25 us each).

``params`` are the function's arguments after ``residual``, in order (the
references' signatures). Float32 on the CPU only (the "cpu" kernel; the reference
runs anywhere), but for weight-only quantised weights (``lnlm_ssm.quantize_``'s int8
with a per-row scale, or bf16) in Mamba-1's projections and the embedding, whose
kernel reads them as ``weight_only_linear`` does; inference only: a call that would
need a backward raises.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from lnlm_ssm.ops._backends import backend_for, register, resolve
from lnlm_ssm.ops._checks import Shapes
from lnlm_ssm.ops.block_step.reference import (
    BLOCK_STEPS,
    add_norm_ref,
    attention_block_step_ref,
    call_block_step,
    decode_positions,
    decode_step_ref,
    embed_ref,
    mamba2_block_step_ref,
    mamba_block_step_ref,
    mlp_block_step_ref,
)

register("mamba_block_step", {"reference": mamba_block_step_ref, "cpu": "lnlm_ssm.ops.block_step.cpu:mamba_block_step_cpu"})
register(
    "mamba2_block_step", {"reference": mamba2_block_step_ref, "cpu": "lnlm_ssm.ops.block_step.cpu:mamba2_block_step_cpu"}
)
register("mlp_block_step", {"reference": mlp_block_step_ref, "cpu": "lnlm_ssm.ops.block_step.cpu:mlp_block_step_cpu"})
register(
    "attention_block_step",
    {"reference": attention_block_step_ref, "cpu": "lnlm_ssm.ops.block_step.cpu:attention_block_step_cpu"},
)


def _bind_decode_step_ref(embedding, embedding_scale, vocab_size, blocks, final_norm, timed):
    if not timed:
        return lambda input_ids, past=0, positions=None, key_mask=None: decode_step_ref(
            input_ids, embedding, vocab_size, blocks, final_norm, past, positions, key_mask, embedding_scale
        )

    def timed_step(input_ids, past=0, positions=None, key_mask=None):
        # decode_step_ref, part by part, each timed.
        context = (past, decode_positions(input_ids, past, positions), key_mask)
        t0 = time.perf_counter()
        hidden, residual = embed_ref(input_ids, embedding, vocab_size, embedding_scale), None
        seconds = [time.perf_counter() - t0]
        for op, params in blocks:
            t0 = time.perf_counter()
            hidden, residual = call_block_step(BLOCK_STEPS[op], op, hidden, residual, params, context)
            seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = add_norm_ref(hidden, residual, *final_norm)[0]
        seconds.append(time.perf_counter() - t0)
        return out, torch.tensor(seconds, dtype=torch.float64)

    return timed_step


# Its kernels bind: (embedding, embedding_scale, vocab_size, blocks, final_norm, timed) -> step(input_ids, past, positions, key_mask).
register("decode_step", {"reference": _bind_decode_step_ref, "cpu": "lnlm_ssm.ops.block_step.cpu:bind_decode_step_cpu"})

NO_BACKWARD = (
    "the block steps are for inference and have no backward: call them under torch.no_grad() "
    "(or with tensors that do not require grad)"
)

Step = Callable[[torch.Tensor, Optional[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def _check_fp32(named: dict) -> None:
    for name, t in named.items():
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (the block steps compute in fp32), got {t.dtype}")


def _floating(weight) -> bool:
    """Whether Shapes.bind should ask ``weight`` for a float dtype: not for an int8 (quantised) one."""
    return not (isinstance(weight, torch.Tensor) and weight.dtype == torch.int8)


def _check_weight_format(name: str, weight, scale_name: str, scale) -> None:
    """A weight float32 (scale None), or weight-only quantised: int8 with its fp32 scale (out,), or bf16 (None)."""
    if weight.dtype == torch.int8:
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.shape != weight.shape[:1]:
            got = "None" if not isinstance(scale, torch.Tensor) else f"{scale.dtype} {tuple(scale.shape)}"
            raise ValueError(f"{scale_name} must be a float32 ({weight.shape[0]},) tensor for an int8 {name}, got {got}")
        if not scale.is_contiguous():
            raise ValueError(f"{scale_name} must be contiguous, got strides {scale.stride()}")
    elif weight.dtype in (torch.float32, torch.bfloat16):
        if scale is not None:
            raise ValueError(f"{scale_name} must be None for a {weight.dtype} {name} (int8 weights have one)")
    else:
        raise TypeError(f"{name} must be float32, or int8 or bfloat16 (weight-only quantised), got {weight.dtype}")


def _check_weight_formats(**projections) -> None:
    """``_check_weight_format`` of each projection: name=(weight, scale)."""
    for name, (weight, scale) in projections.items():
        _check_weight_format(f"{name}_weight", weight, f"{name}_scale", scale)


def _check_norm(shapes: Shapes, norm_weight, norm_bias, norm_eps, rms_norm) -> None:
    shapes.bind("norm_weight", norm_weight, ("d_model",))
    shapes.bind_optional("norm_bias", norm_bias, ("d_model",))
    if not isinstance(norm_eps, (int, float)) or isinstance(norm_eps, bool) or not norm_eps > 0:
        raise ValueError(f"norm_eps must be a number > 0, got {norm_eps!r}")
    if not isinstance(rms_norm, bool):
        raise TypeError(f"rms_norm must be a bool (True: RMSNorm, False: LayerNorm), got {rms_norm!r}")


def _check_out(name: str, value: int, rule: str, expected: int) -> None:
    if value != expected:
        raise ValueError(f"{name} must have {rule} = {expected} outputs, got {value}")


def _check_conv_state(shapes: Shapes, conv_state, channels: str) -> None:
    shapes.bind("conv_state", conv_state, ("batch", channels, "state_len"))
    if shapes["state_len"] < shapes["width"] - 1:
        raise ValueError(
            f"conv_state must hold at least width - 1 = {shapes['width'] - 1} inputs, got shape {tuple(conv_state.shape)}"
        )


def _check_mamba(
    norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, conv_weight, conv_bias, conv_state,
    x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, ssm_state, out_proj_weight, out_proj_bias, in_proj_scale=None,
    x_proj_scale=None, dt_proj_scale=None, out_proj_scale=None,
) -> Shapes:
    shapes = Shapes()
    _check_norm(shapes, norm_weight, norm_bias, norm_eps, rms_norm)
    shapes.bind("in_proj_weight", in_proj_weight, ("in_proj_out", "d_model"), floating=_floating(in_proj_weight))
    shapes.bind_optional("in_proj_bias", in_proj_bias, ("in_proj_out",))
    shapes.bind("conv_weight", conv_weight, ("d_inner", "width"))
    shapes.bind_optional("conv_bias", conv_bias, ("d_inner",))
    _check_conv_state(shapes, conv_state, "d_inner")
    shapes.bind("ssm_state", ssm_state, ("batch", "d_inner", "d_state"))
    shapes.bind("x_proj_weight", x_proj_weight, ("x_proj_out", "d_inner"), floating=_floating(x_proj_weight))
    shapes.bind("dt_proj_weight", dt_proj_weight, ("d_inner", "dt_rank"), floating=_floating(dt_proj_weight))
    shapes.bind("dt_proj_bias", dt_proj_bias, ("d_inner",))
    shapes.bind("A", A, ("d_inner", "d_state"))
    shapes.bind("D", D, ("d_inner",))
    shapes.bind("out_proj_weight", out_proj_weight, ("d_model", "d_inner"), floating=_floating(out_proj_weight))
    shapes.bind_optional("out_proj_bias", out_proj_bias, ("d_model",))
    d_inner = shapes["d_inner"]
    _check_out("in_proj_weight", shapes["in_proj_out"], "2 * d_inner", 2 * d_inner)
    _check_out("x_proj_weight", shapes["x_proj_out"], "dt_rank + 2 * d_state", shapes["dt_rank"] + 2 * shapes["d_state"])
    _check_fp32(dict(
        norm_weight=norm_weight, norm_bias=norm_bias, in_proj_bias=in_proj_bias, conv_weight=conv_weight,
        conv_bias=conv_bias, conv_state=conv_state, dt_proj_bias=dt_proj_bias, A=A, D=D, ssm_state=ssm_state,
        out_proj_bias=out_proj_bias,
    ))
    _check_weight_formats(
        in_proj=(in_proj_weight, in_proj_scale), x_proj=(x_proj_weight, x_proj_scale),
        dt_proj=(dt_proj_weight, dt_proj_scale), out_proj=(out_proj_weight, out_proj_scale),
    )
    # The kernel walks these channel by channel as flat arrays (the caches of allocate_cache are).
    contiguous = dict(conv_weight=conv_weight, conv_bias=conv_bias, conv_state=conv_state, x_proj_weight=x_proj_weight,
                      dt_proj_weight=dt_proj_weight, dt_proj_bias=dt_proj_bias, A=A, D=D, ssm_state=ssm_state)
    for name, t in contiguous.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    return shapes


def _check_mamba2(
    norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, conv_weight, conv_bias, conv_state,
    dt_bias, A, D, ssm_state, dt_min, dt_max, gate_norm_weight, gate_norm_eps, gate_norm_group_size,
    norm_before_gate, out_proj_weight, out_proj_bias, in_proj_scale=None, out_proj_scale=None,
) -> Shapes:
    shapes = Shapes()
    _check_norm(shapes, norm_weight, norm_bias, norm_eps, rms_norm)
    shapes.bind("in_proj_weight", in_proj_weight, ("in_proj_out", "d_model"), floating=_floating(in_proj_weight))
    shapes.bind_optional("in_proj_bias", in_proj_bias, ("in_proj_out",))
    shapes.bind("conv_weight", conv_weight, ("conv_dim", "width"))
    shapes.bind_optional("conv_bias", conv_bias, ("conv_dim",))
    _check_conv_state(shapes, conv_state, "conv_dim")
    shapes.bind("ssm_state", ssm_state, ("batch", "nheads", "headdim", "d_state"))
    shapes.bind("dt_bias", dt_bias, ("nheads",))
    shapes.bind("A", A, ("nheads",))
    shapes.bind("out_proj_weight", out_proj_weight, ("d_model", "d_inner"), floating=_floating(out_proj_weight))
    shapes.bind_optional("out_proj_bias", out_proj_bias, ("d_model",))
    nheads, d_inner, d_state = shapes["nheads"], shapes["d_inner"], shapes["d_state"]
    if d_inner != nheads * shapes["headdim"]:
        raise ValueError(
            f"out_proj_weight must read d_inner = nheads * headdim = {nheads * shapes['headdim']} channels "
            f"(from ssm_state), got {d_inner}"
        )
    # D per head, or per channel (mamba_ssm's D_has_hdim).
    per_head = isinstance(D, torch.Tensor) and D.ndim == 1 and D.shape[0] == nheads
    shapes.bind("D", D, ("nheads",) if per_head else ("d_inner",))
    group_width = shapes["conv_dim"] - d_inner
    ngroups = group_width // (2 * d_state)
    if group_width <= 0 or group_width != 2 * ngroups * d_state or nheads % ngroups:
        raise ValueError(
            f"conv_weight must have d_inner + 2 * ngroups * d_state channels with ngroups dividing nheads = {nheads} "
            f"(d_inner = {d_inner}, d_state = {d_state}), got {shapes['conv_dim']}"
        )
    _check_out("in_proj_weight", shapes["in_proj_out"], "d_inner + conv_dim + nheads", d_inner + shapes["conv_dim"] + nheads)
    if not 0 <= dt_min <= dt_max:
        raise ValueError(f"dt_min and dt_max must satisfy 0 <= dt_min <= dt_max ((0, inf): none), got {dt_min}, {dt_max}")
    if gate_norm_weight is not None:
        shapes.bind("gate_norm_weight", gate_norm_weight, ("d_inner",))
        if isinstance(gate_norm_group_size, bool) or not isinstance(gate_norm_group_size, int) or (
            gate_norm_group_size <= 0 or d_inner % gate_norm_group_size
        ):
            raise ValueError(f"gate_norm_group_size must divide d_inner = {d_inner}, got {gate_norm_group_size!r}")
        if not gate_norm_eps > 0:
            raise ValueError(f"gate_norm_eps must be > 0, got {gate_norm_eps!r}")
    _check_fp32(dict(
        norm_weight=norm_weight, norm_bias=norm_bias, in_proj_bias=in_proj_bias, conv_weight=conv_weight,
        conv_bias=conv_bias, conv_state=conv_state, dt_bias=dt_bias, A=A, D=D, ssm_state=ssm_state,
        gate_norm_weight=gate_norm_weight, out_proj_bias=out_proj_bias,
    ))
    _check_weight_formats(in_proj=(in_proj_weight, in_proj_scale), out_proj=(out_proj_weight, out_proj_scale))
    return shapes


def _check_mlp(
    norm_weight, norm_bias, norm_eps, rms_norm, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_scale=None,
    fc2_scale=None,
) -> Shapes:
    shapes = Shapes()
    _check_norm(shapes, norm_weight, norm_bias, norm_eps, rms_norm)
    shapes.bind("fc1_weight", fc1_weight, ("fc1_out", "d_model"), floating=_floating(fc1_weight))
    shapes.bind_optional("fc1_bias", fc1_bias, ("fc1_out",))
    shapes.bind("fc2_weight", fc2_weight, ("d_model", "hidden"), floating=_floating(fc2_weight))
    shapes.bind_optional("fc2_bias", fc2_bias, ("d_model",))
    _check_out("fc1_weight", shapes["fc1_out"], "2 * hidden (value and gate)", 2 * shapes["hidden"])
    _check_fp32(dict(norm_weight=norm_weight, norm_bias=norm_bias, fc1_bias=fc1_bias, fc2_bias=fc2_bias))
    _check_weight_formats(fc1=(fc1_weight, fc1_scale), fc2=(fc2_weight, fc2_scale))
    return shapes


def _check_attention(
    norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, k_cache, v_cache, num_heads,
    softmax_scale, sliding_window, rotary_dim, rotary_base, rotary_interleaved, out_proj_weight, out_proj_bias,
    in_proj_scale=None, out_proj_scale=None,
) -> Shapes:
    shapes = Shapes()
    _check_norm(shapes, norm_weight, norm_bias, norm_eps, rms_norm)
    shapes.bind("in_proj_weight", in_proj_weight, ("in_proj_out", "d_model"), floating=_floating(in_proj_weight))
    shapes.bind_optional("in_proj_bias", in_proj_bias, ("in_proj_out",))
    shapes.bind("k_cache", k_cache, ("batch", "max_seqlen", "num_heads_kv", "head_dim"))
    shapes.bind("v_cache", v_cache, ("batch", "max_seqlen", "num_heads_kv", "head_dim"))
    shapes.bind("out_proj_weight", out_proj_weight, ("d_model", "attention_width"), floating=_floating(out_proj_weight))
    shapes.bind_optional("out_proj_bias", out_proj_bias, ("d_model",))
    heads_kv, head_dim = shapes["num_heads_kv"], shapes["head_dim"]
    for name, value in (("num_heads", num_heads), ("sliding_window", sliding_window), ("rotary_dim", rotary_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "num_heads" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'num_heads' else 0}, got {value!r}")
    if num_heads % heads_kv:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of the caches' num_heads_kv ({heads_kv})")
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and in [0, head_dim={head_dim}], got {rotary_dim}")
    for name, value in (("softmax_scale", softmax_scale), ("rotary_base", rotary_base)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    _check_out("in_proj_weight", shapes["in_proj_out"], "(num_heads + 2 * num_heads_kv) * head_dim",
               (num_heads + 2 * heads_kv) * head_dim)
    if shapes["attention_width"] != num_heads * head_dim:
        raise ValueError(f"out_proj_weight must read num_heads * head_dim = {num_heads * head_dim} channels, "
                         f"got {shapes['attention_width']}")
    _check_fp32(dict(
        norm_weight=norm_weight, norm_bias=norm_bias, in_proj_bias=in_proj_bias, k_cache=k_cache, v_cache=v_cache,
        out_proj_bias=out_proj_bias,
    ))
    _check_weight_formats(in_proj=(in_proj_weight, in_proj_scale), out_proj=(out_proj_weight, out_proj_scale))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    return shapes


def _check_context(shapes: Shapes, past, positions, key_mask) -> None:
    """An attention step's per-step arguments."""
    if isinstance(past, bool) or not isinstance(past, int) or not 0 <= past < shapes["max_seqlen"]:
        raise ValueError(f"past must be an int in [0, max_seqlen={shapes['max_seqlen']}), got {past!r}")
    if positions is not None:
        shapes.bind("positions", positions, ("batch",), floating=False)
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor (batch, past + 1), got {key_mask!r}")
        if key_mask.shape != (shapes["batch"], past + 1):
            raise ValueError(
                f"key_mask has shape {tuple(key_mask.shape)}, but must be (batch, past + 1) = ({shapes['batch']}, {past + 1})"
            )


_CHECKS = {
    "mamba_block_step": _check_mamba,
    "mamba2_block_step": _check_mamba2,
    "mlp_block_step": _check_mlp,
    "attention_block_step": _check_attention,
}


def prepare_block_step(op: str, params: tuple, *, backend: str = "auto") -> Step:
    """``op``'s step with ``params`` bound, checked once: ``step(hidden_states, residual) -> (out, new_residual)``.

    ``op`` is "mamba_block_step", "mamba2_block_step" or "mlp_block_step"; ``params``
    its arguments after ``residual``, in order. The step updates the states among
    ``params`` in place, and checks only the shapes and dtypes of its two inputs
    (hidden_states (batch, d_model) float32, residual the same or None; the MLP's
    residual is required).
    """
    if op not in _CHECKS or op == "attention_block_step":
        raise ValueError(
            f"op must be one of {tuple(k for k in _CHECKS if k != 'attention_block_step')}, got {op!r} "
            "(an attention step takes per-step arguments: attention_block_step or prepare_decode_step)"
        )
    shapes = _CHECKS[op](*params)
    batch = shapes["batch"] if "batch" in shapes.sizes else None
    d_model = shapes["d_model"]
    kernel = resolve(op, backend_for(op, backend), shapes.device, dtype=torch.float32)
    params_need_grad = any(isinstance(p, torch.Tensor) and p.requires_grad for p in params)
    residual_required = op == "mlp_block_step"

    def step(hidden_states: torch.Tensor, residual: Optional[torch.Tensor]):
        for name, t in (("hidden_states", hidden_states), ("residual", residual)):
            if t is None and (name == "hidden_states" or residual_required):
                raise TypeError(f"{op}: {name} must be a tensor (batch, d_model), got None")
            if t is not None and (
                t.dtype != torch.float32 or t.ndim != 2 or t.shape[1] != d_model or (batch is not None and t.shape[0] != batch)
            ):
                rows = "batch" if batch is None else batch
                raise ValueError(
                    f"{op}: {name} must be float32 of shape ({rows}, d_model={d_model}), "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
        if torch.is_grad_enabled() and (
            params_need_grad or hidden_states.requires_grad or (residual is not None and residual.requires_grad)
        ):
            raise RuntimeError(f"{op}: {NO_BACKWARD}")
        return kernel(hidden_states, residual, *params)

    return step


def mamba_block_step(
    hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, conv_weight,
    conv_bias, conv_state, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, ssm_state, out_proj_weight,
    out_proj_bias, in_proj_scale=None, x_proj_scale=None, dt_proj_scale=None, out_proj_scale=None, *,
    backend: str = "auto",
):
    """One decode step of a norm + Mamba-1 block: returns (out, new_residual), updates the states in place.

    Arguments and semantics: ``reference.py`` (the glossary there); the scales are those of
    int8 projection weights (weight-only quantised), None for float32 and bf16 ones.
    """
    params = (
        norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, conv_weight, conv_bias, conv_state,
        x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, ssm_state, out_proj_weight, out_proj_bias, in_proj_scale,
        x_proj_scale, dt_proj_scale, out_proj_scale,
    )
    return prepare_block_step("mamba_block_step", params, backend=backend)(hidden_states, residual)


def mamba2_block_step(
    hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, conv_weight,
    conv_bias, conv_state, dt_bias, A, D, ssm_state, dt_min, dt_max, gate_norm_weight, gate_norm_eps,
    gate_norm_group_size, norm_before_gate, out_proj_weight, out_proj_bias, in_proj_scale=None, out_proj_scale=None,
    *, backend: str = "auto",
):
    """One decode step of a norm + Mamba-2 block: returns (out, new_residual), updates the states in place.

    Arguments and semantics: ``reference.py``; (dt_min, dt_max) = (0, inf) is no dt limit;
    the scales are those of int8 projection weights, None for float32 and bf16 ones.
    """
    params = (
        norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, conv_weight, conv_bias, conv_state,
        dt_bias, A, D, ssm_state, float(dt_min), float(dt_max), gate_norm_weight, gate_norm_eps,
        gate_norm_group_size, norm_before_gate, out_proj_weight, out_proj_bias, in_proj_scale, out_proj_scale,
    )
    return prepare_block_step("mamba2_block_step", params, backend=backend)(hidden_states, residual)


def mlp_block_step(
    hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
    fc1_scale=None, fc2_scale=None, *, backend: str = "auto",
):
    """One step of a norm2 + GatedMLP (silu) block: returns (out, new_residual).

    Arguments and semantics: ``reference.py``; the scales are those of int8 weights.
    """
    params = (norm_weight, norm_bias, norm_eps, rms_norm, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_scale, fc2_scale)
    return prepare_block_step("mlp_block_step", params, backend=backend)(hidden_states, residual)


def attention_block_step(
    hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, k_cache,
    v_cache, past, positions, key_mask, num_heads, softmax_scale, sliding_window, rotary_dim, rotary_base,
    rotary_interleaved, out_proj_weight, out_proj_bias, in_proj_scale=None, out_proj_scale=None, *,
    backend: str = "auto",
):
    """One decode step of a norm + attention block: returns (out, new_residual), writes the caches at ``past``.

    Arguments and semantics: ``reference.py``; ``positions`` (batch,) int64 (None:
    ``past`` for every row), ``key_mask`` (batch, past + 1) bool or None (all real),
    ``sliding_window`` 0 for none; the scales are those of int8 projection weights.
    """
    params = (
        norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, k_cache, v_cache, num_heads,
        softmax_scale, sliding_window, rotary_dim, rotary_base, rotary_interleaved, out_proj_weight, out_proj_bias,
        in_proj_scale, out_proj_scale,
    )
    shapes = _check_attention(*params)
    for name, t in (("hidden_states", hidden_states), ("residual", residual)):
        if t is not None:
            shapes.bind(name, t, ("batch", "d_model"))
            _check_fp32({name: t})
    positions = decode_positions(hidden_states[:, 0], past, positions)
    _check_context(shapes, past, positions, key_mask)
    if torch.is_grad_enabled() and any(isinstance(p, torch.Tensor) and p.requires_grad for p in params + (hidden_states, residual)):
        raise RuntimeError(f"attention_block_step: {NO_BACKWARD}")
    kernel = resolve("attention_block_step", backend_for("attention_block_step", backend), shapes.device,
                     dtype=torch.float32)
    return call_block_step(kernel, "attention_block_step", hidden_states, residual, params,
                           (past, positions.to(torch.int64), key_mask))


def prepare_decode_step(
    embedding: torch.Tensor, vocab_size: int, blocks: list, final_norm: tuple, *, embedding_scale=None,
    backend: str = "auto", timed: bool = False,
) -> Callable:
    """A whole decode step, checked once:
    ``step(input_ids (batch,), past, positions=None, key_mask=None) -> (batch, d_model)``.

    The token embedding ``embedding`` (padded_vocab_size, d_model) of ids in
    ``[0, vocab_size)``; ``blocks``, (op, params) pairs, each op's arguments after
    ``residual`` (an attention block's without past, positions and key_mask), in order
    (the first not an MLP: it needs the residual of a block before it), their states
    updated in place; ``final_norm`` (weight, bias, eps, rms_norm) of the last block's
    output plus its residual. The step's ``past`` (the new position's cache slot),
    ``positions`` (batch,) int64 (its rotary positions; None: past) and ``key_mask``
    (batch, past + 1) bool (the real keys; None: all) are for the attention blocks, and
    are checked by the kernel. See ``decode_step_ref``. The embedding may be weight-only
    quantised as the blocks' projections may: int8 with ``embedding_scale``
    (padded_vocab_size,), or bf16. With ``timed`` the step returns
    ``(out, seconds)``, seconds (2 + len(blocks),) float64: the time of the embedding,
    of each block, and of the final norm (for benchmarks).
    """
    shapes = Shapes()
    shapes.bind("embedding", embedding, ("padded_vocab_size", "d_model"), floating=_floating(embedding))
    _check_weight_format("embedding", embedding, "embedding_scale", embedding_scale)
    if not embedding.is_contiguous():
        raise ValueError(f"embedding must be contiguous, got strides {embedding.stride()}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= embedding.shape[0]:
        raise ValueError(f"vocab_size must be an int in [1, padded_vocab_size={embedding.shape[0]}], got {vocab_size!r}")
    if not blocks:
        raise ValueError("blocks must hold at least one (op, params) pair")
    if blocks[0][0] == "mlp_block_step":
        raise ValueError("blocks must not start with an MLP block: it needs the residual of a block before it")
    for i, (op, params) in enumerate(blocks):
        if op not in _CHECKS:
            raise ValueError(f"blocks[{i}]: op must be one of {tuple(_CHECKS)}, got {op!r}")
        block = _CHECKS[op](*params)
        for name in ("d_model", "batch"):
            if name in block.sizes and shapes.sizes.setdefault(name, block[name]) != block[name]:
                raise ValueError(f"blocks[{i}] ({op}) has {name} = {block[name]}, the blocks before it {shapes[name]}")
    _check_norm(shapes, *final_norm)
    _check_fp32(dict(zip(("final norm weight", "final norm bias"), final_norm[:2])))
    bind = resolve("decode_step", backend_for("decode_step", backend), shapes.device, dtype=torch.float32)
    return bind(embedding, embedding_scale, vocab_size, blocks, final_norm, timed)
