"""Data: tokenizers, corpora tokenised once to disk, and the window sampler that feeds training."""

from lnlm_ssm.data.corpus import Corpus, default_corpus_dir, prepare_corpus
from lnlm_ssm.data.sampler import WindowSampler
from lnlm_ssm.data.tokenizers import AminoAcidTokenizer, ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "AminoAcidTokenizer",
    "ByteTokenizer",
    "Corpus",
    "HFTokenizer",
    "WindowSampler",
    "default_corpus_dir",
    "load_tokenizer",
    "prepare_corpus",
]
