"""Every public name the README shows imports from where the README says."""

import importlib

import pytest

README_NAMES = {
    "lnlm_ssm": ["MambaLM", "MambaLMConfig", "from_pretrained", "ops", "__version__"],
    "lnlm_ssm.ops": [
        "selective_scan_fn", "mamba_chunk_scan_combined", "selective_state_update", "causal_conv1d_fn",
        "causal_conv1d_update", "rms_norm_fn", "decode_linear", "available_backends", "backend_report",
        "BackendUnavailableError",
    ],
    "lnlm_ssm.layers": ["Mamba", "Mamba2", "Attention", "GatedMLP", "RMSNorm", "Mixer", "InferenceCache"],
    "lnlm_ssm.models": ["MambaLM", "MambaLMConfig", "PRESETS", "preset", "from_pretrained", "register"],
    "lnlm_ssm.generation": ["generate"],
    "lnlm_ssm.objectives": ["Objective", "CausalLMObjective", "get_objective"],
    "lnlm_ssm.training": ["TrainConfig", "train"],
    "lnlm_ssm.data": ["prepare_corpus", "Corpus", "WindowSampler", "ByteTokenizer", "AminoAcidTokenizer"],
    "lnlm_ssm.checkpoint": ["save_pretrained", "read_checkpoint", "CheckpointError"],
}


@pytest.mark.parametrize("module", sorted(README_NAMES))
def test_readme_names_import(module):
    imported = importlib.import_module(module)
    missing = [name for name in README_NAMES[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lacks {missing}"
