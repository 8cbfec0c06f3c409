"""ALBERT's sentence-order pairs: the [CLS] A [SEP] B [SEP] layout, token types, padding, label balance."""

import math

import pytest
import torch

from lnlm_ssm.data.sentence_order import sentence_order_pairs
from lnlm_ssm.data.tokenizers import ByteTokenizer, SpecialTokens

BYTE = SpecialTokens.of(ByteTokenizer(), ["cls", "sep", "pad"], needed_by="the tests")
CLS, SEP, PAD = BYTE.cls, BYTE.sep, BYTE.pad


def _check_row(window, ids, types, mask, label):
    """The row is [CLS] first [SEP] second [SEP] [PAD]...; first + second (in order) starts the window."""
    seps = (ids == SEP).nonzero().flatten().tolist()
    assert ids[0] == CLS and len(seps) == 2, ids
    s1, s2 = seps
    first, second = ids[1:s1], ids[s1 + 1 : s2]
    assert len(first) >= 1 and len(second) >= 1
    a, b = (second, first) if label == 1 else (first, second)
    assert torch.equal(torch.cat([a, b]), window[: len(a) + len(b)])
    assert (ids[s2 + 1 :] == PAD).all()
    assert types.tolist() == [0] * (s1 + 1) + [1] * (s2 - s1) + [0] * (len(ids) - s2 - 1)
    assert mask.tolist() == [1] * (s2 + 1) + [0] * (len(ids) - s2 - 1)
    return len(ids) - s2 - 1  # padding


def test_pairs_layout_padding_and_label_balance():
    rows, seqlen = 4000, 24
    # Distinct text ids per position, so segments can be traced back to the window.
    windows = torch.arange(seqlen).repeat(rows, 1) + torch.randint(0, 200, (rows, 1))
    pairs = sentence_order_pairs(windows, BYTE, generator=torch.Generator().manual_seed(0))
    assert pairs.input_ids.shape == pairs.token_type_ids.shape == pairs.attention_mask.shape == (rows, seqlen)
    padded = 0
    for i in range(200):
        padded += _check_row(windows[i], pairs.input_ids[i], pairs.token_type_ids[i], pairs.attention_mask[i],
                             int(pairs.sentence_order_label[i])) > 0
    swapped = int(pairs.sentence_order_label.sum())
    assert abs(swapped - rows / 2) <= 5 * math.sqrt(rows / 4), swapped
    short = int((pairs.attention_mask[:, -1] == 0).sum())  # rows shorter than the window
    assert abs(short - rows * 0.1) <= 5 * math.sqrt(rows * 0.09), short
    assert 0 < padded < 200
    # The cut between A and B takes every place.
    first_sep = (pairs.input_ids == SEP).int().argmax(dim=1)
    assert set(first_sep.tolist()) == set(range(2, seqlen - 2))


def test_pairs_are_seeded_and_need_their_specials():
    windows = torch.randint(0, 256, (8, 16))
    one = sentence_order_pairs(windows, BYTE, generator=torch.Generator().manual_seed(3))
    two = sentence_order_pairs(windows, BYTE, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    full = sentence_order_pairs(windows, BYTE, short_fraction=0.0)
    assert (full.attention_mask == 1).all()
    with pytest.raises(ValueError, match="seqlen >= 5"):
        sentence_order_pairs(windows[:, :4], BYTE)
    with pytest.raises(ValueError, match="tokens must have cls, sep and pad ids; pad is None"):
        sentence_order_pairs(windows, SpecialTokens(vocab_size=261, special=(), cls=CLS, sep=SEP))
    with pytest.raises(ValueError, match="short_fraction must be a number in"):
        sentence_order_pairs(windows, BYTE, short_fraction=2)
