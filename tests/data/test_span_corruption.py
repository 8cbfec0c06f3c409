"""T5's span corruption: noise density and span statistics, sentinels, and inputs + targets rebuilding the text."""

import pytest
import torch

from lnlm_ssm.data.span_corruption import SpanCorruptionCollator, random_spans_noise_mask, span_corrupt

VOCAB, EOS, PAD = 1000, 1, 0
TOP = VOCAB - 1


def spans_of(mask):
    """Lengths of the runs of True in a 1-D bool mask."""
    runs, current = [], 0
    for value in mask.tolist() + [False]:
        if value:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def rebuild(inputs, targets):
    """The original sequence: each sentinel of the inputs replaced by what follows it in the targets."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t > TOP - 100:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in inputs[:-1].tolist():
        out += spans[t] if t > TOP - 100 else [t]
    return out


def test_noise_density_and_span_lengths():
    generator = torch.Generator().manual_seed(0)
    lengths, middle = [], torch.zeros(200)
    for _ in range(300):
        mask = random_spans_noise_mask(200, generator=generator)
        assert mask.shape == (200,) and int(mask.sum()) == 30  # round(200 * 0.15)
        runs = spans_of(mask)
        assert len(runs) == 10  # round(30 / 3)
        assert not mask[0] and mask[-1], "kept tokens first, a noise span last"
        lengths += runs
        middle += mask.float()
    lengths = torch.tensor(lengths, dtype=torch.float)
    assert lengths.mean().item() == pytest.approx(3.0)
    assert lengths.min() == 1 and lengths.max() > 6, "span lengths vary around their mean"
    # Away from the ends every position is noise about as often as the density.
    rate = middle[20:180] / 300
    assert 0.12 < rate.mean() < 0.18 and rate.min() > 0.05 and rate.max() < 0.3


def test_draws_differ_and_repeat_with_the_seed():
    def draw(seed):
        return random_spans_noise_mask(100, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("length", [2, 5, 37, 512])
def test_inputs_and_targets_rebuild_the_sequence(length):
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(2, 800, (length,), generator=generator)
    inputs, targets = span_corrupt(ids, first_sentinel_id=TOP, eos_token_id=EOS, generator=generator)
    assert rebuild(inputs, targets) == ids.tolist()
    sentinels = [t for t in targets.tolist() if t > TOP - 100]
    assert sentinels == list(range(TOP, TOP - len(sentinels), -1)), "sentinels count down from the top"
    assert [t for t in inputs.tolist() if t > TOP - 100] == sentinels
    assert targets[0] == TOP, "the target starts with the first sentinel"
    noise = max(1, min(round(length * 0.15), length - 1))
    assert len(targets) == noise + len(sentinels) + 1
    assert len(inputs) == length - noise + len(sentinels) + 1


def test_collator_pads_inputs_and_labels():
    collate = SpanCorruptionCollator(
        first_sentinel_id=TOP, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0)
    )
    batch = collate([list(range(2, 42)), list(range(2, 22))])
    assert batch["input_ids"].shape[0] == batch["labels"].shape[0] == 2
    short = batch["attention_mask"][1].sum()
    assert (batch["input_ids"][1, short:] == PAD).all() and batch["attention_mask"][0].all()
    real = batch["labels"][1] != -100
    assert rebuild(batch["input_ids"][1, :short], batch["labels"][1, real]) == list(range(2, 22))


def test_errors():
    with pytest.raises(ValueError, match="noise_density must be in"):
        random_spans_noise_mask(10, noise_density=1.0)
    with pytest.raises(ValueError, match="length must be >= 2"):
        random_spans_noise_mask(1)
    with pytest.raises(ValueError, match="has 9 noise spans but only num_sentinels=3"):
        span_corrupt(torch.arange(2, 182), first_sentinel_id=TOP, eos_token_id=EOS, num_sentinels=3)
    with pytest.raises(ValueError, match="first_sentinel_id must be an int >= num_sentinels - 1 = 99"):
        span_corrupt(torch.arange(2, 20), first_sentinel_id=50, eos_token_id=EOS)
