"""The PLM objective and its factorisation orders (data.permutation)."""

import pytest
import torch

from lnlm_ssm.data.permutation import draw_targets, factorisation_orders, xlnet_inputs
from lnlm_ssm.models import AnyOrderLM, PermutationLM, preset
from lnlm_ssm.objectives import get_objective


@pytest.mark.parametrize("mode", ["span", "random"])
def test_orders_put_the_targets_last_and_masks_follow_the_order(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (3, 24), generator=g)
    targets = draw_targets(3, 24, mode=mode, generator=g)
    drawn = xlnet_inputs(x, targets, factorisation_orders(targets, generator=g))
    for row in range(3):
        order, targets = drawn.order[row], drawn.targets[row]
        assert torch.equal(order.sort().values, torch.arange(24))
        n = int(targets.sum())
        assert n >= 1 and targets[order[-n:]].all()
        assert torch.equal(order[:-n], (~targets).nonzero().flatten())  # the context in text order
        rank = torch.empty_like(order)
        rank[order] = torch.arange(24)
        for i in range(24):
            for j in range(24):
                hidden = bool(targets[j]) and rank[j] >= rank[i]
                assert bool(drawn.perm_mask[row, i, j]) == hidden
        mapped = drawn.target_mapping[row]
        assert torch.equal(mapped.sum(0).bool(), targets)
        assert torch.equal(drawn.labels[row, :n], x[row, targets])
        assert (drawn.labels[row, n:] == -100).all() and mapped[n:].sum() == 0


def test_target_rates_are_the_defaults():
    g = torch.Generator().manual_seed(0)
    random = draw_targets(4, 60, mode="random", generator=g)
    assert (random.sum(1) == 10).all()  # 1/6 of the positions
    span = draw_targets(200, 60, mode="span", generator=g)
    assert 0.12 < span.float().mean() < 0.2  # about plm_probability = 1/6 of the tokens, in spans of 1..5
    with pytest.raises(ValueError, match="mode must be one of"):
        draw_targets(1, 8, mode="bert")


@pytest.mark.parametrize("name", ["xlnet-tiny", "mamba-plm-tiny"])
def test_plm_objective_trains_both_families(name):
    torch.manual_seed(0)
    small = dict(d_model=32, n_layer=2, vocab_size=50)
    model_cls = PermutationLM if name == "xlnet-tiny" else AnyOrderLM
    if name == "xlnet-tiny":
        small.update(n_head=4, d_inner=64)
    model = model_cls(preset(name, **small))
    objective = get_objective("plm")
    assert model.architecture in objective.architectures
    batch = torch.randint(0, 50, (2, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = objective(model, batch).loss
    for _ in range(10):
        optimizer.zero_grad()
        loss = objective(model, batch).loss
        loss.backward()
        optimizer.step()
    assert torch.isfinite(first) and objective(model, batch).loss < first


def test_any_order_loss_is_over_the_targets_only(monkeypatch):
    """Partial prediction (XLNet's K = 6): the steps that predict a non-target are not in the loss."""
    import lnlm_ssm.objectives.plm as plm

    torch.manual_seed(0)
    model = AnyOrderLM(preset("mamba-plm-tiny", d_model=32, n_layer=2, vocab_size=50)).eval()
    batch = torch.randint(0, 50, (2, 12))
    targets = torch.zeros(2, 12, dtype=torch.bool)
    targets[0, [3, 4]] = True
    targets[1, [0, 7, 11]] = True
    order = factorisation_orders(targets, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(plm, "draw_targets", lambda *a, **k: targets)
    monkeypatch.setattr(plm, "factorisation_orders", lambda *a, **k: order)
    loss = get_objective("plm")(model, batch).loss

    logits = model(batch, order).logits
    predicted = batch.gather(1, order)[:, 1:]  # step t predicts the token at order[t + 1]
    is_target = targets.gather(1, order)[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][is_target], predicted[is_target])
    torch.testing.assert_close(loss, expected)
