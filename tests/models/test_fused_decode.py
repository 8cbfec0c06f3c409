"""MambaLM's fused CPU decode step (``fused_decoder``, one C++ call per block) against the op-by-op forward.

Logits within the fp32 tolerance, the same cache states after every step, and
identical greedy tokens through ``generate``, for every block kind it covers;
models it does not cover say why and decode op by op.
"""

import pytest
import torch

from lnlm_ssm import quantize_
from lnlm_ssm.layers.block_step import FusedStepUnsupported
from lnlm_ssm.models import MambaLM, MambaLMConfig
from lnlm_ssm.utils.testing import assert_close

MAMBA2_CFG = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}
FUSED = {
    "mamba1": dict(ssm_cfg={"d_state": 8}),
    "mamba2": dict(ssm_cfg=MAMBA2_CFG),
    # an MLP after each mixer, LayerNorm blocks, biases everywhere they can be
    "mamba1-mlp-layernorm": dict(ssm_cfg={"d_state": 8, "bias": True}, d_intermediate=48, rms_norm=False),
    # no gated norm (the state update gates), a dt limit, D per channel, two groups
    "mamba2-variants": dict(
        ssm_cfg={**MAMBA2_CFG, "rmsnorm": False, "dt_limit": (0.01, 0.05), "D_has_hdim": True, "ngroups": 2},
        d_intermediate=40,
    ),
    "attention-mlp": dict(layer_pattern="A", attn_cfg={"num_heads": 4, "rotary_emb_dim": 8}, d_intermediate=48),
    # GQA, interleaved RoPE on part of the head, a sliding window shorter than the sequence
    "hybrid": dict(
        layer_pattern="MA", ssm_cfg=MAMBA2_CFG,
        attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 4, "rotary_emb_interleaved": True,
                  "sliding_window": 5},
    ),
}


def tiny(kind=None, backend="auto", **fields):
    config = dict(d_model=32, n_layer=2, vocab_size=256, **(FUSED[kind] if kind else {}))
    config.update(fields)
    return MambaLM(MambaLMConfig(**config), backend=backend).eval()


@torch.no_grad()
@pytest.mark.parametrize("kind", sorted(FUSED))
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_steps_match_the_forward(kind, batch):
    model = tiny(kind)
    ids = torch.randint(0, 256, (batch, 12))
    fused_cache, cache = model.allocate_cache(batch, 12), model.allocate_cache(batch, 12)
    model(ids[:, :7], cache=fused_cache)
    model(ids[:, :7], cache=cache)
    step = model.fused_decoder(fused_cache)
    for t in range(7, 12):
        logits = step(ids[:, t : t + 1])
        expected = model(ids[:, t : t + 1], cache=cache).logits[:, -1]
        assert logits.shape == (batch, 256)
        assert_close(logits, expected, msg=f"logits at {t}")
        for ours, theirs in zip(fused_cache.tensors(), cache.tensors()):
            assert_close(ours, theirs, msg=f"states at {t}")
        assert fused_cache.seqlen == cache.seqlen == t + 1
        assert [c.seqlen for c in fused_cache.layers] == [c.seqlen for c in cache.layers]
    with pytest.raises(ValueError, match="cannot take 1 more"):
        step(ids[:, :1])
    with pytest.raises(ValueError, match=r"input_ids must be a tensor of shape \(batch, 1\)"):
        model.fused_decoder(cache)(ids[:, :2])


@torch.no_grad()
@pytest.mark.parametrize("kind", sorted(FUSED))
def test_greedy_tokens_are_the_unfused_ones(kind):
    model = tiny(kind)
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 7, 5)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 7 - len(p) :], mask[row, 7 - len(p) :] = p, 1
    kwargs = dict(attention_mask=mask, max_new_tokens=12, temperature=0)
    fused = model.generate(ids, fused_step=True, **kwargs)
    assert torch.equal(fused, model.generate(ids, fused_step=False, **kwargs))
    eos = int(fused[0, 9])
    assert torch.equal(
        model.generate(ids, fused_step=True, eos_token_id=eos, **kwargs),
        model.generate(ids, fused_step=False, eos_token_id=eos, **kwargs),
    )


@torch.no_grad()
@pytest.mark.parametrize("mode", ["int8", "bf16"])
@pytest.mark.parametrize("kind, d_model", [("mamba1", 32), ("mamba1", 256)] + [(kind, 32) for kind in sorted(FUSED) if kind != "mamba1"])
def test_quantized_fused_steps_match_the_quantized_forward(mode, kind, d_model):
    # d_model 256: in_proj and the LM head read 256-long rows, out_proj 512-long ones (the kernels'
    # main loops, not only their tails).
    model = quantize_(tiny(kind, d_model=d_model), mode)
    ids = torch.randint(0, 256, (3, 12))
    fused_cache, cache = model.allocate_cache(3, 12), model.allocate_cache(3, 12)
    model(ids[:, :7], cache=fused_cache)
    model(ids[:, :7], cache=cache)
    step = model.fused_decoder(fused_cache)
    for t in range(7, 12):
        logits = step(ids[:, t : t + 1])
        assert_close(logits, model(ids[:, t : t + 1], cache=cache).logits[:, -1], msg=f"logits at {t}")
        for ours, theirs in zip(fused_cache.tensors(), cache.tensors()):
            assert_close(ours, theirs, msg=f"states at {t}")
    prompt = torch.randint(0, 256, (2, 5))
    kwargs = dict(max_new_tokens=12, temperature=0)
    assert torch.equal(model.generate(prompt, fused_step=True, **kwargs), model.generate(prompt, fused_step=False, **kwargs))


@torch.no_grad()
def test_generate_takes_the_fused_step_by_default(monkeypatch):
    model = tiny("mamba1")
    built = []
    build = model.fused_decoder
    monkeypatch.setattr(model, "fused_decoder", lambda cache: built.append(cache) or build(cache))
    prompt = torch.randint(0, 256, (1, 4))
    model.generate(prompt, max_new_tokens=3, temperature=0)
    assert len(built) == 1
    model.generate(prompt, max_new_tokens=3, temperature=0, fused_step=False)
    assert len(built) == 1


def gelu_mlp():
    model = tiny("mamba1-mlp-layernorm")
    model.backbone.layers[1].mlp.activation = torch.nn.functional.gelu
    return model


@torch.no_grad()
@pytest.mark.parametrize("model, reason", [
    (gelu_mlp, "only a GatedMLP with the silu activation"),
    (lambda: tiny("mamba1", backend="reference"), "this model's backend is 'reference'"),
    (lambda: tiny("mamba1").to(torch.bfloat16), "runs float32 on the CPU"),
])
def test_models_without_a_fused_step_say_why_and_decode_unfused(model, reason):
    model = model()
    cache = model.allocate_cache(1, 8)
    with pytest.raises(FusedStepUnsupported, match=reason):
        model.fused_decoder(cache)
    prompt = torch.randint(0, 256, (1, 4))
    with pytest.raises(ValueError, match=f"fused_step=True: .*{reason}"):
        model.generate(prompt, max_new_tokens=2, fused_step=True)
    assert torch.equal(
        model.generate(prompt, max_new_tokens=3, temperature=0),
        model.generate(prompt, max_new_tokens=3, temperature=0, fused_step=False),
    )


def test_generate_checks_fused_step():
    model = tiny("mamba1")
    with pytest.raises(TypeError, match="fused_step must be None"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), max_new_tokens=1, fused_step="yes")
