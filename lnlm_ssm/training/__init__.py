"""Training: the data pipeline (corpus preparation and window sampling) and the training loop."""

from lnlm_ssm.training.data import AminoAcidTokenizer, Corpus, WindowSampler, default_corpus_dir, prepare_corpus

__all__ = ["AminoAcidTokenizer", "Corpus", "WindowSampler", "default_corpus_dir", "prepare_corpus"]
