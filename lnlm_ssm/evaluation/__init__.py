"""Evaluation with EleutherAI's lm-evaluation-harness (the optional ``eval`` extra).

Importing this package registers the lm-eval model ``"lnlm_ssm"`` (``harness.LnlmSsmLM``);
``evaluate`` runs tasks on a checkpoint and writes lm-eval's results JSON.
"""

from lnlm_ssm.evaluation.harness import LnlmSsmLM, evaluate

__all__ = ["LnlmSsmLM", "evaluate"]
