"""Training objectives: one file each, all behind the ``Objective`` interface (``objectives.base``)."""

from lnlm_ssm.objectives.base import Objective, ObjectiveOutput
from lnlm_ssm.objectives.causal_lm import CausalLMObjective
from lnlm_ssm.objectives.classify import ClassifyObjective
from lnlm_ssm.objectives.dpo import DPOObjective
from lnlm_ssm.objectives.electra import ElectraObjective
from lnlm_ssm.objectives.finetune import FinetuneObjective
from lnlm_ssm.objectives.mlm import MaskedLMObjective
from lnlm_ssm.objectives.plm import PLMObjective
from lnlm_ssm.objectives.reward import RewardObjective
from lnlm_ssm.objectives.seq2seq import Seq2SeqObjective
from lnlm_ssm.objectives.sft import SFTObjective
from lnlm_ssm.objectives.sop import SentenceOrderObjective
from lnlm_ssm.objectives.span import SpanCorruptionObjective
from lnlm_ssm.objectives.token_classify import TokenClassifyObjective
from lnlm_ssm.utils.checks import check_choice

# Pre-training objectives (they train on corpus windows; seq2seq on its own JSONL pairs, from a preset), then
# fine-tuning ones (on JSONL rows, from --init-from).
OBJECTIVES: dict[str, type[Objective]] = {
    o.name: o
    for o in (
        CausalLMObjective, MaskedLMObjective, SentenceOrderObjective, ElectraObjective, PLMObjective,
        SpanCorruptionObjective, Seq2SeqObjective,
        ClassifyObjective, TokenClassifyObjective, SFTObjective, RewardObjective, DPOObjective,
    )
}


def get_objective(name: str, **options) -> Objective:
    """A new instance of the objective called ``name`` (see ``OBJECTIVES``), given its constructor ``options``."""
    return OBJECTIVES[check_choice("objective", name, tuple(OBJECTIVES))](**options)


__all__ = [
    "OBJECTIVES",
    "CausalLMObjective",
    "ElectraObjective",
    "MaskedLMObjective",
    "Objective",
    "ObjectiveOutput",
    "PLMObjective",
    "Seq2SeqObjective",
    "SentenceOrderObjective",
    "SpanCorruptionObjective",
    "get_objective",
    "ClassifyObjective",
    "DPOObjective",
    "FinetuneObjective",
    "RewardObjective",
    "SFTObjective",
    "TokenClassifyObjective",
]
