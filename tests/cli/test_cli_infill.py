"""``lnlm-ssm train --objective plm`` then ``lnlm-ssm infill`` on the trained any-order model."""

from lnlm_ssm.cli import main


def test_train_plm_then_infill(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"doc{i}.md").write_text("".join(f"line {j} of document {i}: hello world.\n" for j in range(60)))
    out = tmp_path / "run"
    flags = ["--preset", "mamba-plm-tiny", "--model", "d_model=32", "--model", "n_layer=2", "--data", str(corpus),
             "--out", str(out), "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--backend", "cpu"]
    assert main(["train", "--objective", "plm", *flags, "--steps", "2", "--eval-every", "2"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    model = str(out / "model")
    assert main(["infill", "--model", model, "--prefix", "line 1", "--suffix", "world.", "--length", "5",
                 "--temperature", "0"]) == 0
    middle = capsys.readouterr().out
    assert middle.endswith("\n")
    assert main(["infill", "--model", model, "--prefix", "ab", "--length", "1000"]) == 2
    assert "max_positions=512" in capsys.readouterr().err
    assert main(["infill", "--model", model, "--length", "3"]) == 2
    assert "--prefix or --suffix" in capsys.readouterr().err
    clm_flags = [*flags, "--preset", "mamba-tiny", "--out", str(tmp_path / "clm"), "--steps", "1"]
    assert main(["train", "--objective", "plm", *clm_flags]) == 2
    assert "the objective 'plm' trains PermutationLM or AnyOrderLM" in capsys.readouterr().err
