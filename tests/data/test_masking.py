"""Masking collators: the rates of BERT/RoBERTa's and ELECTRA's schemes (within binomial tolerance on a large
batch), labels consistent with the ids, specials never chosen, fresh draws per call, the encoder frame."""

import math

import pytest
import torch

from lnlm_ssm.data.masking import ELECTRA_MASKING, MLM_MASKING, MaskingScheme, frame, mask_tokens
from lnlm_ssm.data.tokenizers import AminoAcidTokenizer, ByteTokenizer, SpecialTokens

BYTE = SpecialTokens.of(ByteTokenizer(), ["mask", "cls", "sep", "pad"], needed_by="the tests")


def _batch(rows=512, seqlen=128, seed=0):
    """Random bytes with specials (eos, pad, cls, sep) in known places."""
    ids = torch.randint(0, 256, (rows, seqlen), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = BYTE.cls
    ids[:, 40] = ByteTokenizer.eos_token_id
    ids[:, -9] = BYTE.sep
    ids[:, -8:] = BYTE.pad
    return ids


def _within(count, n, p, sds=5.0):
    """``count`` out of ``n`` is within ``sds`` binomial standard deviations of ``n * p``."""
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("scheme", [MLM_MASKING, ELECTRA_MASKING], ids=["mlm", "electra"])
def test_masking_rates_labels_and_never_masked_specials(scheme):
    ids = _batch()
    out = mask_tokens(ids, BYTE, scheme, generator=torch.Generator().manual_seed(1))
    text = ids < 256
    chosen = out.labels != -100
    assert not (chosen & ~text).any(), "a special was chosen"
    assert torch.equal(out.labels[chosen], ids[chosen]) and (out.labels[~chosen] == -100).all()
    assert torch.equal(out.input_ids[~chosen], ids[~chosen]), "a token not chosen was changed"
    n_text, n_chosen = int(text.sum()), int(chosen.sum())
    assert _within(n_chosen, n_text, scheme.rate), (n_chosen, n_text)

    masked = int((out.input_ids[chosen] == BYTE.mask).sum())
    random = out.input_ids[chosen & (out.input_ids != BYTE.mask) & (out.input_ids != ids)]
    # A random replacement equal to the original (1 in 256) looks kept.
    assert _within(masked, n_chosen, scheme.mask_fraction)
    assert _within(len(random), n_chosen, scheme.random_fraction * 255 / 256)
    assert ((random >= 0) & (random < 256)).all(), "a random replacement was a special"
    if scheme.random_fraction == 0:
        assert len(random) == 0


def test_random_replacements_of_amino_acids_are_residues():
    amino = SpecialTokens.of(AminoAcidTokenizer(), ["mask"], needed_by="the test")
    ids = torch.randint(3, 28, (256, 64), generator=torch.Generator().manual_seed(0))
    ids[:, ::16] = AminoAcidTokenizer.eos_token_id
    scheme = MaskingScheme(rate=0.5, mask_fraction=0.0, random_fraction=1.0)
    out = mask_tokens(ids, amino, scheme, generator=torch.Generator().manual_seed(0))
    chosen = out.labels != -100
    replaced = out.input_ids[chosen]
    assert ((replaced >= 3) & (replaced < 28)).all() and len(torch.unique(replaced)) == 25
    assert (out.input_ids[:, ::16] == AminoAcidTokenizer.eos_token_id).all()


def test_every_row_with_text_gets_a_chosen_token():
    ids = torch.full((2000, 6), BYTE.pad)
    ids[:, 0], ids[:, 3] = BYTE.cls, BYTE.sep
    ids[:1000, 1:3] = 65  # two text tokens; rows 1000.. have none
    out = mask_tokens(ids, BYTE, generator=torch.Generator().manual_seed(0))
    chosen = out.labels != -100
    assert (chosen[:1000].sum(dim=1) >= 1).all() and not chosen[1000:].any()
    assert not chosen[:, [0, 3, 4, 5]].any()
    # Either text token may be the forced one.
    assert chosen[:1000, 1].any() and chosen[:1000, 2].any()


def test_masks_are_drawn_afresh_and_a_seed_repeats_them():
    ids = _batch(rows=8, seqlen=64)
    gen = torch.Generator().manual_seed(5)
    first, second = mask_tokens(ids, BYTE, generator=gen), mask_tokens(ids, BYTE, generator=gen)
    assert not torch.equal(first.labels, second.labels)
    again = mask_tokens(ids, BYTE, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.input_ids, first.input_ids) and torch.equal(again.labels, first.labels)


def test_frame_wraps_a_window_in_cls_and_sep():
    windows = torch.arange(10).reshape(2, 5)
    assert frame(windows, BYTE).tolist() == [[259, 0, 1, 2, 260], [259, 5, 6, 7, 260]]
    with pytest.raises(ValueError, match="seqlen >= 3"):
        frame(windows[:, :2], BYTE)
    with pytest.raises(ValueError, match="tokens.cls and tokens.sep must be ids"):
        frame(windows, SpecialTokens(vocab_size=261, special=(256,), mask=258))


def test_bad_schemes_and_inputs_are_errors():
    with pytest.raises(ValueError, match="rate must be a number in"):
        MaskingScheme(rate=1.5, mask_fraction=0.8, random_fraction=0.1)
    with pytest.raises(ValueError, match="rate must be > 0"):
        MaskingScheme(rate=0, mask_fraction=0.8, random_fraction=0.1)
    with pytest.raises(ValueError, match="mask_fraction \\+ random_fraction must be <= 1"):
        MaskingScheme(rate=0.15, mask_fraction=0.8, random_fraction=0.3)
    with pytest.raises(ValueError, match="input_ids must be a \\(batch, seqlen\\) int64 tensor"):
        mask_tokens(torch.zeros(4, dtype=torch.long), BYTE)
    with pytest.raises(ValueError, match="tokens.mask must be the \\[MASK\\] id"):
        mask_tokens(_batch(2, 64), SpecialTokens(vocab_size=261, special=(256,)))
