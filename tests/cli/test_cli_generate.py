"""The byte tokenizer, load_tokenizer, and the ``lnlm-ssm generate`` command line."""

import importlib.util
import pathlib

import pytest
import torch

from lnlm_ssm.cli import main
from lnlm_ssm.layers import quantize_
from lnlm_ssm.models import MambaLM, MambaLMConfig
from lnlm_ssm.data.tokenizers import ByteTokenizer, load_tokenizer, save_tokenizer_kind

HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, 世界"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.encode("a", add_eos=True) == [97, 256] and tok.decode([97, 256, 98]) == "ab"
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # half of a 3-byte character
    assert tok.vocab_size == 261
    with pytest.raises(ValueError, match="ids"):
        tok.decode([300])
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")


def test_load_tokenizer(tmp_path, monkeypatch):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(tmp_path)


@pytest.mark.skipif(not HAS_TOKENIZERS, reason="the tokenizers package is not installed")
def test_load_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|endoftext|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hello world") == [2, 3]
    assert tok.eos_token_id == 0 and tok.vocab_size == 4
    assert tok.decode([2, 0, 3]) == "hello world"


def test_generate_on_a_preset(capsys):
    assert main(["generate", "--model", "mamba-130m", "--prompt", "Hi", "--max-new-tokens", "5", "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert "preset" in err and "byte tokenizer" in err
    # Each byte token adds at most one character (or U+FFFD); eos may end the text early.
    assert out.endswith("\n") and len(out) <= 5 + 1


def test_generate_on_a_checkpoint_streams_the_greedy_text(tmp_path, capsys):
    torch.manual_seed(0)
    model = MambaLM(MambaLMConfig(d_model=32, n_layer=2, vocab_size=257, ssm_cfg={"d_state": 8}))
    model.save_pretrained(tmp_path)
    tok = ByteTokenizer()
    prompt = "abc"
    expected = model.generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=6, temperature=0)
    argv = ["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == tok.decode(expected[0, 3:].tolist()) + "\n"


def test_generate_reads_a_protein_model_from_before_the_encoder_specials(tmp_path, capsys):
    # 28 ids: the amino-acid tokenizer's vocabulary before [MASK], [CLS] and [SEP] were added above it.
    config = MambaLMConfig(d_model=32, n_layer=1, vocab_size=28, pad_vocab_size_multiple=1, ssm_cfg={"d_state": 8})
    MambaLM(config).save_pretrained(tmp_path)
    save_tokenizer_kind(tmp_path, "amino")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "MK", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.strip()  # the generated residues (eos may end them early)
    assert len(out) <= 3 and set(out) <= set("ACDEFGHIKLMNPQRSTVWYXBZUO?")


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_generate_quantized_streams_the_quantised_models_greedy_text(tmp_path, capsys, mode):
    torch.manual_seed(0)
    model = MambaLM(MambaLMConfig(d_model=32, n_layer=2, vocab_size=257, ssm_cfg={"d_state": 8}))
    model.save_pretrained(tmp_path)
    tok = ByteTokenizer()
    expected = quantize_(model, mode).generate(torch.tensor([tok.encode("abc")]), max_new_tokens=6, temperature=0)
    argv = ["generate", "--model", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "6", "--temperature", "0",
            "--quantize", mode]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == tok.decode(expected[0, 3:].tolist()) + "\n"
    # A checkpoint saved quantised generates the same without the flag; with it, it is quantised twice.
    model.save_pretrained(tmp_path / "quantized")
    argv[2] = str(tmp_path / "quantized")
    assert main(argv[:-2]) == 0
    assert capsys.readouterr().out == out
    assert main(argv) == 2
    assert f"quantised already ({mode})" in capsys.readouterr().err


def test_generate_quantized_errors(capsys):
    argv = ["generate", "--model", "mamba-tiny", "--prompt", "x", "--max-new-tokens", "1", "--quantize", "int8"]
    assert main(argv) == 0
    assert main(argv + ["--dtype", "bfloat16"]) == 2
    assert "--quantize int8 quantises a float32 model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv[:-1] + ["int4"])


def test_generate_errors(tmp_path, capsys):
    assert main(["generate", "--model", "mamba-130m", "--prompt", "", "--max-new-tokens", "1"]) == 2
    assert "--prompt" in capsys.readouterr().err
    config = MambaLMConfig(d_model=32, n_layer=1, vocab_size=1000, ssm_cfg={"d_state": 8})
    MambaLM(config).save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x"])
    with pytest.raises(SystemExit):
        main([])


def test_pyproject_declares_the_script():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pyproject = tomllib.loads((pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["lnlm-ssm"] == "lnlm_ssm.cli:main"
