"""Text-to-text JSONL data: row checks naming file, line and field; EOS and length rules; the pair sampler."""

import json

import pytest
import torch

from lnlm_ssm.data.text_pairs import DataError, PairSampler, encode_pair, read_pairs, split_rows
from lnlm_ssm.data.tokenizers import ByteTokenizer


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", r"line 2: not valid JSON"),
        ("[1, 2]", r"line 2: a row must be a JSON object .* got list"),
        ({"input": "a"}, r"line 2: field 'target' must be a non-empty string; got nothing"),
        ({"input": 3, "target": "b"}, r"line 2: field 'input' must be a non-empty string; got 3"),
        ({"input": "a", "target": ""}, r"line 2: field 'target' must be a non-empty string; got ''"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path, line, match):
    path = write_rows(tmp_path / "bad.jsonl", [{"input": "x", "target": "y"}, line])
    with pytest.raises(DataError, match=match) as info:
        read_pairs(path)
    assert str(path) in str(info.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="holds no rows"):
        read_pairs(write_rows(tmp_path / "empty.jsonl", []))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_pairs(tmp_path / "nope.jsonl")


def test_encode_pair_appends_eos_truncates_inputs_and_refuses_long_targets():
    tok = ByteTokenizer()
    source, target = encode_pair(tok, "abc", "xy", 8, "f, line 1")
    assert source == [97, 98, 99, 256] and target == [120, 121, 256]
    source, _ = encode_pair(tok, "abcdefghij", "x", 4, "f, line 1")
    assert source == [97, 98, 99, 256]
    with pytest.raises(DataError, match=r"f, line 3: field 'target' is 5 tokens .* longer than the 4"):
        encode_pair(tok, "a", "wxyz", 4, "f, line 3")


def test_split_rows_holds_out_every_tenth():
    rows = list(range(25))
    assert split_rows(rows, "val") == [9, 19]
    assert split_rows(rows, "train") == [r for r in rows if r not in (9, 19)]
    with pytest.raises(DataError, match="val split is empty"):
        split_rows(rows[:5], "val")


def test_sampler_batches_epochs_and_resumes(tmp_path):
    rows = [{"input": f"in {i}", "target": f"t{i}"} for i in range(20)]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    tok = ByteTokenizer()
    sampler = PairSampler(path, "train", tok, seq_len=8, batch_size=4, seed=0)
    batch = sampler.next_batch()
    assert batch.shape == (4, 2, 8)
    pad, ignore = tok.pad_token_id, -100
    for source, target in batch:
        text = tok.decode(source[source != pad].tolist())
        assert source[source != pad][-1] == tok.eos_token_id and text.startswith("in ")
        assert tok.decode(target[target != ignore].tolist()) == "t" + text[3:]
    # 18 training rows: the first epoch's rows come once each before any repeats.
    seen = [tok.decode(b[0].tolist()) for b in batch] + [
        tok.decode(row[0].tolist()) for _ in range(4) for row in sampler.next_batch()
    ]
    assert len(set(seen[:18])) == 18 and len(set(seen)) == 18
    state = sampler.state_dict()
    again = PairSampler(path, "train", tok, seq_len=8, batch_size=4, seed=0)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(), sampler.next_batch())
    # Two ranks each take their half of the same global batch.
    ranks = [PairSampler(path, "train", tok, seq_len=8, batch_size=4, seed=0, rank=r, world_size=2) for r in (0, 1)]
    whole = PairSampler(path, "train", tok, seq_len=8, batch_size=4, seed=0).next_batch()
    assert torch.equal(torch.cat([s.next_batch() for s in ranks]), whole)
    val = PairSampler(path, "val", tok, seq_len=8, batch_size=4, seed=0).eval_batches(3)
    assert [b.shape[0] for b in val] == [2]


def test_sampler_refuses_a_long_target(tmp_path):
    path = write_rows(tmp_path / "pairs.jsonl", [{"input": "a", "target": "b" * (i % 12 + 1)} for i in range(12)])
    with pytest.raises(DataError, match=r"pairs.jsonl, line 8: field 'target' is 9 tokens"):
        PairSampler(path, "train", ByteTokenizer(), seq_len=8, batch_size=2, seed=0)
