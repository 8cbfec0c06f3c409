"""Training objectives: one file each, all behind the ``Objective`` interface (``objectives.base``)."""

from lnlm_ssm.objectives.base import Objective, ObjectiveOutput
from lnlm_ssm.objectives.causal_lm import CausalLMObjective
from lnlm_ssm.objectives.classify import ClassifyObjective
from lnlm_ssm.objectives.dpo import DPOObjective
from lnlm_ssm.objectives.finetune import FinetuneObjective
from lnlm_ssm.objectives.reward import RewardObjective
from lnlm_ssm.objectives.sft import SFTObjective
from lnlm_ssm.objectives.token_classify import TokenClassifyObjective
from lnlm_ssm.utils.checks import check_choice

OBJECTIVES: dict[str, type[Objective]] = {CausalLMObjective.name: CausalLMObjective}
OBJECTIVES.update(
    {o.name: o for o in (ClassifyObjective, TokenClassifyObjective, SFTObjective, RewardObjective, DPOObjective)}
)


def get_objective(name: str, **options) -> Objective:
    """A new instance of the objective called ``name`` (see ``OBJECTIVES``), given its constructor ``options``."""
    return OBJECTIVES[check_choice("objective", name, tuple(OBJECTIVES))](**options)


__all__ = ["OBJECTIVES", "CausalLMObjective", "Objective", "ObjectiveOutput", "get_objective"]
__all__ += [
    "ClassifyObjective", "DPOObjective", "FinetuneObjective", "RewardObjective", "SFTObjective",
    "TokenClassifyObjective",
]
