"""DPO: the shared-prefix forward equals two full forwards (loss and gradients), and a synthetic preference
is learnt (held-out reward accuracy well above chance)."""

import copy
import random

import pytest
import torch

from lnlm_ssm.data.finetune import Encoder, collate
from lnlm_ssm.data.tokenizers import ByteTokenizer
from lnlm_ssm.models import MambaLM, MambaLMConfig
from lnlm_ssm.objectives import DPOObjective
from lnlm_ssm.objectives.dpo import completion_logprobs

ATTN = {"num_heads": 2, "head_dim": 16, "rotary_emb_dim": 16}
CONFIGS = {
    "mamba1": dict(ssm_cfg={"layer": "Mamba1", "d_state": 8}),
    "mamba2": dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}),
    "hybrid": dict(layer_pattern="MA", ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8},
                   attn_cfg=ATTN),
    "attention": dict(layer_pattern="A", d_intermediate=64, attn_cfg=ATTN),
}


def tiny(kind, seed=0):
    torch.manual_seed(seed)
    return MambaLM(MambaLMConfig(d_model=32, n_layer=2, vocab_size=257, **CONFIGS[kind]))


def pairs_batch(rows):
    encoder = Encoder(ByteTokenizer(), "pairs", max_len=32)
    return collate([encoder.encode(row, None, i) for i, row in enumerate(rows)], "pairs")


ROWS = [
    {"prompt": "def f(x):", "chosen": " return x", "rejected": " pass"},
    {"prompt": "a", "chosen": "bcdefghij", "rejected": "z"},
    {"prompt": "import os, sys\n", "chosen": "os", "rejected": "sys.path"},
]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_shared_prefix_equals_two_full_forwards(kind):
    model = tiny(kind)
    objective = DPOObjective(beta=0.5, label_smoothing=0.1)
    objective.reference = tiny(kind, seed=1).requires_grad_(False)
    batch = pairs_batch(ROWS)
    results = []
    for shared in (True, False):
        objective.shared_prefix = shared
        model.zero_grad()
        out = objective(model, batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.metrics, grads))
    (loss_s, metrics_s, grads_s), (loss_f, metrics_f, grads_f) = results
    torch.testing.assert_close(loss_s, loss_f, rtol=1e-5, atol=1e-6)
    for name in metrics_f:
        torch.testing.assert_close(metrics_s[name], metrics_f[name], rtol=1e-5, atol=1e-5)
    assert grads_s.keys() == grads_f.keys() and len(grads_f) == len(list(model.parameters()))
    for name in grads_f:
        torch.testing.assert_close(grads_s[name], grads_f[name], rtol=1e-4, atol=1e-6, msg=name)
    # The prompt's own weights get gradient through the shared state: the embedding row of a prompt-only byte.
    assert grads_s["backbone.embedding.weight"][ord("(")].abs().sum() > 0


def test_completion_logprobs_shared_prefix_without_grad_matches():
    model = tiny("hybrid").eval()
    batch = pairs_batch(ROWS)
    with torch.no_grad():
        shared = completion_logprobs(model, batch, shared_prefix=True)
        full = completion_logprobs(model, batch, shared_prefix=False)
    for a, b in zip(shared, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def synthetic_rows(n, seed):
    """The chosen completion repeats the prompt's last letter; the rejected one is another letter."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
        other = rng.choice([c for c in "abcdefgh" if c != prompt[-1]])
        rows.append({"prompt": prompt, "chosen": prompt[-1] * 3, "rejected": other * 3})
    return rows


def test_dpo_learns_a_synthetic_preference():
    model = tiny("mamba1")
    objective = DPOObjective(beta=0.1)
    objective.reference = copy.deepcopy(model).requires_grad_(False)
    held_out = pairs_batch(synthetic_rows(64, seed=1))
    with torch.no_grad():
        before = objective(model, held_out).metrics["reward_margin"].item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train = synthetic_rows(8 * 12, seed=0)
    for step in range(12):
        loss = objective(model, pairs_batch(train[8 * step : 8 * (step + 1)])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        metrics = objective(model, held_out).metrics
    assert abs(before) < 1e-5  # the policy starts as the reference
    assert metrics["reward_accuracy"].item() >= 0.7, metrics  # chance: 0.5
    assert metrics["reward_margin"].item() > 0
