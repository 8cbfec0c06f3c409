"""The span-corruption and text-to-text objectives on a tiny Seq2SeqLM."""

import pytest
import torch

from lnlm_ssm.data.span_corruption import SpanCorruptionCollator
from lnlm_ssm.data.text_pairs import pair_batch
from lnlm_ssm.data.tokenizers import ByteTokenizer
from lnlm_ssm.models import Seq2SeqLM
from lnlm_ssm.objectives import Seq2SeqObjective, SpanCorruptionObjective, get_objective
from lnlm_ssm.objectives.mlm import MaskedLMObjective
from lnlm_ssm.utils.testing import assert_close

TINY = dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, n_encoder_layer=1, n_decoder_layer=1)


def tiny(**fields):
    torch.manual_seed(0)
    return Seq2SeqLM.from_name("t5-tiny", **{**TINY, **fields})


def test_span_objective_is_the_models_loss_on_t5_span_corruption():
    model, objective = tiny(), get_objective("span")
    assert isinstance(objective, SpanCorruptionObjective) and objective.extra_ids == 100
    objective.use_tokenizer(ByteTokenizer())
    batch = torch.randint(0, 256, (3, 32))
    torch.manual_seed(5)
    out = objective(model, batch)
    torch.manual_seed(5)
    collator = SpanCorruptionCollator(first_sentinel_id=360, eos_token_id=256, pad_token_id=257)
    collator.generator = MaskedLMObjective.mask_generator(model, torch.device("cpu"))
    corrupted = collator(batch)
    assert_close(out.loss, model(**corrupted).loss)
    # Sentinels count down from the top id, above the byte tokenizer's 261.
    sentinels = corrupted["input_ids"][corrupted["input_ids"] >= 261]
    assert sentinels.max() == 360 and sentinels.min() > 360 - 100
    assert 0 <= out.metrics["accuracy"] <= 1
    out.loss.backward()
    # Evaluation corrupts the same way every time.
    model.eval()
    with torch.no_grad():
        assert torch.equal(objective(model, batch).loss, objective(model, batch).loss)


def test_span_objective_errors():
    objective = SpanCorruptionObjective()
    with pytest.raises(RuntimeError, match="no tokenizer"):
        objective(tiny(), torch.zeros(1, 8, dtype=torch.long))
    objective.use_tokenizer(ByteTokenizer())
    with pytest.raises(ValueError, match=r"model vocab_size must be >= 361; got 300"):
        objective(tiny(vocab_size=300), torch.zeros(1, 8, dtype=torch.long))


def test_seq2seq_objective_is_the_models_loss_on_the_pairs():
    model, objective = tiny(), get_objective("seq2seq")
    assert isinstance(objective, Seq2SeqObjective)
    tok = ByteTokenizer()
    objective.use_tokenizer(tok)
    pairs = [([97, 98, 256], [120, 256]), ([99, 256], [121, 122, 256])]
    batch = pair_batch(pairs, 6, tok.pad_token_id)
    out = objective(model, batch)
    source = torch.tensor([[97, 98, 256], [99, 256, 257]])
    labels = torch.tensor([[120, 256, -100], [121, 122, 256]])
    expected = model(source, attention_mask=source != 257, labels=labels).loss
    assert_close(out.loss, expected)
    with pytest.raises(ValueError, match=r"batches \(batch, 2, seq_len\)"):
        objective(model, batch[:, 0])
    with pytest.raises(ValueError, match=r"--data, a .jsonl file"):
        objective.samplers("corpus_dir", seq_len=8, batch_size=2, seed=0, rank=0, world_size=1)
