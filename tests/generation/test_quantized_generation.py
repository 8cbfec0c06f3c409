"""Generation with a quantised model (lnlm_ssm.quantize_): greedy decoding through the cache, as in full forwards."""

import pytest
import torch

from lnlm_ssm.layers import quantize_
from lnlm_ssm.models import MambaLM, MambaLMConfig

ATTN_CFG = {"num_heads": 4, "rotary_emb_dim": 8}
MAMBA2_CFG = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}
CONFIGS = {
    "mamba1": dict(ssm_cfg={"d_state": 8}),
    "mamba2": dict(ssm_cfg=MAMBA2_CFG),
    "attention": dict(layer_pattern="A", attn_cfg=ATTN_CFG, d_intermediate=48),
    "hybrid": dict(layer_pattern="MA", ssm_cfg=MAMBA2_CFG, attn_cfg=ATTN_CFG),
}


def greedy_by_full_forward(model, ids, steps):
    """The reference: re-run the whole sequence for every new token (no cache), take the argmax."""
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
@pytest.mark.parametrize("mode", ["int8", "bf16"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_greedy_generate_matches_full_forward_argmax(kind, mode):
    torch.manual_seed(0)
    model = quantize_(MambaLM(MambaLMConfig(d_model=64, n_layer=2, vocab_size=256, **CONFIGS[kind])).eval(), mode)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert out.shape == (2, 14)
    assert torch.equal(out, greedy_by_full_forward(model, prompt, 8))
    # Sampling runs too, and is reproducible under a seed.
    sampled = [
        model.generate(prompt, max_new_tokens=5, top_k=20, generator=torch.Generator().manual_seed(2))
        for _ in range(2)
    ]
    assert torch.equal(sampled[0], sampled[1])
