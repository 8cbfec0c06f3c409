"""Functional ops, named as in mamba_ssm / causal_conv1d so that imports can switch.

Each public op takes a keyword-only ``backend="auto"``; see ``_backends.py``.
"""

from lnlm_ssm.ops._backends import BackendUnavailableError, available_backends, backend_report
from lnlm_ssm.ops.block_step.interface import (
    attention_block_step,
    mamba2_block_step,
    mamba_block_step,
    mlp_block_step,
    prepare_block_step,
    prepare_decode_step,
)
from lnlm_ssm.ops.block_step.reference import (
    attention_block_step_ref,
    decode_step_ref,
    mamba2_block_step_ref,
    mamba_block_step_ref,
    mlp_block_step_ref,
)
from lnlm_ssm.ops.conv1d.interface import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen_states
from lnlm_ssm.ops.conv1d.reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    causal_conv1d_varlen_states_ref,
)
from lnlm_ssm.ops.linear.interface import decode_linear, weight_only_linear
from lnlm_ssm.ops.linear.reference import dequantize_weight, quantize_weight, weight_only_linear_ref
from lnlm_ssm.ops.mamba_inner.interface import mamba_inner_fn
from lnlm_ssm.ops.mamba_inner.reference import mamba_inner_ref
from lnlm_ssm.ops.norm.interface import layer_norm_fn, layernorm_fn, rms_norm_fn, rmsnorm_fn
from lnlm_ssm.ops.norm.reference import layer_norm_gated_ref, layer_norm_ref, rms_norm_gated_ref, rms_norm_ref
from lnlm_ssm.ops.selective_scan.interface import selective_scan_fn
from lnlm_ssm.ops.selective_scan.reference import selective_scan_ref
from lnlm_ssm.ops.split_conv1d_scan.interface import mamba_split_conv1d_scan_combined
from lnlm_ssm.ops.split_conv1d_scan.reference import mamba_split_conv1d_scan_ref
from lnlm_ssm.ops.ssd.interface import mamba_chunk_scan_combined
from lnlm_ssm.ops.ssd.reference import mamba_chunk_scan_ref, ssd_recurrent_ref
from lnlm_ssm.ops.state_update.interface import selective_state_update
from lnlm_ssm.ops.state_update.reference import selective_state_update_ref

__all__ = [
    "BackendUnavailableError",
    "attention_block_step",
    "attention_block_step_ref",
    "available_backends",
    "backend_report",
    "causal_conv1d_fn",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "causal_conv1d_varlen_states",
    "causal_conv1d_varlen_states_ref",
    "decode_linear",
    "dequantize_weight",
    "decode_step_ref",
    "layer_norm_fn",
    "layer_norm_gated_ref",
    "layer_norm_ref",
    "layernorm_fn",
    "mamba2_block_step",
    "mamba2_block_step_ref",
    "mamba_block_step",
    "mamba_block_step_ref",
    "mamba_chunk_scan_combined",
    "mamba_chunk_scan_ref",
    "mamba_inner_fn",
    "mamba_inner_ref",
    "mamba_split_conv1d_scan_combined",
    "mamba_split_conv1d_scan_ref",
    "quantize_weight",
    "mlp_block_step",
    "mlp_block_step_ref",
    "prepare_block_step",
    "prepare_decode_step",
    "rms_norm_fn",
    "rms_norm_gated_ref",
    "rms_norm_ref",
    "rmsnorm_fn",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "ssd_recurrent_ref",
    "weight_only_linear",
    "weight_only_linear_ref",
]
