"""The decode step equals one step of the scans, in both layouts."""

import pytest
import torch

from lnlm_ssm.ops import selective_scan_ref, selective_state_update, selective_state_update_ref, ssd_recurrent_ref
from lnlm_ssm.utils.testing import assert_close

f64 = torch.float64


@pytest.mark.parametrize("grouped", [False, True])
def test_mamba1_steps_equal_selective_scan(grouped):
    batch, dim, dstate, seqlen = 2, 6, 4, 5
    u, delta, z = (torch.randn(batch, dim, seqlen, dtype=f64) for _ in range(3))
    A = -torch.rand(dim, dstate, dtype=f64)
    bc = (batch, 2, dstate, seqlen) if grouped else (batch, dstate, seqlen)
    B, C = torch.randn(*bc, dtype=f64), torch.randn(*bc, dtype=f64)
    D, delta_bias = torch.randn(dim, dtype=f64), torch.randn(dim, dtype=f64)
    h0 = torch.randn(batch, dim, dstate, dtype=f64)
    y, last = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, True, True, initial_state=h0)

    state = h0.clone()
    for t in range(seqlen):
        y_t = selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], delta_bias, True)
        assert y_t.shape == (batch, dim)
        assert_close(y_t, y[..., t], msg=f"step {t}")
    assert_close(state, last)


@pytest.mark.parametrize("full_params", [False, True])
def test_mamba2_steps_equal_ssd_recurrence(full_params):
    batch, seqlen, nheads, headdim, ngroups, dstate = 2, 4, 4, 3, 2, 5
    x, z = torch.randn(batch, seqlen, nheads, headdim, dtype=f64), torch.randn(batch, seqlen, nheads, headdim, dtype=f64)
    dt = torch.randn(batch, seqlen, nheads, dtype=f64)
    A, D, dt_bias = -torch.rand(nheads, dtype=f64), torch.randn(nheads, dtype=f64), torch.randn(nheads, dtype=f64)
    B, C = torch.randn(batch, seqlen, ngroups, dstate, dtype=f64), torch.randn(batch, seqlen, ngroups, dstate, dtype=f64)
    h0 = torch.randn(batch, nheads, headdim, dstate, dtype=f64)
    y, last = ssd_recurrent_ref(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, initial_states=h0, return_final_states=True)

    if full_params:
        # The incumbent's Mamba2 module passes every per-head parameter expanded to (nheads, headdim[, dstate]).
        A_arg = A[:, None, None].expand(nheads, headdim, dstate)
        D_arg, bias_arg = D[:, None].expand(nheads, headdim), dt_bias[:, None].expand(nheads, headdim)
        dt_arg = lambda t: dt[:, t, :, None].expand(batch, nheads, headdim)
    else:
        A_arg, D_arg, bias_arg, dt_arg = A, D, dt_bias, lambda t: dt[:, t]
    state = h0.clone()
    for t in range(seqlen):
        y_t = selective_state_update(state, x[:, t], dt_arg(t), A_arg, B[:, t], C[:, t], D_arg, z[:, t], bias_arg, dt_softplus=True)
        assert_close(y_t, y[:, t], msg=f"step {t}")
    assert_close(state, last)


def test_state_updated_in_place_in_its_own_dtype():
    state = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    before = state.clone()
    data_ptr = state.data_ptr()
    x = torch.randn(1, 2, 3, dtype=torch.bfloat16)
    y = selective_state_update_ref(state, x, torch.rand(1, 2), -torch.rand(2), torch.randn(1, 1, 4, dtype=torch.bfloat16), torch.randn(1, 1, 4, dtype=torch.bfloat16))
    assert state.data_ptr() == data_ptr and state.dtype == torch.bfloat16
    assert not torch.equal(state, before)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
