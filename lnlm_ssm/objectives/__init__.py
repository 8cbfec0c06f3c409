"""Training objectives: one file each, all behind the ``Objective`` interface (``objectives.base``)."""

from lnlm_ssm.objectives.base import Objective, ObjectiveOutput
from lnlm_ssm.objectives.causal_lm import CausalLMObjective
from lnlm_ssm.objectives.electra import ElectraObjective
from lnlm_ssm.objectives.mlm import MaskedLMObjective
from lnlm_ssm.objectives.plm import PLMObjective
from lnlm_ssm.objectives.sop import SentenceOrderObjective
from lnlm_ssm.utils.checks import check_choice

OBJECTIVES: dict[str, type[Objective]] = {
    CausalLMObjective.name: CausalLMObjective,
    MaskedLMObjective.name: MaskedLMObjective,
    SentenceOrderObjective.name: SentenceOrderObjective,
    ElectraObjective.name: ElectraObjective,
    PLMObjective.name: PLMObjective,
}


def get_objective(name: str) -> Objective:
    """A new instance of the objective called ``name`` (see ``OBJECTIVES``)."""
    return OBJECTIVES[check_choice("objective", name, tuple(OBJECTIVES))]()


__all__ = [
    "OBJECTIVES",
    "CausalLMObjective",
    "ElectraObjective",
    "MaskedLMObjective",
    "Objective",
    "ObjectiveOutput",
    "PLMObjective",
    "SentenceOrderObjective",
    "get_objective",
]
