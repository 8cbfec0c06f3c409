"""The block steps on the CPU: the C++ kernels in ``csrc/cpu/block_step.cpp`` (launchers only).

The OpOverloads themselves, so that the launch is the op call and nothing more;
and the whole decode step, built once as a ``torch.classes.lnlm_ssm.DecodeStep``.
"""

from __future__ import annotations

import torch

from lnlm_ssm.ops import _library

_ops = _library.load()

mamba_block_step_cpu = _ops.mamba_block_step.default
mamba2_block_step_cpu = _ops.mamba2_block_step.default
mlp_block_step_cpu = _ops.mlp_block_step.default
attention_block_step_cpu = _ops.attention_block_step.default


# Each op's arguments after residual, less an attention step's per-step three (past,
# positions, key_mask): its params. The last ones (the scales of quantised weights) are
# None by default in the op, but required by DecodeStep's add_ methods.
_PARAMS = {
    op: len(getattr(_ops, op).default._schema.arguments) - 2 - (3 if op == "attention_block_step" else 0)
    for op in ("mamba_block_step", "mamba2_block_step", "mlp_block_step", "attention_block_step")
}


def bind_decode_step_cpu(embedding, embedding_scale, vocab_size, blocks, final_norm, timed):
    """``step(input_ids (batch,), past, positions=None, key_mask=None) -> (batch, d_model)``: the whole step,
    one C++ call (``timed``: also the seconds of each part)."""
    decoder = torch.classes.lnlm_ssm.DecodeStep(embedding, embedding_scale, vocab_size, *final_norm)
    for op, params in blocks:
        params = tuple(params) + (None,) * (_PARAMS[op] - len(params))
        getattr(decoder, "add_" + op.removesuffix("_step"))(*params)
    run = decoder.timed_step if timed else decoder.step

    def step(input_ids, past=0, positions=None, key_mask=None):
        return run(input_ids, past, positions, key_mask)

    return step
