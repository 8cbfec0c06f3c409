"""Data: tokenizers, corpora tokenised once to disk, the window sampler that feeds training, and T5's
span-corruption collator."""

from lnlm_ssm.data.corpus import Corpus, default_corpus_dir, prepare_corpus
from lnlm_ssm.data.sampler import WindowSampler
from lnlm_ssm.data.span_corruption import SpanCorruptionCollator, span_corrupt
from lnlm_ssm.data.tokenizers import AminoAcidTokenizer, ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "AminoAcidTokenizer",
    "ByteTokenizer",
    "Corpus",
    "HFTokenizer",
    "SpanCorruptionCollator",
    "WindowSampler",
    "default_corpus_dir",
    "load_tokenizer",
    "prepare_corpus",
    "span_corrupt",
]
