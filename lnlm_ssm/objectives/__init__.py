"""Training objectives: one file each, all behind the ``Objective`` interface (``objectives.base``)."""

from lnlm_ssm.objectives.base import Objective, ObjectiveOutput
from lnlm_ssm.objectives.causal_lm import CausalLMObjective
from lnlm_ssm.objectives.plm import PLMObjective
from lnlm_ssm.utils.checks import check_choice

OBJECTIVES: dict[str, type[Objective]] = {CausalLMObjective.name: CausalLMObjective}
OBJECTIVES[PLMObjective.name] = PLMObjective


def get_objective(name: str) -> Objective:
    """A new instance of the objective called ``name`` (see ``OBJECTIVES``)."""
    return OBJECTIVES[check_choice("objective", name, tuple(OBJECTIVES))]()


__all__ = ["OBJECTIVES", "CausalLMObjective", "Objective", "ObjectiveOutput", "PLMObjective", "get_objective"]
