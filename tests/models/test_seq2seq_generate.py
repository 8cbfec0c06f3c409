"""Seq2SeqLM.generate: beam search finds the exhaustive best on a tiny vocabulary; the encoder and the
cross-attention keys run once; sampling and argument checks."""

import itertools
import math

import pytest
import torch

from lnlm_ssm.models import Seq2SeqConfig, Seq2SeqLM

VOCAB, EOS, START = 5, 1, 0


# Seeds (found by trying) of models whose exhaustive best differs from greedy's output.
SEEDS = {"A": 2, "1": 1}


def tiny(decoder_pattern="A", seed=2):
    torch.manual_seed(seed)
    config = Seq2SeqConfig(
        vocab_size=VOCAB, d_model=16, num_heads=2, head_dim=8, d_ff=32, n_encoder_layer=1, n_decoder_layer=2,
        decoder_pattern=decoder_pattern, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        mixer_cfg={"1": {"d_state": 4}}, pad_vocab_size_multiple=1, eos_token_id=EOS, decoder_start_token_id=START,
        tie_embeddings=False,
    )
    model = Seq2SeqLM(config).eval()
    with torch.no_grad():  # flatter distributions than the init's, where greedy choices are more often wrong
        model.lm_head.weight.normal_(0, 0.3)
    return model


SOURCE = torch.tensor([[2, 3, 4, 2, 3, 0], [4, 4, 2, 3, 0, 0]])
SOURCE_MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
STEPS = 3


def exhaustive_best(model, row, length_penalty):
    """Every output of at most STEPS tokens (ending in eos, or of STEPS tokens without it), scored by
    sum of log-probs / length ** length_penalty: the best (score, ids with the start token)."""
    non_eos = [t for t in range(VOCAB) if t != EOS]
    by_length = [[list(body) + [EOS] for body in itertools.product(non_eos, repeat=n)] for n in range(STEPS)]
    by_length[-1] += [list(body) for body in itertools.product(non_eos, repeat=STEPS)]
    best = (-math.inf, None)
    with torch.no_grad():
        for outputs in by_length:
            ids = torch.tensor([[START] + out for out in outputs])
            n = len(outputs)
            source, mask = SOURCE[row].expand(n, -1), SOURCE_MASK[row].expand(n, -1)
            logits = model(source, mask, decoder_input_ids=ids[:, :-1]).logits
            totals = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).sum((1, 2))
            scores = totals / (ids.shape[1] - 1) ** length_penalty
            i = int(scores.argmax())
            if scores[i] > best[0]:
                best = (scores[i].item(), ids[i].tolist())
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("pattern", ["A", "1"])
def test_beam_search_with_enough_beams_finds_the_exhaustive_best(pattern, length_penalty):
    model = tiny(pattern, SEEDS[pattern])
    # The second step has the most candidates that can end (4 prefixes x 5 tokens): with 20 beams none is dropped.
    beams = model.generate(
        SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=STEPS, num_beams=20, length_penalty=length_penalty
    )
    greedy = model.generate(SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=STEPS)
    differs = False
    for row in range(2):
        score, best = exhaustive_best(model, row, length_penalty)
        got = beams[row].tolist()
        got = got[: got.index(EOS) + 1] if EOS in got else got
        assert got == best, (row, score)
        differs |= greedy[row].tolist()[: len(best)] != best
    assert differs, "the exhaustive best is greedy's in every row: this model cannot tell beam search from greedy"


def test_one_beam_is_greedy():
    model = tiny()
    greedy = model.generate(SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=5)
    assert torch.equal(model.generate(SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=5, num_beams=1), greedy)
    top_1 = model.generate(SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=5, temperature=1.0, top_k=1)
    assert torch.equal(top_1, greedy)


def test_encoder_and_cross_attention_keys_run_once():
    model = tiny("1")
    calls = {"encoder": 0, "memory": 0}
    model.encoder.register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    for layer in model.decoder.layers:
        memory = layer.cross_attn.memory

        def counted(*args, memory=memory, **kwargs):
            calls["memory"] += 1
            return memory(*args, **kwargs)

        layer.cross_attn.memory = counted
    out = model.generate(SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=6, eos_token_id=None)
    assert out.shape == (2, 7)
    assert calls == {"encoder": 1, "memory": len(model.decoder.layers)}


def test_sampling_is_reproducible_with_a_generator():
    model = tiny("1", seed=3)

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return model.generate(SOURCE, max_new_tokens=8, temperature=1.5, eos_token_id=None, generator=generator)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_no_new_tokens_is_the_start_token():
    assert tiny().generate(SOURCE, max_new_tokens=0).tolist() == [[START], [START]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_beams": 0}, "num_beams must be an integer >= 1"),
        ({"num_beams": 2, "temperature": 1.0}, "beam search is deterministic"),
        ({"length_penalty": math.inf}, "length_penalty must be a finite float"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
        ({"eos_token_id": "eos"}, "eos_token_id must be a token id, None"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny().generate(SOURCE, **{"max_new_tokens": 3, **kwargs})
