"""Public Mamba-1 mixer path: ``mamba_inner_fn``, as in mamba_ssm.

The composition of ``reference.py`` on the public ops, so each step runs on
the fastest kernel for the tensors (or on ``backend`` where that op has it),
and autograd differentiates through all of them.
"""

from __future__ import annotations

import torch

from lnlm_ssm.ops._backends import backend_for
from lnlm_ssm.ops._checks import Shapes
from lnlm_ssm.ops.conv1d.interface import causal_conv1d_fn
from lnlm_ssm.ops.mamba_inner.reference import mamba_inner
from lnlm_ssm.ops.norm.interface import rms_norm_fn
from lnlm_ssm.ops.selective_scan.interface import selective_scan_fn
from lnlm_ssm.utils.checks import check_choice


def _validate(xz, conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight, A, B, C) -> None:
    shapes = Shapes()
    shapes.bind("xz", xz, ("batch", "2 * dim", "seqlen"))
    if shapes["2 * dim"] % 2:
        raise ValueError(f"xz must have an even number of channels (x and z), got shape {tuple(xz.shape)}")
    dim = shapes["2 * dim"] // 2
    shapes.bind("conv1d_weight", conv1d_weight, (dim, 1, "width"))
    shapes.bind("delta_proj_weight", delta_proj_weight, (dim, "dt_rank"))
    shapes.bind("x_proj_weight", x_proj_weight, ("x_proj rows", dim))
    shapes.bind("out_proj_weight", out_proj_weight, ("d_model", dim))
    complex_A = isinstance(A, torch.Tensor) and A.is_complex()
    # Only A's shape matters here; selective_scan_fn checks its dtype (real or complex).
    shapes.bind("A", A.real if complex_A else A, (dim, "dstate"))
    pairs = 2 if complex_A else 1
    taken = sum(pairs * shapes["dstate"] for given in (B, C) if given is None)
    if shapes["x_proj rows"] != shapes["dt_rank"] + taken:
        raise ValueError(
            f"x_proj_weight must have dt_rank + {taken} = {shapes['dt_rank'] + taken} rows "
            f"(Δ, then B and C where they are not given), got shape {tuple(x_proj_weight.shape)}"
        )


def mamba_inner_fn(
    xz,
    conv1d_weight,
    conv1d_bias,
    x_proj_weight,
    delta_proj_weight,
    out_proj_weight,
    out_proj_bias,
    A,
    B=None,
    C=None,
    D=None,
    delta_bias=None,
    B_proj_bias=None,
    C_proj_bias=None,
    delta_softplus=True,
    checkpoint_lvl=1,
    b_rms_weight=None,
    c_rms_weight=None,
    dt_rms_weight=None,
    b_c_dt_rms_eps=1e-6,
    *,
    backend="auto",
):
    """Conv, x_proj, Δ, selective scan, silu(z) gate and out_proj of a Mamba-1 layer.

    Layouts: see ``lnlm_ssm/ops/mamba_inner/reference.py``. Returns
    ``(batch, seqlen, d_model)``. ``checkpoint_lvl`` (0 or 1) is mamba_ssm's
    choice of what its fused backward recomputes; here each op keeps its own
    memory policy, so it changes nothing but is checked.
    """
    _validate(xz, conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight, A, B, C)
    check_choice("checkpoint_lvl", checkpoint_lvl, (0, 1))
    conv_backend = backend_for("causal_conv1d_fn", backend)
    scan_backend = backend_for("selective_scan", backend)
    norm_backend = backend_for("rms_norm_fn", backend)
    return mamba_inner(
        xz,
        conv1d_weight,
        conv1d_bias,
        x_proj_weight,
        delta_proj_weight,
        out_proj_weight,
        out_proj_bias,
        A,
        B,
        C,
        D,
        delta_bias,
        B_proj_bias,
        C_proj_bias,
        delta_softplus,
        b_rms_weight,
        c_rms_weight,
        dt_rms_weight,
        b_c_dt_rms_eps,
        conv=lambda x, w, b: causal_conv1d_fn(x, w, b, activation="silu", backend=conv_backend),
        scan=lambda *args: selective_scan_fn(*args, backend=scan_backend),
        rms_norm=lambda x, w, eps: rms_norm_fn(x, w, None, eps=eps, backend=norm_backend),
    )
