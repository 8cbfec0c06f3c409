"""Generation: cache paths against full forwards, greedy decoding, padding, chunked prefill, sampling."""

import math

import pytest
import torch

from lnlm_ssm.generation import (
    apply_repetition_penalty,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from lnlm_ssm.layers import InferenceCache
from lnlm_ssm.models import MambaLM, MambaLMConfig
from lnlm_ssm.utils.testing import assert_close

ATTN_CFG = {"num_heads": 4, "rotary_emb_dim": 8}
MAMBA2_CFG = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}
CONFIGS = {
    "mamba1": dict(ssm_cfg={"d_state": 8}),
    "mamba2": dict(ssm_cfg=MAMBA2_CFG),
    "attention": dict(layer_pattern="A", attn_cfg=ATTN_CFG, d_intermediate=48),
    "hybrid": dict(layer_pattern="MA", ssm_cfg=MAMBA2_CFG, attn_cfg=ATTN_CFG),
}
KINDS = sorted(CONFIGS)


def tiny(kind, **overrides):
    fields = dict(d_model=32, n_layer=2, vocab_size=256, **CONFIGS[kind])
    fields.update(overrides)
    return MambaLM(MambaLMConfig(**fields)).eval()


def greedy_by_full_forward(model, ids, steps):
    """The reference: re-run the whole sequence for every new token, take the argmax."""
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_cached_steps_match_full_forward(kind):
    # Prefill 11 (more than one Mamba-2 chunk) then 5 decode steps; every logit as in one full forward.
    model = tiny(kind)
    ids = torch.randint(0, 256, (2, 16))
    full = model(ids).logits
    cache = model.allocate_cache(2, 16)
    logits = [model(ids[:, :11], cache=cache).logits]
    logits += [model(ids[:, t : t + 1], cache=cache).logits for t in range(11, 16)]
    assert cache.seqlen == 16
    assert_close(torch.cat(logits, dim=1), full)


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_matches_full_forward_argmax(kind):
    model = tiny(kind)
    prompt = torch.randint(0, 256, (2, 6))
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert out.shape == (2, 14)
    assert torch.equal(out, greedy_by_full_forward(model, prompt, 8))
    assert torch.equal(model.generate(prompt, max_new_tokens=8, top_k=1), out)


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_matches_each_prompt_alone(kind):
    model = tiny(kind)
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 7, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        ids[row, : width - len(p)] = 17  # a real token id as padding: it must not matter
        mask[row, width - len(p) :] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, temperature=0)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=6, temperature=0)
        assert torch.equal(batched[row, width:], alone[0, len(p) :]), f"row {row}"


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_in_two_pieces_equals_one(kind):
    model = tiny(kind)
    ids = torch.randint(0, 256, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # the first piece carries left padding; the cache must remember it
    one = model.allocate_cache(2, 20)
    logits_one = model(ids, attention_mask=mask, cache=one).logits
    two = model.allocate_cache(2, 20)
    model(ids[:, :9], attention_mask=mask[:, :9], cache=two)
    logits_two = model(ids[:, 9:], cache=two).logits
    assert_close(logits_two, logits_one[:, 9:])
    for a, b in zip(two.tensors(), one.tensors()):
        assert_close(a, b)
    assert torch.equal(two.mask, one.mask)
    # generate continues from a cache (chunked prefill through generate itself).
    out_one = model.generate(ids, attention_mask=mask, max_new_tokens=4, temperature=0)
    cache = model.allocate_cache(2, 17)
    model(ids[:, :9], attention_mask=mask[:, :9], cache=cache)
    out_two = model.generate(ids[:, 9:], cache=cache, max_new_tokens=4, temperature=0)
    assert torch.equal(out_two[:, 4:], out_one[:, 13:])


@torch.no_grad()
def test_streamer_and_eos():
    model = tiny("mamba1")
    prompt = torch.randint(0, 256, (2, 5))
    free = model.generate(prompt, max_new_tokens=8, temperature=0)
    eos = int(free[0, 7])  # row 0's third new token
    streamed = []
    out = model.generate(prompt, max_new_tokens=8, temperature=0, eos_token_id=eos, streamer=streamed.append)
    assert len(streamed) == out.shape[1] - 5 and all(t.shape == (2,) for t in streamed)
    assert torch.equal(torch.stack(streamed, dim=1), out[:, 5:])
    for row in range(2):
        new = out[row, 5:]
        hits = (new == eos).nonzero()
        if len(hits):
            first = int(hits[0])
            assert torch.equal(new[:first], free[row, 5 : 5 + first])
            assert (new[first:] == eos).all(), "a finished row keeps emitting eos"
        else:
            assert torch.equal(new, free[row, 5:])
    # Both rows finish -> generation stops before max_new_tokens.
    first_eos = int((free[0, 5:] == eos).nonzero()[0])
    single = model.generate(prompt[:1], max_new_tokens=8, temperature=0, eos_token_id=eos)
    assert torch.equal(single[0], free[0, : 5 + first_eos + 1])


@torch.no_grad()
def test_seeded_sampling_is_reproducible():
    model = tiny("mamba2")
    prompt = torch.randint(0, 256, (2, 4))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, max_new_tokens=10, temperature=1.0, top_p=0.95, generator=g)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [0.0, -1.0, 2.0, 1.0]])
    out = top_k_filter(logits, 2)
    inf = float("-inf")
    assert torch.equal(out, torch.tensor([[inf, 5.0, inf, 4.0], [inf, inf, 2.0, 1.0]]))
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_filter():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    # Sorted: 0.5, 0.3, 0.15, 0.05. Mass before each: 0, 0.5, 0.8, 0.95.
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.7) == [False, True, False, True]
    assert kept(0.9) == [True, True, False, True]
    assert kept(0.01) == [False, True, False, False]  # the most likely token always stays
    assert kept(1.0) == [True, True, True, True]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


@torch.no_grad()
def test_repetition_penalty_in_generate_matches_a_full_forward_loop():
    model = tiny("mamba1")
    prompt = torch.randint(0, 256, (1, 5))
    # Pad with the token greedy decoding picks first: were padding penalised, the first pick would change.
    pad = int(model(prompt).logits[0, -1].argmax())
    ids = torch.cat([torch.full((1, 2), pad), prompt], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, temperature=0, repetition_penalty=1.8)
    expected = prompt
    for _ in range(10):
        seen = torch.zeros(1, 256, dtype=torch.bool)
        seen[0, expected[0]] = True
        logits = apply_repetition_penalty(model(expected).logits[:, -1], seen, 1.8)
        expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out[:, 2:], expected)
    assert not torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=10, temperature=0))


def test_temperature_scales_sampling_distribution():
    # Probabilities 1/4, 3/4 at temperature 1; at temperature T they are proportional to 1, 3^(1/T).
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(4000, 2)
    g = torch.Generator().manual_seed(0)
    for temperature, p1 in ((1.0, 0.75), (2.0, 3**0.5 / (1 + 3**0.5)), (0.5, 0.9)):
        freq = sample_next_token(logits, temperature=temperature, generator=g).float().mean().item()
        assert abs(freq - p1) < 0.03, (temperature, freq, p1)
    assert torch.equal(sample_next_token(torch.tensor([[0.1, 0.3, 0.2]]), temperature=0), torch.tensor([1]))


def test_generate_validation():
    model = tiny("mamba1")
    ids = torch.randint(0, 256, (2, 4))
    with pytest.raises(ValueError, match="left"):
        model.generate(ids, max_new_tokens=2, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="max_seqlen"):
        model.generate(ids, max_new_tokens=5, cache=model.allocate_cache(2, 8))
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate(ids + 300, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="batch"):
        model.generate(ids, max_new_tokens=2, cache=model.allocate_cache(3, 8))
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(ids, max_new_tokens=2, cuda_graph=True)
    assert isinstance(model.allocate_cache(2, 8), InferenceCache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_cuda_graph_decode_matches_eager(kind):
    model = tiny(kind).cuda()
    prompt = torch.randint(0, 256, (2, 6), device="cuda")
    eager = model.generate(prompt, max_new_tokens=8, temperature=0)
    graphed = model.generate(prompt, max_new_tokens=8, temperature=0, cuda_graph=True)
    assert torch.equal(graphed, eager)
    cache = model.allocate_cache(2, 30)
    model(prompt, cache=cache)
    again = model.generate(prompt, max_new_tokens=8, temperature=0, cuda_graph=True, cache=cache)
    assert cache.seqlen == 6 + 6 + 7
    assert again.shape == (2, 14)
