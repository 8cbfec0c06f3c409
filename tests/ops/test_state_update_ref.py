"""The decode step equals one step of the scans, in both layouts; on a pool it is gather, step, scatter."""

import inspect

import pytest
import torch

from lnlm_ssm.ops import selective_scan_ref, selective_state_update, selective_state_update_ref, ssd_recurrent_ref
from lnlm_ssm.ops.state_update.shapes import check_state_batch_indices
from lnlm_ssm.utils.testing import assert_close
import state_update_cases as cases

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


# ---------------------------------------------------------------- state_batch_indices: a pool of states


def test_signatures_are_mamba_ssms():
    """Positional order and defaults as in mamba_ssm; ``backend`` is ours and keyword-only."""
    public = inspect.signature(selective_state_update).parameters
    assert list(public) == ["state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus",
                            "state_batch_indices", "backend"]
    assert all(public[name].default is None for name in ("D", "z", "dt_bias", "state_batch_indices"))
    assert public["dt_softplus"].default is False
    assert public["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    # mamba_ssm's selective_state_update_ref has no state_batch_indices.
    assert list(inspect.signature(selective_state_update_ref).parameters) == list(public)[:10]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_pool_equals_gather_step_scatter(layout, index_dtype):
    args, indices = cases.make_pooled_inputs(layout, f64, f64, index_dtype=index_dtype)
    cases.check_pooled_against_reference(args, indices, "reference")


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_pool_in_low_precision_with_groups(layout):
    args, indices = cases.make_pooled_inputs(layout, torch.bfloat16, torch.float32, ngroups=4, nheads=4, headdim=2)
    cases.check_pooled_against_reference(args, indices, "reference")


def test_pool_passed_positionally_as_in_mamba_ssm():
    args, indices = cases.make_pooled_inputs("mamba2", f64, f64, optional=False)
    pool = args[0].clone()
    y = selective_state_update(pool, *args[1:], True, indices)
    y_expected, pool_expected = cases.pooled_step_by_rows(args, indices)
    assert_close(y, y_expected)
    assert_close(pool, pool_expected)


def test_identity_indices_equal_no_indices():
    args = cases.make_inputs("mamba2", f64, f64)
    with_indices, without = args[0].clone(), args[0].clone()
    y = selective_state_update(with_indices, *args[1:], True, torch.arange(args[0].shape[0]))
    y_plain = selective_state_update(without, *args[1:], True)
    assert torch.equal(y, y_plain) and torch.equal(with_indices, without)


def test_only_padding_rows_leave_the_pool_as_it_was():
    args, indices = cases.make_pooled_inputs("mamba1", f64, f64, slots=(-1, -1, -1))
    pool = args[0].clone()
    y = selective_state_update(pool, *args[1:], True, indices)
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(pool, args[0])


def test_empty_batch_with_indices():
    args, indices = cases.make_pooled_inputs("mamba2", f64, f64, slots=())
    y = selective_state_update(*args, True, indices)
    assert y.shape == (0, 4, 8)


def test_index_check_compiles_to_an_assert_on_the_device():
    """Under torch.compile (as on a GPU) the values are checked without reading them back to the host."""
    check = torch.compile(check_state_batch_indices, fullgraph=True, dynamic=False)  # .item() would break the graph
    check(torch.tensor([2, -1, 0, -1]), 3)
    for bad in ([3, -1, 0, -1], [2, -1, 2, -1]):
        with pytest.raises(RuntimeError, match=r"state_batch_indices must be distinct slots in \[0, pool=3\)"):
            check(torch.tensor(bad), 3)
