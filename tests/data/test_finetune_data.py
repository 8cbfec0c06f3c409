"""Fine-tuning rows: encoding, padding, labels, the sampler's order and state."""

import json

import pytest
import torch

from lnlm_ssm.data.finetune import IGNORE_INDEX, DataError, Encoder, RowSampler, collate, label_ids, read_rows
from lnlm_ssm.data.tokenizers import ByteTokenizer

EOS = ByteTokenizer.eos_token_id


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_loss_is_on_the_completion_and_its_eos_only():
    example = Encoder(ByteTokenizer(), "sft", max_len=16).encode({"prompt": "ab", "completion": "cd"}, None, 1)
    assert example["input_ids"] == [97, 98, 99, 100, EOS]
    assert example["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 99, 100, EOS]
    short = Encoder(ByteTokenizer(), "sft", max_len=4).encode({"prompt": "abcdef", "completion": "xy"}, None, 1)
    assert short["input_ids"] == [102, 120, 121, EOS]  # the prompt loses its oldest tokens


def test_pairs_pad_prompts_left_and_completions_right():
    encoder = Encoder(ByteTokenizer(), "pairs", max_len=32)
    rows = [{"prompt": "abc", "chosen": "x", "rejected": "yz"}, {"prompt": "a", "chosen": "x", "rejected": "y"}]
    batch = collate([encoder.encode(r, None, i) for i, r in enumerate(rows)], "pairs")
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["prompt_ids"][1, -1] == 97
    assert batch["chosen_mask"].tolist() == [[1, 1, 0], [1, 1, 0]]
    assert batch["rejected_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_labels_are_names_sorted_numerically_when_ints(tmp_path):
    rows = read_rows(write(tmp_path / "a.jsonl", [{"text": "a", "label": 10}, {"text": "b", "label": 2}]), "classify")
    assert label_ids(rows, "classify") == {"2": 0, "10": 1}
    rows = read_rows(write(tmp_path / "b.jsonl", [{"tokens": ["a", "b"], "labels": ["Y", "X"]}]), "token")
    label2id = label_ids(rows, "token")
    assert label2id == {"X": 0, "Y": 1}
    batch = collate([Encoder(ByteTokenizer(), "token", 8, label2id).encode(rows[0][1], None, 1)], "token")
    assert batch["labels"].tolist() == [[1, 0]]


@pytest.mark.parametrize("row, message", [
    ("[1, 2]", "a row must be a JSON object"),
    ("{not json", "not valid JSON"),
    ('{"tokens": ["a", "b"], "labels": ["X"]}', "one label per piece"),
    ('{"tokens": ["a", ""], "labels": ["X", "Y"]}', "non-empty strings"),
    ('{"text": "a", "labels": [true]}', "str or int labels"),
])
def test_bad_token_rows(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "labels": ["X", "Y"]}\n' + row + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl, line 2: .*{message}"):
        read_rows(path, "token")


def test_sampler_epochs_and_resume(tmp_path):
    path = write(tmp_path / "rows.jsonl", [{"text": str(i), "label": "a"} for i in range(5)])
    encoder = Encoder(ByteTokenizer(), "classify", 8, {"a": 0})
    sampler = RowSampler(path, encoder, batch_size=2, seed=3)
    seen = [sampler.next_batch()["input_ids"][:, 0].tolist() for _ in range(2)]
    state = sampler.state_dict()
    rest = [sampler.next_batch()["input_ids"][:, 0].tolist() for _ in range(3)]
    first_epoch = sorted(sum(seen, []) + rest[0][:1])
    assert first_epoch == [48, 49, 50, 51, 52]  # every row once per epoch
    again = RowSampler(path, encoder, batch_size=2, seed=3)
    again.load_state_dict(state)
    assert [again.next_batch()["input_ids"][:, 0].tolist() for _ in range(3)] == rest
    halves = [RowSampler(path, encoder, batch_size=2, seed=3, rank=r, world_size=2).next_batch() for r in (0, 1)]
    assert torch.cat([h["input_ids"][:, 0] for h in halves]).tolist() == seen[0]
    assert [len(b) for b in sampler.eval_batches()] == [2, 2, 1] and len(sampler.eval_batches(1)) == 1
