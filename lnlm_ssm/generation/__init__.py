"""Generation: sampling (``sampling``), the decode loop with its CUDA-graph step (``decode``), the
encoder-decoder loop with beam search (``seq2seq``)."""

from lnlm_ssm.generation.decode import generate
from lnlm_ssm.generation.seq2seq import generate as generate_seq2seq
from lnlm_ssm.generation.sampling import apply_repetition_penalty, sample_next_token, top_k_filter, top_p_filter

__all__ = ["apply_repetition_penalty", "generate", "generate_seq2seq", "sample_next_token", "top_k_filter", "top_p_filter"]
