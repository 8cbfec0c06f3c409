"""Tokenizers: byte and amino-acid round trips, and which tokenizer a checkpoint directory names."""

import pytest

from lnlm_ssm.data.tokenizers import AminoAcidTokenizer, ByteTokenizer, load_tokenizer, save_tokenizer_kind


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
