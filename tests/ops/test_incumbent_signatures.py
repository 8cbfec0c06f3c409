"""Every public op of mamba_ssm and causal-conv1d is in lnlm_ssm.ops, with the incumbent's signature.

The table holds the incumbents' signatures as they declare them (state-spaces/mamba
and Dao-AILab/causal-conv1d, current releases). Ours must take the same parameters
in the same positional order with the same defaults; anything we add comes after
them, keyword-only. Names that exist in both with different signatures in two of
the incumbent's modules are listed under the lnlm_ssm name that serves each.
"""

import inspect
import math

import pytest

import lnlm_ssm.ops as ops

INF = math.inf
NONE = None

# (lnlm_ssm.ops name, incumbent module, incumbent signature)
INCUMBENT = [
    ("selective_scan_fn", "mamba_ssm.ops.selective_scan_interface",
     "u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False"),
    ("selective_scan_ref", "mamba_ssm.ops.selective_scan_interface",
     "u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False"),
    ("mamba_inner_fn", "mamba_ssm.ops.selective_scan_interface",
     "xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A, "
     "B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True, "
     "checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None, b_c_dt_rms_eps=1e-6"),
    ("mamba_inner_ref", "mamba_ssm.ops.selective_scan_interface",
     "xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A, "
     "B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True"),
    ("selective_state_update", "mamba_ssm.ops.triton.selective_state_update",
     "state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None"),
    ("selective_state_update_ref", "mamba_ssm.ops.triton.selective_state_update",
     "state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False"),
    ("mamba_chunk_scan_combined", "mamba_ssm.ops.triton.ssd_combined",
     "x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, "
     "cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, INF), return_final_states=False, return_varlen_states=False"),
    ("mamba_split_conv1d_scan_combined", "mamba_ssm.ops.triton.ssd_combined",
     "zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None, seq_idx=None, "
     "dt_limit=(0.0, INF), return_final_states=False, activation='silu', rmsnorm_weight=None, rmsnorm_eps=1e-6, "
     "outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True"),
    ("mamba_split_conv1d_scan_ref", "mamba_ssm.ops.triton.ssd_combined",
     "zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, dt_limit=(0.0, INF), activation='silu', "
     "rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1, "
     "norm_before_gate=True"),
    ("layer_norm_fn", "mamba_ssm.ops.triton.layer_norm",
     "x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0, rowscale=None, "
     "prenorm=False, residual_in_fp32=False, is_rms_norm=False, return_dropout_mask=False"),
    ("rms_norm_fn", "mamba_ssm.ops.triton.layer_norm",
     "x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0, rowscale=None, "
     "prenorm=False, residual_in_fp32=False, return_dropout_mask=False"),
    ("layer_norm_ref", "mamba_ssm.ops.triton.layer_norm",
     "x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0, rowscale=None, "
     "prenorm=False, dropout_mask=None, dropout_mask1=None, upcast=False"),
    ("rms_norm_ref", "mamba_ssm.ops.triton.layer_norm",
     "x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0, rowscale=None, "
     "prenorm=False, dropout_mask=None, dropout_mask1=None, upcast=False"),
    ("rmsnorm_fn", "mamba_ssm.ops.triton.layernorm_gated",
     "x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True"),
    ("layernorm_fn", "mamba_ssm.ops.triton.layernorm_gated",
     "x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, is_rms_norm=False"),
    # layernorm_gated's own rms_norm_ref, served under another name (see lnlm_ssm.compat).
    ("rms_norm_gated_ref", "mamba_ssm.ops.triton.layernorm_gated",
     "x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, upcast=True"),
    ("causal_conv1d_fn", "causal_conv1d.causal_conv1d_interface",
     "x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False, final_states_out=None, "
     "activation=None"),
    ("causal_conv1d_ref", "causal_conv1d.causal_conv1d_interface",
     "x, weight, bias=None, initial_states=None, return_final_states=False, final_states_out=None, activation=None"),
    ("causal_conv1d_update", "causal_conv1d.causal_conv1d_interface",
     "x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None"),
    ("causal_conv1d_update_ref", "causal_conv1d.causal_conv1d_interface",
     "x, conv_state, weight, bias=None, activation=None, cache_seqlens=None"),
    ("causal_conv1d_varlen_states", "causal_conv1d.causal_conv1d_varlen", "x, cu_seqlens, state_len"),
    ("causal_conv1d_varlen_states_ref", "causal_conv1d.causal_conv1d_varlen", "x, cu_seqlens, state_len"),
]


def parse(signature: str) -> list[tuple[str, object]]:
    """[(name, default or inspect.Parameter.empty)] of a def's parameter list."""
    namespace: dict = {}
    exec(f"def f({signature}): pass", {"INF": INF}, namespace)
    return [(p.name, p.default) for p in inspect.signature(namespace["f"]).parameters.values()]


def same_default(ours, theirs) -> bool:
    if isinstance(theirs, tuple):
        return isinstance(ours, tuple) and tuple(ours) == theirs
    return type(ours) is type(theirs) and ours == theirs or ours is theirs


@pytest.mark.parametrize("name, module, signature", INCUMBENT, ids=[row[0] for row in INCUMBENT])
def test_signature_is_the_incumbents(name, module, signature):
    assert hasattr(ops, name), f"lnlm_ssm.ops has no {name} ({module})"
    params = list(inspect.signature(getattr(ops, name)).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extras = params[len(positional):]
    expected = parse(signature)
    assert [p.name for p in positional] == [n for n, _ in expected], f"{name}: positional order differs from {module}"
    for p, (_, default) in zip(positional, expected):
        assert same_default(p.default, default), f"{name}({p.name}=...): default {p.default!r}, {module} has {default!r}"
    for p in extras:
        assert p.kind is p.KEYWORD_ONLY, f"{name}: our addition {p.name} must be keyword-only"


def test_every_public_op_of_the_incumbents_is_in_the_table():
    """The ops the issue names, so that a row cannot silently drop out of the table."""
    names = {row[0] for row in INCUMBENT}
    assert {
        "selective_scan_fn", "mamba_inner_fn", "selective_state_update", "mamba_chunk_scan_combined",
        "mamba_split_conv1d_scan_combined", "rms_norm_fn", "layer_norm_fn", "rmsnorm_fn", "layernorm_fn",
        "causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_varlen_states",
    } <= names
