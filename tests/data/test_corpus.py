"""The data pipeline: tokenization, FASTA parsing, manifest reuse and atomicity, the window sampler.

Expected tokens are always built independently: the tokenizer's own ``encode`` over the
documents in sorted order, each followed by eos.
"""

import gzip
import importlib.util
import json
import os
import time

import numpy as np
import pytest
import torch

from lnlm_ssm.data import AminoAcidTokenizer, ByteTokenizer, Corpus, WindowSampler, default_corpus_dir, prepare_corpus
from lnlm_ssm.data import corpus as data_mod

HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None
EOS = ByteTokenizer.eos_token_id


def _write(root, files: dict):
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)


def _expected(tokenizer, docs):
    out = []
    for d in docs:
        out += tokenizer.encode(d) + [tokenizer.eos_token_id]
    return np.array(out)


def _text_tree(tmp_path, n_docs=6):
    src = tmp_path / "src"
    # Names chosen so sorted path order differs from creation order and from name length.
    files = {
        f"{'b' if i % 2 else 'a'}/doc{i}.py": f"# document {i}\n" + "x = 'é'\n" * (5 + 3 * i) for i in range(n_docs)
    }
    _write(src, files)
    return src, [files[k] for k in sorted(files)]


# --------------------------------------------------------------------------------- tokenizers


def test_amino_tokenizer_round_trip_and_vocabulary():
    tok = AminoAcidTokenizer()
    assert tok.vocab_size == 31 and (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    letters = "ACDEFGHIKLMNPQRSTVWYXBZUO"
    ids = tok.encode(letters)
    assert ids == list(range(3, 28))
    assert tok.decode(ids) == letters
    assert tok.encode(letters.lower()) == ids
    assert tok.encode("AJ*-é", add_eos=True) == [3, 2, 2, 2, 2, 1]
    assert tok.decode([0, 3, 2, 1]) == "A?"
    with pytest.raises(ValueError, match=r"ids must be in \[0, 31\)"):
        tok.decode([31])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"ACD")


def test_byte_corpus_tokens_are_the_documents_joined_with_eos(tmp_path):
    src, docs = _text_tree(tmp_path)
    _write(src, {"notes.bin": b"\x00\x01", "skip.txt": b"binary\x00data", "latin.md": "caf\xe9".encode("latin-1")})
    corpus = prepare_corpus(src, tmp_path / "out", val_fraction=0.2)
    tokens = np.concatenate([corpus.tokens("train"), corpus.tokens("val")])
    np.testing.assert_array_equal(tokens, _expected(ByteTokenizer(), docs))
    assert corpus.vocab_size == 261 and corpus.tokens("train").dtype == np.uint16
    assert corpus.manifest["n_files"] == len(docs) and corpus.manifest["n_skipped_files"] == 2
    assert not corpus.tokens("train").flags.writeable
    # Round trip: the first document decodes back to its text.
    first = corpus.tokens("train")[: len(docs[0].encode())]
    assert ByteTokenizer().decode(first) == docs[0]
    assert isinstance(corpus.load_tokenizer(), ByteTokenizer)


def test_val_split_is_the_shortest_tail_of_whole_documents(tmp_path):
    src, docs = _text_tree(tmp_path, n_docs=8)
    corpus = prepare_corpus(src, tmp_path / "out", val_fraction=0.3)
    sizes = [len(d.encode()) + 1 for d in docs]
    n_val = next(k for k in range(1, len(docs)) if sum(sizes[-k:]) >= 0.3 * sum(sizes))
    assert corpus.n_tokens("val") == sum(sizes[-n_val:])
    assert corpus.n_tokens("train") == sum(sizes[:-n_val])
    splits = corpus.manifest["splits"]
    assert splits["val"]["n_documents"] == n_val and splits["train"]["n_documents"] == len(docs) - n_val
    assert splits["val"]["n_bytes"] == sum(len(d.encode()) for d in docs[-n_val:])
    assert corpus.bytes_per_token("train") == splits["train"]["n_bytes"] / corpus.n_tokens("train")
    assert corpus.tokens("train")[-1] == EOS and corpus.tokens("val")[-1] == EOS


def test_a_single_file_is_cut_at_a_line_boundary(tmp_path):
    text = "".join(f"line {i}\n" for i in range(100))
    _write(tmp_path, {"one.txt": text})
    corpus = prepare_corpus(tmp_path / "one.txt", tmp_path / "out", val_fraction=0.1)
    train, val = corpus.tokens("train"), corpus.tokens("val")
    assert train[-1] == EOS and val[-1] == EOS
    head, tail = ByteTokenizer().decode(train), ByteTokenizer().decode(val)
    assert head + tail == text and head.endswith("\n") and tail.startswith("line ")
    assert 0.05 < len(tail) / len(text) < 0.15
    no_val = prepare_corpus(tmp_path / "one.txt", tmp_path / "out0", val_fraction=0)
    assert no_val.n_tokens("val") == 0 and no_val.n_tokens("train") == len(text) + 1


def test_max_bytes_caps_the_text_without_splitting_a_character(tmp_path):
    _write(tmp_path / "src", {"a.txt": "é" * 50, "b.txt": "é" * 50})
    corpus = prepare_corpus(tmp_path / "src", tmp_path / "out", max_bytes=131, val_fraction=0)
    # a.txt is 100 bytes; 31 bytes of b.txt hold 15 whole characters.
    np.testing.assert_array_equal(corpus.tokens("train"), _expected(ByteTokenizer(), ["é" * 50, "é" * 15]))
    assert corpus.manifest["splits"]["train"]["n_bytes"] == 130


@pytest.mark.skipif(not HAS_TOKENIZERS, reason="the tokenizers package is not installed")
def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lnlm_ssm.data.tokenizers import load_tokenizer

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    docs = ["hello world", "world again hello", "again again", "hello odd"]
    _write(tmp_path / "src", {f"{i}.txt": d for i, d in enumerate(docs)})
    corpus = prepare_corpus(tmp_path / "src", tmp_path / "out", tokenizer=tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    tokens = np.concatenate([corpus.tokens("train"), corpus.tokens("val")])
    np.testing.assert_array_equal(tokens, _expected(tok, docs))
    assert corpus.manifest["tokenizer"]["kind"] == "hf" and corpus.vocab_size == 5 and corpus.eos_token_id == 1
    assert corpus.load_tokenizer().encode("hello again") == [2, 4]


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path):
    class Wide:
        vocab_size = 70_000
        eos_token_id = 69_999

        def encode(self, text):
            return [65_536 + ord(c) for c in text]

    _write(tmp_path / "src", {"a.txt": "abc", "b.txt": "de"})
    corpus = prepare_corpus(tmp_path / "src", tmp_path / "out", tokenizer=Wide(), val_fraction=0.3)
    assert corpus.tokens("train").dtype == np.uint32 and corpus.manifest["tokenizer"]["kind"] == "custom"
    np.testing.assert_array_equal(np.concatenate([corpus.tokens("train"), corpus.tokens("val")]),
                                  _expected(Wide(), ["abc", "de"]))
    with pytest.raises(ValueError, match="cannot be reloaded"):
        corpus.load_tokenizer()

    class Wrong(Wide):
        vocab_size = 100

    with pytest.raises(ValueError, match=r"eos_token_id 69999 is outside \[0, vocab_size=100\)"):
        prepare_corpus(tmp_path / "src", tmp_path / "out2", tokenizer=Wrong())
    Wrong.eos_token_id = 99
    with pytest.raises(ValueError, match=r"tokenizer gave id 65635 outside \[0, vocab_size=100\)"):
        prepare_corpus(tmp_path / "src", tmp_path / "out2", tokenizer=Wrong())


# --------------------------------------------------------------------------------- FASTA


FASTA = """>sp|P1|first protein
MKTA
yiaK

QRQ
; an old-style comment line
>empty record
>third  with spaces
ACD EFG
  HIK
"""


def test_fasta_records_headers_blank_lines_and_gzip(tmp_path):
    src = tmp_path / "src"
    _write(src, {"a.fasta": FASTA, "README.md": "not read in FASTA mode"})
    with gzip.open(src / "b.fa.gz", "wt") as f:
        f.write(">x\nMMM\n>y\nWWW\n")
    corpus = prepare_corpus(src, tmp_path / "out", tokenizer="amino", val_fraction=0.1)
    assert corpus.manifest["kind"] == "fasta" and corpus.manifest["n_files"] == 2
    tok = AminoAcidTokenizer()
    seqs = ["MKTAYIAKQRQ", "ACDEFGHIK", "MMM", "WWW"]
    np.testing.assert_array_equal(
        np.concatenate([corpus.tokens("train"), corpus.tokens("val")]), _expected(tok, seqs)
    )
    assert corpus.manifest["splits"]["val"]["n_documents"] == 1
    assert corpus.bytes_per_token("val") == 3 / 4
    assert isinstance(corpus.load_tokenizer(), AminoAcidTokenizer)
    # Bytes of the same records, and "auto" on a directory of FASTA files only picks FASTA.
    fasta_only = tmp_path / "fasta_only"
    _write(fasta_only, {"p.faa": FASTA})
    by_bytes = prepare_corpus(fasta_only, tmp_path / "out_bytes", val_fraction=0.1)
    assert by_bytes.manifest["kind"] == "fasta"
    np.testing.assert_array_equal(
        np.concatenate([by_bytes.tokens("train"), by_bytes.tokens("val")]),
        _expected(ByteTokenizer(), ["MKTAyiaKQRQ", "ACDEFGHIK"]),  # the parser keeps the case
    )


def test_fasta_errors(tmp_path):
    _write(tmp_path, {"bad.fa": "MKT\n>h\nAAA\n", "one.fa": ">only\nMKTAYIAKQRQ\n", "t.txt": "text"})
    with pytest.raises(ValueError, match=r"bad.fa:1: sequence data before the first '>' header"):
        prepare_corpus(tmp_path / "bad.fa", tmp_path / "out")
    with pytest.raises(ValueError, match="tokenizer='amino' reads protein FASTA files"):
        prepare_corpus(tmp_path / "t.txt", tmp_path / "out", tokenizer="amino", kind="text")
    # One record still gives both splits; a record of one residue cannot.
    one = prepare_corpus(tmp_path / "one.fa", tmp_path / "out_one", tokenizer="amino", val_fraction=0.25)
    assert one.n_tokens("train") > 0 and one.n_tokens("val") > 0
    _write(tmp_path, {"tiny.fa": ">t\nM\n"})
    with pytest.raises(ValueError, match="a validation split needs at least two documents"):
        prepare_corpus(tmp_path / "tiny.fa", tmp_path / "out_tiny", val_fraction=0.5)
    assert os.listdir(tmp_path / "out_tiny") == [], "a failed prepare leaves nothing behind"


# --------------------------------------------------------------------------------- manifest


def test_manifest_records_the_corpus(tmp_path):
    src, docs = _text_tree(tmp_path)
    corpus = prepare_corpus(src, tmp_path / "out")
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m == corpus.manifest
    assert m["format_version"] == 1 and m["source"] == str(src.resolve()) and m["kind"] == "text"
    assert m["tokenizer"] == {"kind": "byte", "name": "ByteTokenizer", "vocab_size": 261, "eos_token_id": 256}
    assert m["dtype"] == "uint16" and m["n_tokens"] == sum(len(d.encode()) + 1 for d in docs)
    assert (tmp_path / "out" / "tokens.bin").stat().st_size == 2 * m["n_tokens"]
    assert len(m["source_fingerprint"]) == len(m["options_fingerprint"]) == 64
    assert Corpus.open(tmp_path / "out").manifest == m


def test_reuse_and_rebuild_on_change(tmp_path):
    src, _ = _text_tree(tmp_path)
    out = tmp_path / "out"
    prepare_corpus(src, out)

    def stamp():
        return (out / "tokens.bin").stat().st_ino, (out / "manifest.json").stat().st_ino

    before = stamp()
    prepare_corpus(src, out)
    assert stamp() == before, "same source and options must reuse the files"

    prepare_corpus(src, out, val_fraction=0.5)
    assert stamp() != before, "another option must rebuild"
    before = stamp()

    changed = src / "a" / "doc0.py"
    changed.write_text("changed = True\n")
    os.utime(changed, ns=(0, 12345))  # a different mtime even on coarse clocks
    corpus = prepare_corpus(src, out, val_fraction=0.5)
    assert stamp() != before
    assert ByteTokenizer().decode(corpus.tokens("train")[:15]) == "changed = True\n"

    before = stamp()
    _write(src, {"c/new.md": "a new file"})
    assert prepare_corpus(src, out, val_fraction=0.5).manifest["n_files"] == 7 and stamp() != before


def test_an_output_directory_inside_the_source_is_not_read(tmp_path):
    src, docs = _text_tree(tmp_path)
    out = src / "prepared"
    prepare_corpus(src, out)
    inode = (out / "tokens.bin").stat().st_ino
    second = prepare_corpus(src, out)
    assert (out / "tokens.bin").stat().st_ino == inode and second.manifest["n_files"] == len(docs)


class _FailingTokenizer(ByteTokenizer):
    def __init__(self, fail_at):
        self.calls, self.fail_at = 0, fail_at

    def encode(self, text, *, add_eos=False):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated failure mid-write")
        return super().encode(text, add_eos=add_eos)


def test_an_interrupted_prepare_leaves_no_manifest(tmp_path, monkeypatch):
    src, _ = _text_tree(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(data_mod, "_WRITE_BLOCK", 8)  # tokens reach the disk before the failure
    with pytest.raises(RuntimeError, match="simulated failure"):
        prepare_corpus(src, out, tokenizer=_FailingTokenizer(fail_at=4))
    assert sorted(os.listdir(out)) == []
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        Corpus.open(out)

    # A rebuild that fails removes the old manifest first: no stale corpus is left to open.
    prepare_corpus(src, out)
    with pytest.raises(RuntimeError, match="simulated failure"):
        prepare_corpus(src, out, tokenizer=_FailingTokenizer(fail_at=2))
    assert not (out / "manifest.json").exists()
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]

    # A failure after the token file is in place but before the manifest lands.
    real_replace = os.replace

    def failing_replace(a, b):
        if str(b).endswith("manifest.json"):
            raise OSError("disk full")
        real_replace(a, b)

    monkeypatch.setattr(data_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        prepare_corpus(src, out, val_fraction=0.3)
    assert sorted(os.listdir(out)) == ["tokens.bin"]


def test_corrupt_manifest_and_truncated_tokens(tmp_path):
    src, _ = _text_tree(tmp_path)
    out = tmp_path / "out"
    prepare_corpus(src, out)
    manifest = json.loads((out / "manifest.json").read_text())

    (out / "manifest.json").write_text('{"format_version": 1, "n_tok')
    with pytest.raises(ValueError, match="manifest.json is corrupt"):
        Corpus.open(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99, expected 1"):
        Corpus.open(out)
    (out / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "splits"}))
    with pytest.raises(ValueError, match="missing field 'splits'"):
        Corpus.open(out)
    bad_splits = {**manifest["splits"], "val": {**manifest["splits"]["val"], "stop": 3}}
    (out / "manifest.json").write_text(json.dumps({**manifest, "splits": bad_splits}))
    with pytest.raises(ValueError, match="do not cover"):
        Corpus.open(out)

    (out / "manifest.json").write_text(json.dumps(manifest))
    with open(out / "tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"tokens.bin has 100 bytes but .* says"):
        Corpus.open(out)
    # prepare_corpus repairs a damaged directory instead of failing.
    assert prepare_corpus(src, out).n_tokens("train") + prepare_corpus(src, out).n_tokens("val") == manifest["n_tokens"]
    (out / "tokens.bin").unlink()
    with pytest.raises(FileNotFoundError, match="tokens.bin is missing"):
        Corpus.open(out)


def test_prepare_errors(tmp_path):
    src, _ = _text_tree(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_corpus(tmp_path / "nope", out)
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \[0, 1\)"):
        prepare_corpus(src, out, val_fraction=1.0)
    with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
        prepare_corpus(src, out, max_bytes=0)
    with pytest.raises(ValueError, match="kind must be 'auto', 'text' or 'fasta'"):
        prepare_corpus(src, out, kind="csv")
    with pytest.raises(TypeError, match="extensions must be a collection of strings"):
        prepare_corpus(src, out, extensions=".py")
    with pytest.raises(ValueError, match=r"no files ending in \['.rs'\]"):
        prepare_corpus(src, out, extensions=["rs"])
    with pytest.raises(ValueError, match="tokenizer must be 'byte', 'amino', a tokenizer.json"):
        prepare_corpus(src, out, tokenizer="gpt2")
    with pytest.raises(TypeError, match="int lacks encode, vocab_size, eos_token_id"):
        prepare_corpus(src, out, tokenizer=3)
    _write(tmp_path / "bin", {"x.txt": b"\x00\x00"})
    with pytest.raises(ValueError, match="1 skipped as unreadable or binary"):
        prepare_corpus(tmp_path / "bin", tmp_path / "out_bin")
    assert os.listdir(tmp_path / "out_bin") == []
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        prepare_corpus(src, out).tokens("test")


def test_default_stdlib_corpus_prepares_in_seconds(tmp_path):
    start = time.perf_counter()
    corpus = prepare_corpus(default_corpus_dir(), tmp_path / "out", max_bytes=200_000)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"prepare took {elapsed:.1f} s"
    m = corpus.manifest
    n_bytes = m["splits"]["train"]["n_bytes"] + m["splits"]["val"]["n_bytes"]
    assert 200_000 - 3 <= n_bytes <= 200_000 and m["n_tokens"] == n_bytes + sum(
        s["n_documents"] for s in m["splits"].values()
    )
    assert corpus.n_tokens("val") > 0 and corpus.n_tokens("train") > 0
    first = sorted(
        p for p in default_corpus_dir().iterdir() if p.is_file() and p.suffix in (".py", ".txt") and p.name[0] != "."
    )[0]
    head = first.read_bytes()[:1000]
    np.testing.assert_array_equal(corpus.tokens("train")[: len(head)], np.frombuffer(head, np.uint8))


# --------------------------------------------------------------------------------- sampler


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    docs = {f"d{i:02d}.txt": "".join(map(chr, rng.integers(97, 123, size=200))) for i in range(10)}
    _write(tmp_path / "src", docs)
    return prepare_corpus(tmp_path / "src", tmp_path / "out", val_fraction=0.2)


def _is_window(row, tokens):
    """Whether ``row`` is a contiguous slice of ``tokens`` (a brute-force search)."""
    n = len(row)
    return any(np.array_equal(tokens[s : s + n], row) for s in range(len(tokens) - n + 1))


def test_windows_are_slices_of_their_split_and_deterministic(corpus):
    a = WindowSampler(corpus, "train", seq_len=16, batch_size=4, seed=7)
    b = WindowSampler(corpus, "train", seq_len=16, batch_size=4, seed=7)
    other = WindowSampler(corpus, "train", seq_len=16, batch_size=4, seed=8)
    batches = [a.next_batch() for _ in range(3)]
    for batch in batches:
        assert batch.dtype == torch.int64 and batch.shape == (4, 16)
        assert all(_is_window(row.numpy(), np.asarray(corpus.tokens("train"))) for row in batch)
        torch.testing.assert_close(batch, b.next_batch(), rtol=0, atol=0)
    assert not torch.equal(torch.stack(batches), torch.stack([other.next_batch() for _ in range(3)]))
    assert a.batches_drawn == 3


def test_state_dict_resumes_the_same_batches(corpus, tmp_path):
    a = WindowSampler(corpus, "train", seq_len=8, batch_size=4, seed=3)
    for _ in range(3):
        a.next_batch()
    torch.save(a.state_dict(), tmp_path / "state.pt")
    expected = [a.next_batch() for _ in range(4)]

    resumed = WindowSampler(corpus, "train", seq_len=8, batch_size=4, seed=99)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.batches_drawn == 3
    for batch in expected:
        torch.testing.assert_close(resumed.next_batch(), batch, rtol=0, atol=0)
    assert resumed.batches_drawn == 7
    # JSON carries the state as well.
    again = WindowSampler(corpus, "train", seq_len=8, batch_size=4, seed=0)
    again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    torch.testing.assert_close(again.next_batch(), resumed.next_batch(), rtol=0, atol=0)

    with pytest.raises(ValueError, match="state was saved by a sampler with seq_len=8; this one has seq_len=4"):
        WindowSampler(corpus, "train", seq_len=4, batch_size=4, seed=3).load_state_dict(a.state_dict())


def test_ranks_together_see_the_single_process_batch(corpus):
    single = WindowSampler(corpus, "train", seq_len=8, batch_size=8, seed=5)
    ranks = [WindowSampler(corpus, "train", seq_len=8, batch_size=8, seed=5, rank=r, world_size=4) for r in range(4)]
    for _ in range(3):
        parts = [r.next_batch() for r in ranks]
        assert all(p.shape == (2, 8) for p in parts)
        torch.testing.assert_close(torch.cat(parts), single.next_batch(), rtol=0, atol=0)
    # A run saved on 4 ranks resumes on 1 with the same global batches.
    resumed = WindowSampler(corpus, "train", seq_len=8, batch_size=8, seed=0)
    resumed.load_state_dict(ranks[0].state_dict())
    torch.testing.assert_close(resumed.next_batch(), single.next_batch(), rtol=0, atol=0)
    # Evaluation windows are sliced the same way.
    full = single.eval_batches(2)
    for i in range(2):
        torch.testing.assert_close(torch.cat([r.eval_batches(2)[i] for r in ranks]), full[i], rtol=0, atol=0)


def test_eval_batches_are_fixed(corpus):
    train = WindowSampler(corpus, "train", seq_len=8, batch_size=4, seed=1)
    first = train.eval_batches(3)
    for _ in range(5):
        train.next_batch()
    later = train.eval_batches(3)
    other_run = WindowSampler(corpus, "val", seq_len=8, batch_size=4, seed=2).eval_batches(3)
    val = np.asarray(corpus.tokens("val"))
    for a, b, c in zip(first, later, other_run):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        assert all(_is_window(row.numpy(), val) for row in a)
    assert not torch.equal(torch.stack(first), torch.stack(train.eval_batches(3, seed=1)))
    # Drawing evaluation windows does not move the training RNG.
    x, y = WindowSampler(corpus, "train", seq_len=8, batch_size=4, seed=1), WindowSampler(
        corpus, "train", seq_len=8, batch_size=4, seed=1
    )
    x.eval_batches(2)
    torch.testing.assert_close(x.next_batch(), y.next_batch(), rtol=0, atol=0)


def test_sampler_errors(corpus, tmp_path):
    kw = dict(seq_len=8, batch_size=4, seed=0)
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be divisible by world_size \(4\)"):
        WindowSampler(corpus, "train", seq_len=8, batch_size=6, seed=0, rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\)"):
        WindowSampler(corpus, "train", **kw, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        WindowSampler(corpus, "train", seq_len=0, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        WindowSampler(corpus, "valid", **kw)
    with pytest.raises(TypeError, match="corpus must be a Corpus"):
        WindowSampler(str(tmp_path / "out"), "train", **kw)
    n_val = corpus.n_tokens("val")
    with pytest.raises(ValueError, match=f"split 'val' .* has {n_val} tokens, fewer than seq_len={n_val + 1}"):
        WindowSampler(corpus, "val", seq_len=n_val + 1, batch_size=4, seed=0)
    long = WindowSampler(corpus, "train", seq_len=n_val + 1, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        long.eval_batches(1)
    with pytest.raises(ValueError, match="n_batches must be a positive int"):
        long.eval_batches(0)
