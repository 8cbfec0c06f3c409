"""The docstring -> function name task: pairs from ``ast``, split by source file, no file in both splits."""

import json

import pytest

from lnlm_ssm.data.docstring_names import docstring_pairs, file_split, write_jsonl
from lnlm_ssm.data.text_pairs import read_pairs

SOURCE = '''
def public(x):
    """Add one
    to x.

    Details that are not kept."""
    return x + 1


def _private():
    """Not a pair: private."""


class Box:
    async def open_lid(self):
        """Open the lid."""

    def undocumented(self):
        pass
'''


def test_pairs_are_docstring_summaries_and_public_names(tmp_path):
    names = [f"mod{i}.py" for i in range(12)]
    for name in names:
        (tmp_path / name).write_text(SOURCE)
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(SOURCE)
    train, test = docstring_pairs("train", root=tmp_path), docstring_pairs("test", root=tmp_path)
    splits = {name: file_split(name) for name in names}
    assert {"train", "test"} <= set(splits.values())  # both splits have files
    assert len(train) == 2 * list(splits.values()).count("train") and len(test) == 2 * list(splits.values()).count("test")
    assert train[:2] == [{"input": "Add one to x.", "target": "public"}, {"input": "Open the lid.", "target": "open_lid"}]
    assert docstring_pairs("train", root=tmp_path, max_input=5)[0]["input"] == "Add o"
    path = write_jsonl(train, tmp_path / "train.jsonl")
    assert [(s, t) for s, t, _ in read_pairs(path)] == [(r["input"], r["target"]) for r in train]
    assert json.loads(path.read_text().splitlines()[0]) == train[0]


def test_the_stdlib_gives_both_splits():
    train = docstring_pairs("train", max_files=20)
    test = docstring_pairs("test", max_files=20)
    assert train and test
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        docstring_pairs("val")


def test_file_split_is_a_function_of_the_relative_path():
    assert file_split("json/decoder.py") == file_split("json/decoder.py")
    assert {file_split(f"m{i}.py") for i in range(30)} == {"train", "test"}
