"""Public Mamba-2 SSD scan: ``mamba_chunk_scan_combined``, as in mamba_ssm."""

from __future__ import annotations

from lnlm_ssm.ops._backends import register, resolve
from lnlm_ssm.ops._checks import Shapes, check_divisible, check_seq_idx
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
    dt_softplus=False,
    dt_limit=NO_DT_LIMIT,
    return_final_states=False,
    *,
    backend="auto",
):
    """Mamba-2 SSD scan, chunked.

    Argument order follows mamba_ssm (``cu_seqlens`` is not supported: pack with
    ``seq_idx``). Shapes and math: see ``lnlm_ssm/ops/ssd/reference.py``.
    Returns y ``(batch, seqlen, nheads, headdim)`` in x's dtype, or
    ``(y, final_states)`` with final states ``(batch, nheads, headdim, dstate)``
    in fp32 (float64 for float64 x). Gradients flow into ``initial_states`` and
    through ``final_states``.
    """
    shapes = _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx)
    dt_limit = check_dt_limit(dt_limit)
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
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
        initial_states=initial_states,
        seq_idx=seq_idx,
        return_final_states=return_final_states,
    )
