"""Encoder pre-training objectives (mlm, sop, electra) on small stand-in models with the encoder interface:
what the model is given, what the loss is made of, where gradients go, the errors, and protein MLM on FASTA."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.data import AminoAcidTokenizer, ByteTokenizer, WindowSampler, prepare_corpus
from lnlm_ssm.data.masking import frame
from lnlm_ssm.data.tokenizers import SpecialTokens
from lnlm_ssm.objectives import (
    OBJECTIVES,
    ElectraObjective,
    MaskedLMObjective,
    SentenceOrderObjective,
    get_objective,
)
from lnlm_ssm.objectives.electra import corrupt

BYTE = SpecialTokens.of(ByteTokenizer(), ["mask", "cls", "sep", "pad"], needed_by="the tests")


class StandInMaskedLM(nn.Module):
    """A bidirectional toy masked LM (a token's embedding plus the sequence mean), optionally with a
    sentence-order head; it keeps the arguments of its last call."""

    def __init__(self, vocab_size, embedding=None, width=16, sop=False):
        super().__init__()
        self.embedding = embedding if embedding is not None else nn.Embedding(vocab_size, width)
        width = self.embedding.embedding_dim
        self.token_types = nn.Embedding(2, width)
        self.head = nn.Linear(width, vocab_size)
        self.sop = nn.Linear(width, 2) if sop else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        self.seen = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                         labels=labels)
        h = self.embedding(input_ids)
        if token_type_ids is not None:
            h = h + self.token_types(token_type_ids)
        h = torch.tanh(h + h.mean(dim=1, keepdim=True))
        logits = self.head(h)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        out = SimpleNamespace(loss=loss, logits=logits)
        if self.sop is not None:
            out.sop_logits = self.sop(h[:, 0])
        return out


class StandInDetector(nn.Module):
    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding
        self.head = nn.Linear(embedding.embedding_dim, 1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        self.seen = input_ids
        h = torch.tanh(self.embedding(input_ids))
        return SimpleNamespace(logits=self.head(h).squeeze(-1))


class StandInElectra(nn.Module):
    def __init__(self, vocab_size, width=16):
        super().__init__()
        shared = nn.Embedding(vocab_size, width)
        self.generator = StandInMaskedLM(vocab_size, embedding=shared)
        self.discriminator = StandInDetector(shared)


def _windows(rows=4, seqlen=32, seed=0):
    return torch.randint(0, 256, (rows, seqlen), generator=torch.Generator().manual_seed(seed))


def test_encoder_objectives_are_registered():
    assert {"mlm", "sop", "electra"} <= set(OBJECTIVES)
    assert get_objective("mlm").architectures == ("MaskedLM",)
    assert get_objective("electra").architectures == ("ElectraPretrainer",)


def test_mlm_loss_is_the_models_loss_on_cls_window_sep_masked():
    torch.manual_seed(0)
    model = StandInMaskedLM(261)
    batch = _windows()
    out = MaskedLMObjective(ByteTokenizer())(model, batch)
    ids, labels = model.seen["input_ids"], model.seen["labels"]
    framed = frame(batch, BYTE)
    chosen = labels != -100
    assert torch.equal(ids[~chosen], framed[~chosen]) and torch.equal(labels[chosen], framed[chosen])
    assert (ids[:, 0] == BYTE.cls).all() and (ids[:, -1] == BYTE.sep).all() and not chosen[:, [0, -1]].any()
    logits = model(ids).logits
    expected = F.cross_entropy(logits[chosen], labels[chosen])
    torch.testing.assert_close(out.loss, expected)
    accuracy = (logits[chosen].argmax(-1) == labels[chosen]).float().mean()
    torch.testing.assert_close(out.metrics["accuracy"], accuracy)
    out.loss.backward()
    assert model.head.weight.grad.abs().sum() > 0


def test_mlm_masks_afresh_in_training_and_the_same_in_evaluation():
    model, objective, batch = StandInMaskedLM(261), MaskedLMObjective(ByteTokenizer()), _windows(rows=2, seqlen=64)
    labels = []
    for _ in range(2):
        objective(model, batch)
        labels.append(model.seen["labels"])
    assert not torch.equal(*labels)
    model.eval()
    labels = []
    for _ in range(2):
        objective(model, batch)
        labels.append(model.seen["labels"])
    assert torch.equal(*labels)


def test_training_masks_follow_torchs_seed_and_differ_between_ranks(monkeypatch):
    model, objective, batch = StandInMaskedLM(261), MaskedLMObjective(ByteTokenizer()), _windows(rows=2, seqlen=64)

    def labels_on_rank(rank):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
        torch.manual_seed(0)
        objective(model, batch)
        return model.seen["labels"]

    assert torch.equal(labels_on_rank(0), labels_on_rank(0))
    assert not torch.equal(labels_on_rank(0), labels_on_rank(1))


def test_mlm_eval_metrics_are_loss_and_accuracy():
    metrics = MaskedLMObjective().eval_metrics(2.5, bytes_per_token=1.0, metrics={"accuracy": 0.25})
    assert metrics == {"eval_loss": 2.5, "eval_accuracy": 0.25}


def test_mlm_needs_a_tokenizer_with_a_mask():
    class NoMask(ByteTokenizer):
        mask_token_id = None

        def __repr__(self):
            return "NoMask()"

    with pytest.raises(ValueError, match=r"the tokenizer NoMask\(\) has no \[MASK\] token .*the mlm objective"):
        get_objective("mlm").use_tokenizer(NoMask())
    with pytest.raises(RuntimeError, match="the mlm objective has no tokenizer: pass it"):
        get_objective("mlm")(StandInMaskedLM(261), _windows())


def test_sop_loss_is_mlm_plus_sentence_order():
    torch.manual_seed(0)
    model = StandInMaskedLM(261, sop=True)
    rows, seqlen = 16, 24
    # Windows of distinct ids, so the order of the two segments can be read off the input.
    batch = torch.arange(seqlen).repeat(rows, 1) + torch.arange(rows)[:, None] * 3
    out = SentenceOrderObjective(ByteTokenizer())(model, batch)
    seen = model.seen
    assert seen["attention_mask"] is not None and (seen["token_type_ids"] == 1).any()
    labels = seen["labels"]
    chosen = labels != -100
    ids = torch.where(chosen, labels, seen["input_ids"])  # the unmasked pairs
    assert not chosen[(ids == BYTE.cls) | (ids == BYTE.sep) | (ids == BYTE.pad)].any()
    # Swapped exactly when the text after [CLS] is not the window's start.
    swapped = (ids[:, 1] != batch[:, 0]).long()
    assert 0 < swapped.sum() < rows
    logits = model(seen["input_ids"], seen["attention_mask"], seen["token_type_ids"])
    mlm = F.cross_entropy(logits.logits[chosen], labels[chosen])
    sop = F.cross_entropy(logits.sop_logits, swapped)
    torch.testing.assert_close(out.loss, mlm + sop)
    torch.testing.assert_close(out.metrics["sop_loss"], sop)
    assert set(out.metrics) == {"mlm_loss", "accuracy", "sop_loss", "sop_accuracy"}


def test_sop_refuses_a_model_without_a_sentence_order_head():
    with pytest.raises(TypeError, match="sop objective needs a model with a sentence-order head .*StandInMaskedLM"):
        SentenceOrderObjective(ByteTokenizer())(StandInMaskedLM(261), _windows())


def test_corrupt_replaces_chosen_tokens_with_samples_and_labels_real_changes():
    inputs = torch.tensor([[259, 5, 6, 7, 8, 260], [259, 7, 7, 9, 9, 260]])
    labels = torch.full_like(inputs, -100)
    labels[:, 1:4] = inputs[:, 1:4]
    logits = torch.full((2, 6, 264), -1e4)
    logits[..., 7] = 0.0  # the generator is sure of token 7 (and the padded rows 261.. are never sampled)
    logits[..., 262] = 1e4
    out = corrupt(inputs, labels, logits, vocab_size=261)
    chosen = labels != -100
    assert torch.equal(out.input_ids, torch.where(chosen, 7, inputs))
    # A sample equal to the original (the 7s) is not a replacement.
    assert out.replaced.tolist() == [
        [False, True, True, False, False, False],
        [False, False, False, True, False, False],
    ]

    probs = torch.randn(4, 32, 261)
    big = _windows(4, 32)
    big_labels = torch.where(torch.rand(4, 32) < 0.3, big, -100)
    sampled = corrupt(big, big_labels, probs, 261, generator=torch.Generator().manual_seed(0))
    chosen = big_labels != -100
    assert torch.equal(sampled.input_ids[~chosen], big[~chosen])
    assert torch.equal(sampled.replaced, chosen & (sampled.input_ids != big))


def test_electra_loss_is_generator_plus_50_discriminator_and_trains_both():
    torch.manual_seed(0)
    model = StandInElectra(261)
    batch = _windows(rows=8, seqlen=32)
    out = ElectraObjective(ByteTokenizer())(model, batch)
    m = out.metrics
    torch.testing.assert_close(out.loss, m["gen_loss"] + 50 * m["disc_loss"])
    # ELECTRA's masking: chosen tokens are [MASK] or kept, never a random token.
    gen_ids, labels = model.generator.seen["input_ids"], model.generator.seen["labels"]
    chosen = labels != -100
    framed = frame(batch, BYTE)
    assert ((gen_ids[chosen] == BYTE.mask) | (gen_ids[chosen] == framed[chosen])).all()
    # The discriminator sees the samples at the chosen places and the text elsewhere; its labels are the changes.
    disc_ids = model.discriminator.seen
    assert torch.equal(disc_ids[~chosen], framed[~chosen])
    replaced = disc_ids != framed
    disc_logits = model.discriminator(disc_ids).logits
    torch.testing.assert_close(m["disc_loss"], F.binary_cross_entropy_with_logits(disc_logits, replaced.float()))
    torch.testing.assert_close(m["replaced_fraction"], replaced.float().mean())
    assert 0 < m["replaced_fraction"] < 0.2 and 0 <= m["disc_accuracy"] <= 1
    out.loss.backward()
    assert model.generator.head.weight.grad.abs().sum() > 0
    assert model.discriminator.head.weight.grad.abs().sum() > 0
    assert model.generator.embedding.weight.grad.abs().sum() > 0  # shared, reached by both


def test_electra_weight_is_checked():
    assert ElectraObjective().disc_weight == 50.0
    with pytest.raises(ValueError, match="disc_weight must be a positive number, got 0"):
        ElectraObjective(disc_weight=0)


def test_protein_mlm_on_fasta(tmp_path):
    rng = torch.Generator().manual_seed(0)
    letters = AminoAcidTokenizer.LETTERS[:20]
    records = [
        f">protein_{i} some description\n" + "".join(letters[j] for j in torch.randint(0, 20, (60,), generator=rng))
        for i in range(12)
    ]
    (tmp_path / "seqs.fasta").write_text("\n".join(records) + "\n")
    corpus = prepare_corpus(tmp_path / "seqs.fasta", tmp_path / "out", tokenizer="amino", val_fraction=0.2)
    assert corpus.manifest["kind"] == "fasta" and corpus.vocab_size == AminoAcidTokenizer.vocab_size == 31
    batch = WindowSampler(corpus, "train", seq_len=32, batch_size=64, seed=0).next_batch()
    objective = MaskedLMObjective(corpus.load_tokenizer())
    model = StandInMaskedLM(corpus.vocab_size)
    out = objective(model, batch)
    assert math.isfinite(out.loss.item())
    ids, labels = model.seen["input_ids"], model.seen["labels"]
    chosen = labels != -100
    amino = AminoAcidTokenizer()
    assert (ids[:, 0] == amino.cls_token_id).all() and (ids[:, -1] == amino.sep_token_id).all()
    assert not chosen[ids == amino.eos_token_id].any() and (labels[chosen] >= 3).all() and (labels[chosen] < 28).all()
    assert (batch == amino.eos_token_id).any()  # windows cross the records' ends
    changed = ids[chosen & (ids != labels) & (ids != amino.mask_token_id)]
    assert ((changed >= 3) & (changed < 28)).all()


@pytest.mark.parametrize("name", ["mlm", "sop"])
def test_the_loop_refuses_an_encoder_objective_on_a_causal_model(tmp_path, name):
    from lnlm_ssm.training import TrainConfig, TrainConfigError, train

    config = TrainConfig(preset="mamba-tiny", objective=name, data=str(tmp_path), out=str(tmp_path / "run"))
    refusal = f"'{name}' trains MaskedLM models; the preset 'mamba-tiny' is a MambaLM"
    with pytest.raises(TrainConfigError, match=refusal):
        train(config)
