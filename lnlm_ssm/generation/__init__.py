"""Generation: sampling (``sampling``) and the decode loop with its CUDA-graph step (``decode``)."""

from lnlm_ssm.generation.decode import generate
from lnlm_ssm.generation.sampling import apply_repetition_penalty, sample_next_token, top_k_filter, top_p_filter

__all__ = ["apply_repetition_penalty", "generate", "sample_next_token", "top_k_filter", "top_p_filter"]
