"""``lnlm-ssm fill-mask``: a masked LM's top predictions at each [MASK], and its errors."""

import pytest
import torch

from lnlm_ssm.cli import main
from lnlm_ssm.cli.fill_mask import fill_mask
from lnlm_ssm.data.tokenizers import ByteTokenizer, save_tokenizer_kind
from lnlm_ssm.models import MambaLM, MaskedLM, preset


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("bert")
    MaskedLM(preset("bert-tiny", n_layer=1)).save_pretrained(directory)
    save_tokenizer_kind(directory, "byte")
    return directory


def test_predictions_are_the_models_most_likely_text_tokens(bert_dir):
    model = MaskedLM.from_pretrained(bert_dir).eval()
    tokenizer = ByteTokenizer()
    predictions = fill_mask(model, tokenizer, "a[MASK]c[MASK]", top_k=3)
    assert len(predictions) == 2 and all(len(p) == 3 for p in predictions)
    ids = torch.tensor([[259, ord("a"), 258, ord("c"), 258, 260]])
    logits = model(ids).logits[0, :, :256]  # the text tokens (bytes): specials are never a filling
    for position, found in zip((2, 4), predictions):
        probs = logits[position].softmax(-1)  # of the 256 bytes (every special's logit is -inf in fill_mask)
        best = probs.topk(3)
        assert [text for text, _ in found] == [tokenizer.decode([i]) for i in best.indices.tolist()]
        torch.testing.assert_close(torch.tensor([p for _, p in found]), best.values)


def test_the_command_prints_each_masks_predictions(bert_dir, capsys):
    assert main(["fill-mask", "--model", str(bert_dir), "--text", "def [MASK](self):", "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[MASK] 1:" and len(out) == 3 and out[1].strip().endswith("'")


def test_a_text_without_mask_and_a_causal_model_are_errors(bert_dir, tmp_path, capsys):
    assert main(["fill-mask", "--model", str(bert_dir), "--text", "no marker here"]) == 2
    assert "--text must hold at least one [MASK] to fill" in capsys.readouterr().err
    MambaLM(preset("mamba-tiny", n_layer=1, vocab_size=261)).save_pretrained(tmp_path / "causal")
    assert main(["fill-mask", "--model", str(tmp_path / "causal"), "--text", "a [MASK]"]) == 2
    assert "--model must hold a masked LM" in capsys.readouterr().err
