"""benchmarks/lm_speed.py runs end to end on a tiny model, beside HF's Mamba when transformers is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_speed.py"


def test_quick_run(tmp_path):
    spec = importlib.util.spec_from_file_location("lm_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    have_hf = importlib.util.find_spec("transformers") is not None
    argv = ["--quick", "--threads", "1", "--out", str(tmp_path)] + ([] if have_hf else ["--no-hf"])
    assert module.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["lnlm_ssm MambaLM"] + (["HF MambaForCausalLM"] if have_hf else [])
    for r in rows:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["train_tok_s"] > 0
