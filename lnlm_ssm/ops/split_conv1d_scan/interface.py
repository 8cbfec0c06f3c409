"""Public Mamba-2 mixer path: ``mamba_split_conv1d_scan_combined``, as in mamba_ssm.

The composition of ``reference.py`` on the public ops: conv, SSD scan, gated
norm and out projection each run on their fastest kernel (or on ``backend``
where that op has it), and autograd differentiates through all of them.
"""

from __future__ import annotations

from lnlm_ssm.ops._backends import backend_for
from lnlm_ssm.ops._checks import Shapes, check_divisible
from lnlm_ssm.ops.conv1d.interface import causal_conv1d_fn
from lnlm_ssm.ops.norm.interface import rmsnorm_fn
from lnlm_ssm.ops.split_conv1d_scan.reference import head_layout, split_conv1d_scan
from lnlm_ssm.ops.ssd.interface import mamba_chunk_scan_combined
from lnlm_ssm.utils.checks import NO_DT_LIMIT, check_positive_int


def _validate(zxbcdt, conv1d_weight, A, D, headdim, ngroups, rmsnorm_weight, outproj_weight) -> None:
    shapes = Shapes()
    shapes.bind("zxbcdt", zxbcdt, ("batch", "seqlen", "channels"))
    shapes.bind("A", A, ("nheads",))
    check_positive_int("ngroups", ngroups)
    if D is not None and D.ndim == 2:
        shapes.bind("D", D, ("nheads", "headdim"))
    else:
        shapes.bind_optional("D", D, ("nheads",))
        if headdim is None:
            raise ValueError("headdim must be given when D is None or (nheads,)")
        check_positive_int("headdim", headdim)
    check_divisible("nheads", shapes["nheads"], "ngroups", ngroups)
    shapes.bind("conv1d_weight", conv1d_weight, ("conv_dim", "width"))
    dim, dstate, d_mlp = head_layout(zxbcdt, conv1d_weight, A, D, headdim, ngroups)
    if dstate < 1 or shapes["conv_dim"] != dim + 2 * ngroups * dstate:
        raise ValueError(
            f"conv1d_weight must have dim + 2 * ngroups * dstate rows (dim = nheads * headdim = {dim}), "
            f"got shape {tuple(conv1d_weight.shape)}"
        )
    if d_mlp < 0 or shapes["channels"] != 2 * d_mlp + dim + shapes["conv_dim"] + shapes["nheads"]:
        raise ValueError(
            f"zxbcdt must have 2 * d_mlp + dim + conv_dim + nheads channels (dim {dim}, conv_dim "
            f"{shapes['conv_dim']}, nheads {shapes['nheads']}, d_mlp >= 0), got shape {tuple(zxbcdt.shape)}"
        )
    shapes.bind_optional("rmsnorm_weight", rmsnorm_weight, (dim,))
    if outproj_weight is not None:
        shapes.bind("outproj_weight", outproj_weight, ("out_dim", d_mlp + dim))


def mamba_split_conv1d_scan_combined(
    zxbcdt,
    conv1d_weight,
    conv1d_bias,
    dt_bias,
    A,
    D,
    chunk_size,
    initial_states=None,
    seq_idx=None,
    dt_limit=NO_DT_LIMIT,
    return_final_states=False,
    activation="silu",
    rmsnorm_weight=None,
    rmsnorm_eps=1e-6,
    outproj_weight=None,
    outproj_bias=None,
    headdim=None,
    ngroups=1,
    norm_before_gate=True,
    *,
    backend="auto",
):
    """Split, conv, SSD scan, gate or gated RMSNorm, and out projection of a Mamba-2 layer.

    Layout and steps: see ``lnlm_ssm/ops/split_conv1d_scan/reference.py``.
    Returns ``(batch, seqlen, out_dim)`` (``d_mlp + dim`` without
    ``outproj_weight``), or ``(out, final_states)`` with final states
    ``(batch, nheads, headdim, dstate)``.
    """
    _validate(zxbcdt, conv1d_weight, A, D, headdim, ngroups, rmsnorm_weight, outproj_weight)
    conv_backend = backend_for("causal_conv1d_fn", backend)
    scan_backend = backend_for("mamba_chunk_scan_combined", backend)
    norm_backend = backend_for("rmsnorm_fn", backend)
    return split_conv1d_scan(
        zxbcdt,
        conv1d_weight,
        conv1d_bias,
        dt_bias,
        A,
        D,
        chunk_size,
        initial_states,
        seq_idx,
        dt_limit,
        return_final_states,
        activation,
        rmsnorm_weight,
        rmsnorm_eps,
        outproj_weight,
        outproj_bias,
        headdim,
        ngroups,
        norm_before_gate,
        conv=lambda x, w, b, seq_idx, act: causal_conv1d_fn(x, w, b, seq_idx, activation=act, backend=conv_backend),
        scan=lambda *args, **kwargs: mamba_chunk_scan_combined(*args, **kwargs, backend=scan_backend),
        gated_norm=lambda y, w, z, eps, group, before: rmsnorm_fn(
            y, w, None, z=z, eps=eps, group_size=group, norm_before_gate=before, backend=norm_backend
        ),
    )
