"""mamba_inner_fn and mamba_split_conv1d_scan_combined: the whole Mamba-1 / Mamba-2 mixer path in one call.

Checked against HF transformers' own PyTorch mixers (independent code, same
weights), against our references, and for gradients against the reference ops.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import Mamba2Config, MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from lnlm_ssm.ops import available_backends
from lnlm_ssm.ops.conv1d.reference import causal_conv1d_ref
from lnlm_ssm.ops.mamba_inner.interface import mamba_inner_fn
from lnlm_ssm.ops.mamba_inner.reference import mamba_inner_ref
from lnlm_ssm.ops.split_conv1d_scan.interface import mamba_split_conv1d_scan_combined
from lnlm_ssm.ops.split_conv1d_scan.reference import mamba_split_conv1d_scan_ref
from lnlm_ssm.ops.ssd.reference import mamba_chunk_scan_ref
from lnlm_ssm.utils.testing import assert_close

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in available_backends()]


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module.eval()


def hf_mamba_mixer():
    config = MambaConfig(hidden_size=12, state_size=5, expand=2, conv_kernel=4, time_step_rank=3, use_conv_bias=True, use_bias=True)
    return randomize(MambaMixer(config, layer_idx=0))


def inner_args(mixer, hidden):
    return (
        mixer.in_proj(hidden).transpose(1, 2),
        mixer.conv1d.weight,
        mixer.conv1d.bias,
        mixer.x_proj.weight,
        mixer.dt_proj.weight,
        mixer.out_proj.weight,
        mixer.out_proj.bias,
        -torch.exp(mixer.A_log.float()),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mamba_inner_fn_is_hf_mamba_mixer(backend):
    mixer = hf_mamba_mixer()
    hidden = torch.randn(2, 9, 12)
    with torch.no_grad():
        expected = mixer(hidden)
        got = mamba_inner_fn(
            *inner_args(mixer, hidden), None, None, mixer.D.float(), mixer.dt_proj.bias.float(), backend=backend
        )
        ref = mamba_inner_ref(*inner_args(mixer, hidden), None, None, mixer.D.float(), mixer.dt_proj.bias.float())
    assert got.shape == (2, 9, 12)
    assert_close(got, expected)
    assert_close(ref, expected)


def test_mamba_inner_fn_gradients_match_the_reference():
    mixer = hf_mamba_mixer().double()
    hidden = torch.randn(2, 7, 12, dtype=torch.float64)
    weights = [p for p in mixer.parameters()]

    def grads(fn):
        out = fn(*inner_args(mixer, hidden), None, None, mixer.D, mixer.dt_proj.bias)
        return torch.autograd.grad(out.square().sum(), weights)

    for got, expected, (name, _) in zip(grads(mamba_inner_fn), grads(mamba_inner_ref), mixer.named_parameters()):
        assert_close(got, expected, msg=name)


def test_mamba_inner_fn_time_invariant_B_C_and_proj_biases():
    mixer = hf_mamba_mixer()
    hidden = torch.randn(1, 6, 12)
    xz, conv_w, conv_b, x_proj, dt_proj, out_proj, out_bias, A = inner_args(mixer, hidden)
    B, C = torch.randn(24, 5), torch.randn(24, 5)
    B_bias, C_bias = torch.randn(5), torch.randn(5)
    with torch.no_grad():
        # B given: x_proj holds only Δ and C, and C gets its bias.
        got = mamba_inner_fn(xz, conv_w, conv_b, torch.cat([x_proj[:3], x_proj[8:]]), dt_proj, out_proj, out_bias, A, B, None, C_proj_bias=C_bias)
        expected = mamba_inner_ref(xz, conv_w, conv_b, torch.cat([x_proj[:3], x_proj[8:]]), dt_proj, out_proj, out_bias, A, B, None, C_proj_bias=C_bias)
        both = mamba_inner_fn(xz, conv_w, conv_b, x_proj[:3], dt_proj, out_proj, out_bias, A, B, C, B_proj_bias=B_bias)
        with_biases = mamba_inner_fn(xz, conv_w, conv_b, x_proj, dt_proj, out_proj, out_bias, A, B_proj_bias=B_bias, C_proj_bias=C_bias)
        without = mamba_inner_fn(xz, conv_w, conv_b, x_proj, dt_proj, out_proj, out_bias, A)
    assert_close(got, expected)
    assert both.shape == (1, 6, 12)
    assert not torch.allclose(with_biases, without)


def test_mamba_inner_fn_complex_A():
    """S4D-style complex A: x_proj gives B and C as (re, im) pairs, the scan returns 2 Re(y)."""
    gen = torch.Generator().manual_seed(1)
    dim, dstate, dt_rank = 8, 3, 2
    xz = torch.randn(2, 2 * dim, 5, generator=gen)
    conv_w, conv_b = torch.randn(dim, 1, 4, generator=gen), torch.randn(dim, generator=gen)
    x_proj = torch.randn(dt_rank + 4 * dstate, dim, generator=gen) * 0.3
    dt_proj, out_proj = torch.randn(dim, dt_rank, generator=gen), torch.randn(6, dim, generator=gen)
    A = torch.complex(-torch.rand(dim, dstate, generator=gen), torch.randn(dim, dstate, generator=gen))
    args = (xz, conv_w, conv_b, x_proj, dt_proj, out_proj, None, A)
    with torch.no_grad():
        expected = mamba_inner_ref(*args)
        for backend in CPU_BACKENDS:
            assert_close(mamba_inner_fn(*args, backend=backend), expected, msg=backend)
    assert expected.shape == (2, 5, 6) and not expected.is_complex()


def test_mamba_inner_fn_rms_norms_of_B_C_and_delta():
    """b/c/dt_rms_weight: RMSNorm of B and C over dstate and of Δ over dim, before the scan."""
    mixer = hf_mamba_mixer()
    hidden = torch.randn(2, 6, 12)
    xz, conv_w, conv_b, x_proj, dt_proj, out_proj, out_bias, A = inner_args(mixer, hidden)
    b_w, c_w, dt_w = torch.rand(5) + 0.5, torch.rand(5) + 0.5, torch.rand(24) + 0.5
    eps = 1e-5
    with torch.no_grad():
        got = mamba_inner_fn(xz, conv_w, conv_b, x_proj, dt_proj, out_proj, out_bias, A, D=mixer.D, delta_bias=mixer.dt_proj.bias,
                             b_rms_weight=b_w, c_rms_weight=c_w, dt_rms_weight=dt_w, b_c_dt_rms_eps=eps)

        def rms(t, w):
            return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + eps) * w

        x, z = xz.chunk(2, dim=1)
        x = F.silu(F.conv1d(F.pad(x, (3, 0)), conv_w, conv_b, groups=24)).transpose(1, 2)  # (b, l, d)
        dbl = x @ x_proj.T
        delta = F.softplus(rms(dbl[..., :3] @ dt_proj.T, dt_w) + mixer.dt_proj.bias)
        B, C = rms(dbl[..., 3:8], b_w), rms(dbl[..., 8:], c_w)
        h = torch.zeros(2, 24, 5)
        ys = []
        for t in range(6):
            h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
            ys.append((h * C[:, t, None, :]).sum(-1) + mixer.D * x[:, t])
        y = torch.stack(ys, dim=1) * F.silu(z.transpose(1, 2))
        expected = y @ out_proj.T + out_bias
    assert_close(got, expected)


def test_mamba_inner_fn_refuses_bad_shapes():
    mixer = hf_mamba_mixer()
    args = list(inner_args(mixer, torch.randn(1, 4, 12)))
    with pytest.raises(ValueError, match="x_proj_weight must have dt_rank \\+ 10"):
        mamba_inner_fn(*args[:3], args[3][:-1], *args[4:])
    with pytest.raises(ValueError, match="xz must have an even number"):
        mamba_inner_fn(args[0][:, :-1], *args[1:])
    with pytest.raises(ValueError, match="checkpoint_lvl must be one of"):
        mamba_inner_fn(*args, checkpoint_lvl=2)


def hf_mamba2_mixer(ngroups: int):
    config = Mamba2Config(hidden_size=16, state_size=4, expand=2, head_dim=4, num_heads=8, n_groups=ngroups, conv_kernel=4,
                          chunk_size=4, use_conv_bias=True, use_bias=True, time_step_limit=(0.0, float("inf")))
    mixer = randomize(Mamba2Mixer(config, layer_idx=0))
    with torch.no_grad():
        mixer.norm.weight.add_(1.0)
    return mixer


def split_args(mixer, hidden):
    return (
        mixer.in_proj(hidden),
        mixer.conv1d.weight.squeeze(1),
        mixer.conv1d.bias,
        mixer.dt_bias,
        -torch.exp(mixer.A_log.float()),
        mixer.D,
        mixer.chunk_size,
    )


def split_kwargs(mixer):
    return dict(rmsnorm_weight=mixer.norm.weight, rmsnorm_eps=mixer.norm.variance_epsilon, outproj_weight=mixer.out_proj.weight,
                outproj_bias=mixer.out_proj.bias, headdim=mixer.head_dim, ngroups=mixer.n_groups, norm_before_gate=False)


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mamba_split_conv1d_scan_combined_is_hf_mamba2_mixer(ngroups, backend):
    mixer = hf_mamba2_mixer(ngroups)
    hidden = torch.randn(2, 10, 16)
    with torch.no_grad():
        expected = mixer(hidden)
        got = mamba_split_conv1d_scan_combined(*split_args(mixer, hidden), **split_kwargs(mixer), backend=backend)
        ref = mamba_split_conv1d_scan_ref(*split_args(mixer, hidden), **split_kwargs(mixer))
    assert_close(got, expected)
    assert_close(ref, expected)


def test_mamba_split_conv1d_scan_combined_gradients_and_final_states():
    mixer = hf_mamba2_mixer(2).double()
    hidden = torch.randn(2, 10, 16, dtype=torch.float64)
    weights = list(mixer.parameters())
    out, final = mamba_split_conv1d_scan_combined(*split_args(mixer, hidden), **split_kwargs(mixer), return_final_states=True)
    got = torch.autograd.grad(out.square().sum(), weights)
    expected = torch.autograd.grad(mamba_split_conv1d_scan_ref(*split_args(mixer, hidden), **split_kwargs(mixer)).square().sum(), weights)
    for g, e, (name, _) in zip(got, expected, mixer.named_parameters()):
        assert_close(g, e, msg=name)
    # The final state is the SSD state after the last step of the conv output's x, B and C.
    zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk = split_args(mixer, hidden)
    xBC = causal_conv1d_ref(zxbcdt[..., 32:80].transpose(1, 2), conv_w, conv_b, activation="silu").transpose(1, 2)
    x, B, C = xBC.split([32, 8, 8], dim=-1)
    _, expected_final = mamba_chunk_scan_ref(
        x.reshape(2, 10, 8, 4), zxbcdt[..., 80:], A, B.reshape(2, 10, 2, 4), C.reshape(2, 10, 2, 4), chunk,
        D=D, dt_bias=dt_bias, dt_softplus=True, return_final_states=True,
    )
    assert final.shape == (2, 8, 4, 4)
    assert_close(final, expected_final)


def test_mamba_split_conv1d_scan_combined_mlp_branch_and_z_gate():
    """d_mlp > 0 puts silu(z0) * x0 in front; without rmsnorm_weight, z gates inside the scan."""
    mixer = hf_mamba2_mixer(1)
    hidden = torch.randn(1, 5, 16)
    zxbcdt = mixer.in_proj(hidden).detach()
    zx0 = torch.randn(1, 5, 6)
    _, conv_w, conv_b, dt_bias, A, D, chunk = split_args(mixer, hidden)
    with torch.no_grad():
        plain = mamba_split_conv1d_scan_combined(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk, headdim=4)
        with_mlp = mamba_split_conv1d_scan_combined(torch.cat([zx0, zxbcdt], -1), conv_w, conv_b, dt_bias, A, D, chunk, headdim=4)
        ref = mamba_split_conv1d_scan_ref(torch.cat([zx0, zxbcdt], -1), conv_w, conv_b, dt_bias, A, D, chunk, headdim=4)
    assert_close(with_mlp, torch.cat([F.silu(zx0[..., :3]) * zx0[..., 3:], plain], -1))
    assert_close(ref, with_mlp)


def test_mamba_split_conv1d_scan_combined_refuses_bad_shapes():
    mixer = hf_mamba2_mixer(1)
    zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk = split_args(mixer, torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="headdim must be given"):
        mamba_split_conv1d_scan_combined(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk)
    with pytest.raises(ValueError, match="zxbcdt must have"):
        mamba_split_conv1d_scan_combined(zxbcdt[..., 1:], conv_w, conv_b, dt_bias, A, D, chunk, headdim=4)
    with pytest.raises(ValueError, match=r"nheads \(8\) must be divisible by ngroups \(3\)"):
        mamba_split_conv1d_scan_combined(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk, headdim=4, ngroups=3)
