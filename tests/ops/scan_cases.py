"""Inputs and the gradient probe that the selective-scan kernel tests (cpu, triton, cuda) share."""

import torch

from lnlm_ssm.ops import selective_scan_fn

FIELDS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch=2, dim=5, seqlen=37, dstate=6, ngroups=None, dtype=torch.float32, optional=True,
                noncontiguous=False, device="cpu", seed=None, time_invariant="", complex_A=False):
    """selective_scan_fn's arguments: u, delta, z in ``dtype``, the rest in float32; decaying A.

    ``noncontiguous``: every tensor of 2+ dimensions laid out in reverse order.
    ``seed``: draw from a generator of this seed instead of the global one.
    ``time_invariant``: the ones of "B", "C" given as (dim, dstate) (``"BC"``: both).
    ``complex_A``: A, the states and time-invariant B / C complex64, time-varying B / C
    real with (real, imaginary) pairs along a last axis of 2 * seqlen (mamba_ssm's layout).
    """
    gen = None if seed is None else torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, dt=dtype):
        if noncontiguous and len(shape) > 1:
            t = torch.randn(*reversed(shape), generator=gen, dtype=torch.float64).permute(*reversed(range(len(shape))))
        else:
            t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return (t * scale).to(device=device, dtype=dt)

    def c(real):
        """``real``, or with complex_A, complex64 with it as the real part."""
        return torch.complex(real, r(*real.shape, dt=torch.float32)) if complex_A else real

    steps = 2 * seqlen if complex_A else seqlen
    bc = (batch, dstate, steps) if ngroups is None else (batch, ngroups, dstate, steps)
    t = dict(
        u=r(batch, dim, seqlen),
        delta=r(batch, dim, seqlen, scale=0.5),
        A=c(-(r(dim, dstate, dt=torch.float32).abs() + 0.1)),
        B=c(r(dim, dstate, dt=torch.float32)) if "B" in time_invariant else r(*bc),
        C=c(r(dim, dstate, dt=torch.float32)) if "C" in time_invariant else r(*bc),
        D=r(dim, dt=torch.float32),
        z=r(batch, dim, seqlen),
        delta_bias=r(dim, scale=0.3, dt=torch.float32),
        initial_state=c(r(batch, dim, dstate, dt=torch.float32)),
    )
    if not optional:
        t.update(D=None, z=None, delta_bias=None, initial_state=None)
    return t


def as_real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its (..., 2) real view, so that the tolerance helpers compare both parts."""
    return torch.view_as_real(t) if t.is_complex() else t


def run(t, impl, softplus=True):
    """Outputs and the gradients of a fixed random projection of (y, last_state) w.r.t. every input.

    ``impl``: a backend name for selective_scan_fn, or a function with its signature.
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items() if v is not None}
    fn = impl if callable(impl) else (lambda **kw: selective_scan_fn(**kw, backend=impl))
    y, last = fn(**{**t, **leaves}, delta_softplus=softplus, return_last_state=True)
    g = torch.Generator(device=y.device).manual_seed(1)
    gy = torch.randn(y.shape, generator=g, device=y.device, dtype=torch.float64).to(y.dtype)
    gl = torch.randn(as_real(last).shape, generator=g, device=y.device, dtype=torch.float64).to(as_real(last).dtype)
    grads = torch.autograd.grad((y * gy).sum() + (as_real(last) * gl).sum(), list(leaves.values()))
    return y, last, dict(zip(leaves, grads))
