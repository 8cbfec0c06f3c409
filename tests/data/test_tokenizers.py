"""Tokenizers: byte and amino-acid round trips, which tokenizer a checkpoint directory names, and the encoder
specials ([PAD], [MASK], [CLS], [SEP]) of every kind of tokenizer."""

import importlib.util

import pytest

from lnlm_ssm.data.tokenizers import (
    AminoAcidTokenizer,
    ByteTokenizer,
    SpecialTokens,
    load_tokenizer,
    save_tokenizer_kind,
)

HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None


def test_round_trips():
    assert ByteTokenizer().decode(ByteTokenizer().encode("naïve ✓")) == "naïve ✓"
    amino = AminoAcidTokenizer()
    assert amino.decode(amino.encode("MKVl*")) == "MKVL?"


@pytest.mark.parametrize("kind,cls", [("byte", ByteTokenizer), ("amino", AminoAcidTokenizer)])
def test_directory_names_its_builtin_tokenizer(tmp_path, kind, cls):
    save_tokenizer_kind(tmp_path, kind)
    assert type(load_tokenizer(tmp_path)) is cls


def test_directory_without_a_tokenizer_file_is_byte_level(tmp_path):
    assert type(load_tokenizer(tmp_path)) is ByteTokenizer


def test_bad_kind_file_and_bad_kind_are_errors(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        save_tokenizer_kind(tmp_path, "bpe")
    (tmp_path / "lnlm_tokenizer.json").write_text('{"kind": "bpe"}')
    with pytest.raises(ValueError, match="lnlm_tokenizer.json must hold"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------- encoder specials


def test_builtin_specials_sit_above_the_old_ids():
    byte = ByteTokenizer()
    assert (byte.eos_token_id, byte.pad_token_id, byte.mask_token_id, byte.cls_token_id, byte.sep_token_id) == (
        256, 257, 258, 259, 260
    )
    assert byte.vocab_size == 261 and byte.text_vocab_size == 257
    assert byte.encode("é") == [0xC3, 0xA9] and byte.decode([259, 0xC3, 0xA9, 258, 260, 257, 256]) == "é"
    amino = AminoAcidTokenizer()
    assert (amino.pad_token_id, amino.mask_token_id, amino.cls_token_id, amino.sep_token_id) == (0, 28, 29, 30)
    assert amino.vocab_size == 31 and amino.encode("ACY") == [3, 4, 22]
    assert amino.special_token_ids == {0, 1, 2, 28, 29, 30}


def test_encode_with_special_reads_the_markers():
    byte = ByteTokenizer()
    ids = byte.encode_with_special("def [MASK](self):")
    assert ids == byte.encode("def ") + [258] + byte.encode("(self):")
    assert byte.encode_with_special("[CLS]a[SEP][PAD]") == [259, 97, 260, 257]
    assert byte.encode("[MASK]") == list(b"[MASK]")  # plain encode keeps the text
    assert byte.encode_with_special("[mask] [UNK]") == byte.encode("[mask] [UNK]")
    assert AminoAcidTokenizer().encode_with_special("[CLS]MK[MASK]V") == [29, 13, 11, 28, 20]
    with pytest.raises(TypeError, match="text must be a str"):
        byte.encode_with_special(b"[MASK]")


def test_special_tokens_of_a_tokenizer_that_lacks_one_names_it():
    class NoMask(ByteTokenizer):
        mask_token_id = None

        def __repr__(self):
            return "NoMask()"

    tokens = SpecialTokens.of(ByteTokenizer(), ["mask", "cls"], needed_by="the test")
    assert (tokens.mask, tokens.cls, tokens.vocab_size, tokens.special) == (258, 259, 261, (256, 257, 258, 259, 260))
    assert SpecialTokens.of(NoMask(), ["cls"], needed_by="x").mask is None  # only what is asked for must exist
    with pytest.raises(ValueError, match=r"the tokenizer NoMask\(\) has no \[MASK\] token .*the mlm objective needs"):
        SpecialTokens.of(NoMask(), ["mask"], needed_by="the mlm objective")
    with pytest.raises(ValueError, match=r"no \[MASK\] token .*the marker \[MASK\] in the text"):
        NoMask().encode_with_special("a [MASK]")
    with pytest.raises(ValueError, match="roles must be one of"):
        SpecialTokens.of(ByteTokenizer(), ["bos"], needed_by="x")


def _hf_file(tmp_path, vocab, specials, post_processor=None, name="tokenizer.json", pad=None):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens([AddedToken(t, lstrip=t == "<mask>", special=True) for t in specials])
    if post_processor is not None:
        hf.post_processor = post_processor
    if pad is not None:
        hf.enable_padding(pad_id=vocab[pad], pad_token=pad)
    hf.save(str(tmp_path / name))
    return load_tokenizer(tmp_path / name)


WORDS = {"[UNK]": 1, "def": 5, "self": 6, "(": 7, ")": 8, ":": 9, "):": 10}


@pytest.mark.skipif(not HAS_TOKENIZERS, reason="the tokenizers package is not installed")
def test_hf_tokenizer_honours_its_own_specials(tmp_path):
    from tokenizers import processors

    bert_specials = {"[PAD]": 0, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    bert = _hf_file(
        tmp_path, {**WORDS, **bert_specials}, list(bert_specials),
        processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2)), name="bert.json",
    )
    assert (bert.pad_token_id, bert.cls_token_id, bert.sep_token_id, bert.mask_token_id) == (0, 2, 3, 4)
    assert bert.encode_with_special("def [MASK](self):") == [5, 4, 7, 6, 10]
    assert {0, 2, 3, 4} <= bert.special_token_ids and 5 not in bert.special_token_ids

    # RoBERTa's names, declared by its post-processor; <mask> is an added token that the whole text is encoded with.
    roberta_specials = {"<s>": 0, "<pad>": 11, "</s>": 2, "<mask>": 12}
    roberta = _hf_file(
        tmp_path, {**WORDS, **roberta_specials}, list(roberta_specials),
        processors.RobertaProcessing(("</s>", 2), ("<s>", 0)), name="roberta.json",
    )
    assert (roberta.pad_token_id, roberta.cls_token_id, roberta.sep_token_id, roberta.mask_token_id) == (11, 0, 2, 12)
    assert roberta.encode_with_special("def [MASK](self):") == roberta.encode("def <mask>(self):") == [5, 12, 7, 6, 10]

    # ESM's template "<cls> $A <eos>": the template names [CLS] and [SEP].
    esm_specials = {"<cls>": 0, "<pad>": 11, "<eos>": 2, "<mask>": 12}
    esm = _hf_file(
        tmp_path, {**WORDS, **esm_specials}, list(esm_specials),
        processors.TemplateProcessing(single="<cls> $A <eos>", special_tokens=[("<cls>", 0), ("<eos>", 2)]),
        name="esm.json",
    )
    assert (esm.pad_token_id, esm.cls_token_id, esm.sep_token_id, esm.mask_token_id) == (11, 0, 2, 12)


@pytest.mark.skipif(not HAS_TOKENIZERS, reason="the tokenizers package is not installed")
def test_hf_tokenizer_without_a_mask_is_refused_by_name_when_one_is_needed(tmp_path):
    plain = _hf_file(tmp_path, {**WORDS, "</s>": 0, "<blank>": 3}, ["</s>", "<blank>"], pad="<blank>")
    assert plain.mask_token_id is None and plain.cls_token_id is None and plain.encode("def self") == [5, 6]
    assert plain.pad_token_id == 3  # named by the file's padding settings
    with pytest.raises(ValueError, match=r"HFTokenizer\('.*tokenizer.json'\) has no \[MASK\] token"):
        SpecialTokens.of(plain, ["mask", "cls", "sep"], needed_by="the mlm objective")
