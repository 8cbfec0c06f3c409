"""The model registry: lnlm_ssm.from_pretrained builds whatever a checkpoint holds; a family registers once."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lnlm_ssm
from lnlm_ssm.checkpoint import CheckpointError
from lnlm_ssm.checkpoint.convert import Converter
from lnlm_ssm.models import MambaLM, PretrainedModel, registry


@dataclasses.dataclass
class ToyConfig:
    width: int = 3

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(**data)


class ToyModel(PretrainedModel):
    architecture = "ToyModel"
    main_weight = "proj.weight"

    def __init__(self, config, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.width, config.width, device=device, dtype=dtype)


TOY_FOREIGN = Converter(
    layout="toy", model_type="toy", config=lambda raw: {"width": raw["hidden"]},
    state=lambda state, fields: {k.replace("dense.", "proj."): t for k, t in state.items()},
)


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setattr(registry, "_ARCHITECTURES", dict(registry._ARCHITECTURES))
    registry.register(ToyModel, ToyConfig, converters=(TOY_FOREIGN,), presets={"toy-small": {"width": 2}})


def test_a_new_family_saves_loads_and_dispatches(tmp_path, toy_family):
    model = ToyModel(ToyConfig(width=4))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == "ToyModel"
    loaded = lnlm_ssm.from_pretrained(tmp_path)
    assert type(loaded) is ToyModel and loaded.config == ToyConfig(width=4)
    torch.testing.assert_close(loaded.proj.weight, model.proj.weight, rtol=0, atol=0)
    assert type(ToyModel.from_pretrained(tmp_path)) is ToyModel
    with pytest.raises(CheckpointError, match="holds a ToyModel, not a MambaLM"):
        MambaLM.from_pretrained(tmp_path)


def test_a_family_reads_its_foreign_layout(tmp_path, toy_family):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy", "hidden": 2}))
    save_file({"dense.weight": torch.eye(2), "dense.bias": torch.zeros(2)}, tmp_path / "model.safetensors")
    loaded = lnlm_ssm.from_pretrained(tmp_path)
    assert type(loaded) is ToyModel and loaded.config.width == 2
    torch.testing.assert_close(loaded.proj.weight, torch.eye(2))


def test_our_checkpoints_name_their_architecture(tmp_path):
    MambaLM.from_name("mamba-tiny", n_layer=1).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "lnlm_ssm" and config["architecture"] == "MambaLM"
    assert type(lnlm_ssm.from_pretrained(tmp_path)) is MambaLM
    config["architecture"] = "Transformer9000"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"architecture 'Transformer9000'.*it has \[.*'MambaLM'"):
        lnlm_ssm.from_pretrained(tmp_path)


def test_registering_a_second_class_under_a_taken_name_is_refused(toy_family):
    class Impostor(ToyModel):
        architecture = "ToyModel"

    with pytest.raises(ValueError, match="architecture 'ToyModel' is registered already"):
        registry.register(Impostor, ToyConfig)
    assert "MambaLM" in registry.architectures()


def test_presets_of_every_family_are_found_by_name(toy_family):
    assert registry.preset("toy-small") == ToyConfig(width=2)
    assert registry.preset("toy-small", width=5) == ToyConfig(width=5)
    assert registry.preset_architecture("toy-small").model_class is ToyModel
    assert registry.preset("mamba-tiny").d_model == 128
    assert {"toy-small", "mamba-tiny", "gpt-tiny"} <= set(registry.preset_names())
    with pytest.raises(ValueError, match="unknown preset 'toy-smal'; choose from"):
        registry.preset("toy-smal")


def test_a_preset_name_taken_by_another_family_is_refused(toy_family):
    class Other(ToyModel):
        architecture = "Other"

    with pytest.raises(ValueError, match=r"presets \['toy-small'\] of Other are registered already, by ToyModel"):
        registry.register(Other, ToyConfig, presets={"toy-small": {"width": 4}})
