"""Loads the C++ CPU extension ``lnlm_ssm._C`` once and registers the fake kernels of its ops.

``lnlm_ssm._C`` defines every ``torch.ops.lnlm_ssm`` schema (csrc/cpu/registration.cpp)
and the CPU kernels. The fake (meta) implementations below give the shapes and
dtypes of the outputs without computing them, so that ``torch.compile(fullgraph=True)``
traces through the ops. They hold for every device, the CUDA extension's kernels included.

Nothing here runs at ``import lnlm_ssm``: the extension loads on the first call of
:func:`load`, which the op launchers (``ops/*/cpu.py``) make when they are imported.
"""

from __future__ import annotations

import functools
import importlib

import torch


@functools.lru_cache(maxsize=None)
def load():
    """Import ``lnlm_ssm._C`` (ImportError if it is not built) and return ``torch.ops.lnlm_ssm``."""
    importlib.import_module("lnlm_ssm._C")
    _register_fakes()
    return torch.ops.lnlm_ssm


def _register_fakes() -> None:
    @torch.library.register_fake("lnlm_ssm::selective_state_update")
    def _selective_state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=None):
        # y: (batch, nheads, headdim), contiguous, in x's dtype; state is updated in place.
        return x.new_empty(x.shape)

    @torch.library.register_fake("lnlm_ssm::selective_scan_fwd")
    def _selective_scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, checkpoint_every):
        batch, dim, seqlen = u.shape
        state = A.shape[1:]  # (dstate,), or (2, dstate) for complex A
        nchunks = -(-seqlen // checkpoint_every) if checkpoint_every > 0 else 0
        return (
            torch.empty_like(u),
            A.new_empty(batch, dim, *state),
            A.new_empty(batch, dim, nchunks, *state),
        )

    @torch.library.register_fake("lnlm_ssm::selective_scan_bwd")
    def _selective_scan_bwd_fake(
        grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, checkpoints, delta_softplus, checkpoint_every
    ):
        batch, dim, _ = u.shape
        return (
            torch.empty_like(u),
            torch.empty_like(delta),
            torch.empty_like(A),
            torch.empty_like(B),
            torch.empty_like(C),
            A.new_empty(dim if D is not None else 0),
            torch.empty_like(z) if z is not None else u.new_empty(0),
            A.new_empty(dim if delta_bias is not None else 0),
            A.new_empty(batch, dim, *A.shape[1:]),
        )

    # Causal conv1d: outputs contiguous in x's dtype, gradients of weight, bias and
    # initial states in the math dtype of weight.
    @torch.library.register_fake("lnlm_ssm::causal_conv1d_fwd")
    def _causal_conv1d_fwd_fake(x, weight, bias, initial_states, seq_idx, silu):
        return x.new_empty(x.shape)

    @torch.library.register_fake("lnlm_ssm::causal_conv1d_bwd")
    def _causal_conv1d_bwd_fake(grad_out, x, weight, bias, initial_states, seq_idx, silu):
        batch, dim, seqlen = x.shape
        return (
            x.new_empty(batch, dim, seqlen),
            weight.new_empty(weight.shape),
            weight.new_empty(dim if bias is not None else 0),
            weight.new_empty(batch, dim, weight.shape[1] - 1),
        )

    @torch.library.register_fake("lnlm_ssm::decode_linear")
    def _decode_linear_fake(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("lnlm_ssm::weight_only_linear")
    def _weight_only_linear_fake(x, weight, scale, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    # Block steps: (out, new_residual), both (batch, d_model) like hidden_states; states updated in place.
    def _block_step_fake(hidden_states, *args):
        return hidden_states.new_empty(hidden_states.shape), hidden_states.new_empty(hidden_states.shape)

    for name in ("mamba_block_step", "mamba2_block_step", "mlp_block_step", "attention_block_step"):
        torch.library.register_fake(f"lnlm_ssm::{name}")(_block_step_fake)

    @torch.library.register_fake("lnlm_ssm::causal_conv1d_update")
    def _causal_conv1d_update_fake(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices):
        return x.new_empty(x.shape)

    # Mamba-2 SSD chunked scan (csrc/cpu/ssd.cpp): out in x's dtype, states and the
    # gradients of everything but x and z in the math dtype of A.
    @torch.library.register_fake("lnlm_ssm::ssd_chunk_scan_fwd")
    def _ssd_chunk_scan_fwd_fake(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_min, dt_max
    ):
        batch, seqlen, nheads, headdim = x.shape
        dstate = B.shape[-1]
        nchunks = -(-seqlen // chunk_size)
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            A.new_empty(batch, nheads, headdim, dstate),
            A.new_empty(batch, nheads, nchunks, headdim, dstate),
        )

    @torch.library.register_fake("lnlm_ssm::ssd_chunk_scan_bwd")
    def _ssd_chunk_scan_bwd_fake(
        grad_out, grad_final_states, grad_chunk_states, x, dt, A, B, C, D, z, dt_bias, seq_idx, chunk_states,
        chunk_size, dt_softplus, dt_min, dt_max,
    ):
        batch, _, nheads, headdim = x.shape
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(dt),
            torch.empty_like(A),
            torch.empty_like(B),
            torch.empty_like(C),
            A.new_empty(D.shape if D is not None else (0,)),
            torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else x.new_empty(0),
            A.new_empty(batch, nheads, headdim, B.shape[-1]),
        )
