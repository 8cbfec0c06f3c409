"""Public Mamba-2 SSD scan: ``mamba_chunk_scan_combined``, as in mamba_ssm."""

from __future__ import annotations

import torch

from lnlm_ssm.ops._backends import register, resolve
from lnlm_ssm.ops._checks import FLOAT_DTYPES, Shapes, check_divisible, check_seq_idx
from lnlm_ssm.ops.ssd.reference import mamba_chunk_scan_ref
from lnlm_ssm.utils.checks import NO_DT_LIMIT, check_dt_limit, check_positive_int

_KERNELS = {
    "reference": mamba_chunk_scan_ref,
    "cpu": "lnlm_ssm.ops.ssd.cpu:mamba_chunk_scan_cpu",
    "triton": "lnlm_ssm.ops.ssd.triton:mamba_chunk_scan_triton",
}
register("mamba_chunk_scan_combined", _KERNELS)


def _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx) -> Shapes:
    shapes = Shapes()
    shapes.bind("x", x, ("batch", "seqlen", "nheads", "headdim"))
    shapes.bind("dt", dt, ("batch", "seqlen", "nheads"))
    shapes.bind("A", A, ("nheads",))
    shapes.bind("B", B, ("batch", "seqlen", "ngroups", "dstate"))
    shapes.bind("C", C, ("batch", "seqlen", "ngroups", "dstate"))
    check_divisible("nheads", shapes["nheads"], "ngroups", shapes["ngroups"])
    check_positive_int("chunk_size", chunk_size)
    if D is not None:
        shapes.bind("D", D, ("nheads",) if getattr(D, "ndim", None) == 1 else ("nheads", "headdim"))
    shapes.bind_optional("z", z, ("batch", "seqlen", "nheads", "headdim"))
    shapes.bind_optional("dt_bias", dt_bias, ("nheads",))
    shapes.bind_optional("initial_states", initial_states, ("batch", "nheads", "headdim", "dstate"))
    if seq_idx is not None:
        shapes.bind("seq_idx", seq_idx, ("batch", "seqlen"), floating=False)
        check_seq_idx(seq_idx)
    if z is not None and z.dtype != x.dtype:
        raise TypeError(f"z must have the dtype of x ({x.dtype}), got {z.dtype}")
    if C.dtype != B.dtype:
        raise TypeError(f"C must have the dtype of B ({B.dtype}), got {C.dtype}")
    return shapes


def _validate_varlen(shapes: Shapes, cu_seqlens, seq_idx) -> None:
    """cu_seqlens: the offsets of the packed sequences of the one row, which seq_idx must mark too."""
    if cu_seqlens is None:
        raise ValueError("return_varlen_states=True needs cu_seqlens (num_seqs + 1,), the offsets of the sequences")
    if shapes["batch"] != 1:
        raise ValueError(
            f"return_varlen_states=True needs batch 1 (the sequences packed along seqlen), got batch {shapes['batch']}"
        )
    shapes.bind("cu_seqlens", cu_seqlens, ("num_seqs + 1",), floating=False)
    seqlen = shapes["seqlen"]
    offsets = cu_seqlens.tolist()
    if len(offsets) < 2:
        raise ValueError(f"cu_seqlens must hold num_seqs + 1 >= 2 offsets, got {offsets}")
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if offsets[-1] != seqlen:
        raise ValueError(f"cu_seqlens must end at seqlen ({seqlen}), got {offsets[-1]}")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            raise ValueError(
                f"cu_seqlens must be non-decreasing, got {offsets[i - 1]} then {offsets[i]} at index {i}"
            )
    # Where a new sequence starts, by each: the varlen states are those of seq_idx's sequences.
    by_offsets = torch.zeros(seqlen, dtype=torch.bool)
    by_offsets[[o for o in offsets if 0 < o < seqlen]] = True
    by_seq_idx = torch.zeros(seqlen, dtype=torch.bool)
    if seq_idx is not None and seqlen > 1:
        by_seq_idx[1:] = (seq_idx[0, 1:] != seq_idx[0, :-1]).cpu()
    if not torch.equal(by_offsets, by_seq_idx):
        token = int((by_offsets != by_seq_idx).nonzero()[0, 0])
        got = "seq_idx is None" if seq_idx is None else f"they disagree at token {token}"
        raise ValueError(
            "return_varlen_states=True needs seq_idx marking the sequences of cu_seqlens "
            f"(a new value exactly at each offset inside (0, seqlen)), but {got}"
        )


def mamba_chunk_scan_combined(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=NO_DT_LIMIT,
    return_final_states=False,
    return_varlen_states=False,
    *,
    state_dtype=None,
    backend="auto",
):
    """Mamba-2 SSD scan, chunked; mamba_ssm's arguments in mamba_ssm's order.

    Shapes and math: see ``lnlm_ssm/ops/ssd/reference.py``. Returns y
    ``(batch, seqlen, nheads, headdim)`` in x's dtype, then, as asked,
    final_states ``(batch, nheads, headdim, dstate)`` and varlen_states
    ``(num_seqs, nheads, headdim, dstate)``: ``y``, ``(y, final_states)``,
    ``(y, varlen_states)`` or ``(y, final_states, varlen_states)``.

    varlen_states (``return_varlen_states=True``) are the states at the end of
    each packed sequence of ``cu_seqlens`` (offsets, ``(num_seqs + 1,)``, from 0
    to seqlen), as in mamba_ssm: batch must be 1, and seq_idx must mark the same
    sequences (with one sequence, it may be None). ``cu_seqlens`` is read only
    then (mamba_ssm ignores it otherwise, and so do we). ``initial_states``
    belong to the sequence holding token 0.

    ``state_dtype`` (ours, vLLM's name) is the dtype of both returned states; by
    default final_states are fp32 (float64 for float64 x) and varlen_states in
    C's dtype, as in mamba_ssm. Gradients flow into ``initial_states`` and
    through both states (mamba_ssm has none through varlen_states).
    """
    shapes = _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx)
    dt_limit = check_dt_limit(dt_limit)
    if state_dtype is not None and state_dtype not in FLOAT_DTYPES:
        raise TypeError(f"state_dtype must be None or one of {FLOAT_DTYPES}, got {state_dtype!r}")
    if return_varlen_states:
        _validate_varlen(shapes, cu_seqlens, seq_idx)
    kernel = resolve("mamba_chunk_scan_combined", backend, shapes.device, dtype=x.dtype)
    return kernel(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        initial_states=initial_states,
        seq_idx=seq_idx,
        cu_seqlens=cu_seqlens if return_varlen_states else None,
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
        return_final_states=return_final_states,
        return_varlen_states=return_varlen_states,
        state_dtype=state_dtype,
    )
