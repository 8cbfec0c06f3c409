"""Bidirectional mixers: BiMamba against its two causal mixers, Hydra against its quasiseparable matrix
materialised in float64, bidirectionality, right padding, weight tying, gradients, errors."""

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.layers import BiMamba, Hydra, Mamba, Mamba2
from lnlm_ssm.layers.base import declared_parameter_names
from lnlm_ssm.utils.testing import assert_close
from mixer_cases import perturbed

D_MODEL, D_STATE, HEADDIM, CHUNK, SEQLEN = 16, 4, 8, 4, 11
BACKENDS = ["reference", "cpu"]
INNER = {
    "Mamba1": (Mamba, {"d_state": D_STATE}),
    "Mamba2": (Mamba2, {"d_state": D_STATE, "headdim": HEADDIM, "chunk_size": CHUNK}),
}

# The default layer; two groups of B and C with biases and a wider conv; a dt limit.
HYDRA_CONFIGS = {
    "default": {},
    "groups": {"ngroups": 2, "bias": True, "d_conv": 5},
    "dt_limit": {"dt_limit": (0.02, 0.06), "conv_bias": False},
}


def make_bimamba(inner="Mamba2", dtype=torch.float64, backend="reference", **kwargs):
    """A tiny BiMamba whose parameters are all perturbed."""
    return perturbed(BiMamba(D_MODEL, inner=inner, dtype=dtype, backend=backend, **INNER[inner][1], **kwargs))


def make_hydra(dtype=torch.float64, backend="reference", **kwargs):
    """A tiny Hydra (4 heads) whose parameters are all perturbed."""
    kwargs = {"d_state": D_STATE, "headdim": HEADDIM, "chunk_size": CHUNK, **kwargs}
    return perturbed(Hydra(D_MODEL, dtype=dtype, backend=backend, **kwargs))


def hidden(batch=2, seqlen=SEQLEN, dtype=torch.float64):
    return torch.randn(batch, seqlen, D_MODEL, dtype=dtype)


def hydra_by_matrix(layer: Hydra, u: torch.Tensor) -> torch.Tensor:
    """Hydra computed from its definition, the sequence mixed by a materialised (seqlen, seqlen) matrix per head.

    With L_f the causal SSD matrix of the forward direction,
    L_f[t, s] = (C_f[t]·B_f[s]) exp(Σ_{s<k≤t} Δ_f[k] A) Δ_f[s] for s ≤ t, and
    L_b its mirror image for the backward one, L_b[t, s] = (C_b[t]·B_b[s])
    exp(Σ_{t≤k<s} Δ_b[k] A) Δ_b[s] for s ≥ t, the mixer is
    M[t] = L_f[t - 1] + L_b[t + 1] + diag(fc_D(x) + D) (rows out of range are zero),
    so the forward part sees only s < t and the backward part only s > t.
    """
    batch, seqlen, _ = u.shape
    h, p, g, n = layer.nheads, layer.headdim, layer.ngroups, layer.d_state
    z, xBC, dt = F.linear(u, layer.in_proj.weight, layer.in_proj.bias).split(
        [layer.d_inner, layer.conv_dim, 2 * h], dim=-1
    )
    xBC = F.silu(layer.conv1d(xBC.transpose(1, 2)).transpose(1, 2))  # nn.Conv1d with padding d_conv // 2: centred
    x, B_f, C_f, B_b, C_b = xBC.split([layer.d_inner] + [g * n] * 4, dim=-1)
    x = x.unflatten(-1, (h, p))

    def per_head(t):  # (batch, seqlen, g * n) -> (batch, seqlen, h, n): group j serves heads [j*h/g, (j+1)*h/g)
        return t.unflatten(-1, (g, n)).repeat_interleave(h // g, dim=2)

    delta = F.softplus(dt.unflatten(-1, (2, h)) + layer.dt_bias)
    delta = delta.clamp(*layer.dt_limit)
    a = delta * -torch.exp(layer.A_log)  # log-decay of each step, (batch, seqlen, 2, h)
    t_idx = torch.arange(seqlen)[:, None]
    s_idx = torch.arange(seqlen)[None, :]

    def ssd_matrix(B, C, delta, exponent, valid):  # (batch, h, t, s)
        scores = torch.einsum("bthn,bshn->bhts", per_head(C), per_head(B))
        decay = torch.exp(exponent.masked_fill(~valid, -torch.inf))
        return scores * decay * delta.transpose(1, 2)[:, :, None, :]

    a_f, a_b = a[:, :, 0].transpose(1, 2), a[:, :, 1].transpose(1, 2)  # (batch, h, seqlen)
    cs_f = a_f.cumsum(-1)  # [t] = Σ_{k≤t} a_f[k]
    cs_b = a_b.cumsum(-1) - a_b  # [t] = Σ_{k<t} a_b[k]
    before_f = cs_f[..., :, None] - cs_f[..., None, :]  # [t, s] = Σ_{s<k≤t} a_f[k]
    after_b = cs_b[..., None, :] - cs_b[..., :, None]  # [t, s] = Σ_{t≤k<s} a_b[k]
    L_f = ssd_matrix(B_f, C_f, delta[:, :, 0], before_f, s_idx <= t_idx)
    L_b = ssd_matrix(B_b, C_b, delta[:, :, 1], after_b, s_idx >= t_idx)
    M = F.pad(L_f[..., :-1, :], (0, 0, 1, 0)) + F.pad(L_b[..., 1:, :], (0, 0, 0, 1))
    y = torch.einsum("bhts,bshp->bthp", M, x)
    y = y + x * (F.linear(x.flatten(-2), layer.fc_D.weight) + layer.D)[..., None]
    y = y.flatten(-2)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + layer.norm.eps) * layer.norm.weight * F.silu(z)
    return F.linear(y, layer.out_proj.weight, layer.out_proj.bias)


def grads(out, tensors, seed=1):
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * cotangent).sum(), tensors)


# -- BiMamba -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner", INNER)
def test_bimamba_is_forward_plus_reversed_forward(inner, backend):
    layer = make_bimamba(inner, backend=backend)
    cls, kwargs = INNER[inner]
    fwd, bwd = (cls(D_MODEL, dtype=torch.float64, backend=backend, **kwargs) for _ in range(2))
    fwd.load_state_dict(layer.fwd.state_dict())
    bwd.load_state_dict(layer.bwd.state_dict())
    u = hidden()
    with torch.no_grad():
        assert_close(layer(u), fwd(u) + bwd(u.flip(1)).flip(1))


def test_bimamba_mean_is_half_the_sum():
    add = make_bimamba()
    mean = BiMamba(D_MODEL, inner="Mamba2", combine="mean", dtype=torch.float64, **INNER["Mamba2"][1])
    mean.load_state_dict(add.state_dict())
    u = hidden()
    with torch.no_grad():
        assert_close(mean(u), add(u) / 2)


@pytest.mark.parametrize("inner", INNER)
def test_bimamba_weight_tie_shares_projections(inner):
    tied = make_bimamba(inner, bidirectional_weight_tie=True, bias=True)
    for name in ("in_proj", "out_proj"):
        for pname in ("weight", "bias"):
            assert getattr(getattr(tied.bwd, name), pname) is getattr(getattr(tied.fwd, name), pname)
    assert tied.bwd.conv1d.weight is not tied.fwd.conv1d.weight
    assert tied.bwd.A_log is not tied.fwd.A_log
    untied = BiMamba(D_MODEL, inner=inner, bias=True, dtype=torch.float64, **INNER[inner][1])
    untied.load_state_dict(tied.state_dict(), strict=False)
    untied.bwd.in_proj.load_state_dict(tied.fwd.in_proj.state_dict())
    untied.bwd.out_proj.load_state_dict(tied.fwd.out_proj.state_dict())
    tied_count = sum(p.numel() for p in tied.parameters())
    shared = sum(p.numel() for name in ("in_proj", "out_proj") for p in getattr(tied.fwd, name).parameters())
    assert tied_count == sum(p.numel() for p in untied.parameters()) - shared

    u = hidden()
    out_tied, out_untied = tied(u), untied(u)
    assert_close(out_tied, out_untied)
    tied_grads = dict(zip([n for n, _ in tied.named_parameters()], grads(out_tied, list(tied.parameters()))))
    untied_grads = dict(zip([n for n, _ in untied.named_parameters()], grads(out_untied, list(untied.parameters()))))
    assert not any(name.startswith(("bwd.in_proj", "bwd.out_proj")) for name in tied_grads)
    for name, grad in tied_grads.items():
        expected = untied_grads[name]
        if name.startswith(("fwd.in_proj", "fwd.out_proj")):
            expected = expected + untied_grads["bwd" + name[3:]]
        assert_close(grad, expected, msg=name)


def test_bimamba_tied_state_dict_stores_each_tensor_once():
    tied = make_bimamba("Mamba1", bidirectional_weight_tie=True)
    state = tied.state_dict()
    assert "fwd.in_proj.weight" in state and "fwd.out_proj.weight" in state
    assert not any(key.startswith(("bwd.in_proj", "bwd.out_proj")) for key in state)
    assert "bwd.conv1d.weight" in state

    fresh = BiMamba(D_MODEL, inner="Mamba1", bidirectional_weight_tie=True, dtype=torch.float64, d_state=D_STATE)
    fresh.load_state_dict(state)
    assert fresh.bwd.in_proj.weight is fresh.fwd.in_proj.weight
    u = hidden()
    with torch.no_grad():
        assert_close(fresh(u), tied(u))
    inside_a_model = torch.nn.Sequential(fresh)
    assert set(inside_a_model.state_dict()) == {f"0.{key}" for key in state}
    inside_a_model.load_state_dict({f"0.{key}": value for key, value in state.items()})

    untied_state = {**state, "bwd.in_proj.weight": torch.zeros_like(state["fwd.in_proj.weight"])}
    with pytest.raises(RuntimeError, match="bwd.in_proj.weight differs from fwd.in_proj.weight"):
        fresh.load_state_dict(untied_state)


def test_bimamba_declarations_reach_both_directions():
    layer = BiMamba(D_MODEL, inner="Mamba1", d_state=D_STATE)
    assert declared_parameter_names(layer, "no_weight_decay") == {"fwd.A_log", "fwd.D", "bwd.A_log", "bwd.D"}
    assert declared_parameter_names(layer, "keep_init") == {"fwd.dt_proj.bias", "bwd.dt_proj.bias"}


# -- Hydra -------------------------------------------------------------------------------------------------------


def test_hydra_state_dict_is_the_authors_layout():
    layer = Hydra(D_MODEL, d_state=D_STATE, headdim=HEADDIM, ngroups=2)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    d_inner, nheads = 2 * D_MODEL, 2 * D_MODEL // HEADDIM
    conv_dim = d_inner + 2 * 2 * 2 * D_STATE
    assert shapes == {
        "in_proj.weight": (d_inner + conv_dim + 2 * nheads, D_MODEL),
        "conv1d.weight": (conv_dim, 1, 7),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "fc_D.weight": (nheads, d_inner),
        "norm.weight": (d_inner,),
        "out_proj.weight": (D_MODEL, d_inner),
    }
    assert torch.equal(layer.A_log, torch.zeros(nheads)), "A = -1 at init, as the authors'"


@pytest.mark.parametrize("config", HYDRA_CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hydra_matches_its_materialised_matrix(backend, config):
    layer = make_hydra(backend=backend, **HYDRA_CONFIGS[config])
    u = hidden().requires_grad_()
    out, expected = layer(u), hydra_by_matrix(layer, u)
    assert_close(out, expected)
    tensors = [u] + list(layer.parameters())
    names = ["hidden_states"] + [n for n, _ in layer.named_parameters()]
    for name, got, want in zip(names, grads(out, tensors), grads(expected, tensors)):
        assert_close(got, want, msg=name)


@pytest.mark.parametrize("seqlen", [1, 37])
def test_hydra_matches_its_matrix_at_awkward_lengths(seqlen):
    layer = make_hydra(backend="cpu")
    u = hidden(seqlen=seqlen)
    with torch.no_grad():
        assert_close(layer(u), hydra_by_matrix(layer, u))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hydra_float32_agrees_with_float64(backend):
    layer = make_hydra(backend=backend)
    single = Hydra(D_MODEL, d_state=D_STATE, headdim=HEADDIM, chunk_size=CHUNK, backend=backend)
    single.load_state_dict(layer.state_dict())
    u = hidden(seqlen=37)
    with torch.no_grad():
        assert_close(single(u.float()), layer(u), dtype=torch.float32)


def test_hydra_scans_exclude_the_diagonal():
    """With the diagonal term, the conv's side taps and the gate's input removed, out[t] does not depend on u[t]."""
    layer = make_hydra(bias=True)
    with torch.no_grad():
        layer.in_proj.weight[: layer.d_inner] = 0  # z is its bias alone
        centre = layer.d_conv // 2
        layer.conv1d.weight[..., :centre] = 0
        layer.conv1d.weight[..., centre + 1 :] = 0
        layer.conv1d.bias.zero_()
        layer.fc_D.weight.zero_()
        layer.D.zero_()
    u = hidden(seqlen=SEQLEN).requires_grad_()
    t = 5
    (jacobian_row,) = torch.autograd.grad(layer(u)[:, t].sum(), u)
    neighbours = jacobian_row[:, [t - 1, t + 1]].abs().amax()
    assert neighbours > 1e-3
    assert jacobian_row[:, t].abs().amax() <= 1e-12 * neighbours


# -- both ----------------------------------------------------------------------------------------------------------

MIXERS = {
    "BiMamba-Mamba1": lambda **kw: make_bimamba("Mamba1", **kw),
    "BiMamba-Mamba2": lambda **kw: make_bimamba("Mamba2", **kw),
    "BiMamba-tied": lambda **kw: make_bimamba("Mamba2", bidirectional_weight_tie=True, **kw),
    "Hydra": make_hydra,
}


@pytest.mark.parametrize("mixer", MIXERS)
def test_output_depends_on_both_sides(mixer):
    layer = MIXERS[mixer](backend="cpu")
    u = hidden(seqlen=16).requires_grad_()
    t = 8
    (jacobian_row,) = torch.autograd.grad(layer(u)[:, t].sum(), u)
    # Tokens 6 steps away, beyond either conv's reach: only the scans connect them.
    assert jacobian_row[:, t - 6].abs().amax() > 1e-6, "the past"
    assert jacobian_row[:, t + 6].abs().amax() > 1e-6, "the future"


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mixer", MIXERS)
def test_padding_leaves_no_trace(mixer, dtype, side):
    """Right padding is the contract (encoder batches); left padding works as well."""
    layer = MIXERS[mixer](backend="cpu", dtype=dtype)
    lengths = [SEQLEN, 6, 1]
    u = hidden(batch=len(lengths), dtype=dtype).requires_grad_()
    mask = torch.arange(SEQLEN)[None, :] < torch.tensor(lengths)[:, None]
    if side == "left":
        mask = mask.flip(1)
    out = layer(u, mask=mask)
    for row, length in enumerate(lengths):
        real = slice(0, length) if side == "right" else slice(SEQLEN - length, SEQLEN)
        with torch.no_grad():
            alone = layer(u[row : row + 1, real])
        assert_close(out[row : row + 1, real], alone, msg=f"row {row} of length {length}")
    with torch.no_grad():
        assert_close(out[:1], layer(u[:1]), msg="an all-real row is untouched by the mask")
    (grad,) = torch.autograd.grad((out * mask[..., None]).sum(), u)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])), "no real output reads a pad"


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_reach_every_parameter(mixer):
    layer = MIXERS[mixer]()
    out = layer(hidden())
    (out * torch.randn_like(out)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mixer", MIXERS)
def test_no_cache(mixer):
    layer = MIXERS[mixer]()
    name = type(layer).__name__
    with pytest.raises(NotImplementedError, match=f"{name} is a bidirectional mixer: it has no incremental decode"):
        layer.allocate_cache(2, SEQLEN)
    cache = Mamba2(D_MODEL, d_state=D_STATE, headdim=HEADDIM).allocate_cache(2, SEQLEN)
    with pytest.raises(ValueError, match=f"cache must be None: {name} is bidirectional"):
        layer(hidden(), cache)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: BiMamba(D_MODEL, combine="concat"), "combine must be one of \\('add', 'mean'\\), got 'concat'"),
        (lambda: BiMamba(D_MODEL, inner="Mamba3"), "inner must be one of \\('Mamba1', 'Mamba2'\\), got 'Mamba3'"),
        (lambda: BiMamba(D_MODEL, bidirectional_weight_tie="yes"), "bidirectional_weight_tie must be a bool"),
        (lambda: BiMamba(D_MODEL, inner="Mamba1", d_state=0), "d_state must be a positive integer"),
        (lambda: Hydra(D_MODEL, d_conv=4), "d_conv must be odd .*; got 4"),
        (lambda: Hydra(D_MODEL, headdim=12), "headdim must divide d_inner"),
        (lambda: Hydra(D_MODEL, headdim=8, ngroups=3), "ngroups must divide nheads"),
        (lambda: Hydra(D_MODEL, headdim=8, A_init_range=(0, 1)), "A_init_range must satisfy 0 < low <= high"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("mixer", MIXERS)
def test_bad_forward_arguments(mixer):
    layer = MIXERS[mixer]()
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, past \+ seqlen\) = \(2, 0 \+ 11\)"):
        layer(hidden(), mask=torch.ones(2, SEQLEN + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        layer(hidden()[..., :-1])
