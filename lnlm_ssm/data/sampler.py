"""``WindowSampler``: seeded random windows of a prepared corpus, identical on every rank, resumable exactly."""

from __future__ import annotations

import numpy as np
import torch

from lnlm_ssm.data.corpus import Corpus, check_split
from lnlm_ssm.utils.checks import check_positive_int

__all__ = ["WindowSampler"]


class WindowSampler:
    """Random windows of ``seq_len`` tokens from one split of a corpus, in batches.

    Each global batch of ``batch_size`` window starts comes from one seeded RNG, drawn the same
    on every rank; rank ``r`` keeps rows ``[r * local, (r + 1) * local)`` with
    ``local = batch_size // world_size``. So N processes together see exactly the windows one
    process sees, and a run may resume on a different world_size. Windows may cross document
    boundaries (the eos between documents is in the data).
    """

    def __init__(
        self,
        corpus: Corpus,
        split: str,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(corpus, Corpus):
            raise TypeError(f"corpus must be a Corpus (prepare_corpus / Corpus.open); got {type(corpus).__name__}")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            check_positive_int(name, value)
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed must be a non-negative int; got {seed!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be an int in [0, world_size={world_size}); got {rank!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by world_size ({world_size})")
        self.corpus = corpus
        self.split = check_split(split)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._tokens = self._split_tokens(split)
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self.batches_drawn = 0

    def _split_tokens(self, split: str) -> np.ndarray:
        tokens = self.corpus.tokens(split)
        if len(tokens) < self.seq_len:
            raise ValueError(
                f"split {split!r} of {self.corpus.directory} has {len(tokens)} tokens, fewer than seq_len="
                f"{self.seq_len}: use a shorter seq_len, a larger corpus (max_bytes) or a larger val_fraction"
            )
        return tokens

    def _batch(self, rng: np.random.Generator, tokens: np.ndarray) -> torch.Tensor:
        starts = rng.integers(0, len(tokens) - self.seq_len + 1, size=self.batch_size)
        local = starts[self.rank * self.local_batch_size : (self.rank + 1) * self.local_batch_size]
        # One fancy-indexing read: only the pages under the windows are touched.
        windows = tokens[local[:, None] + np.arange(self.seq_len)]
        return torch.from_numpy(windows.astype(np.int64))

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size // world_size, seq_len) int64 batch of this rank."""
        batch = self._batch(self._rng, self._tokens)
        self.batches_drawn += 1
        return batch

    def eval_batches(self, n_batches: int, *, split: str = "val", seed: int = 0) -> list[torch.Tensor]:
        """``n_batches`` batches of ``split`` that depend only on ``seed``, not on the training RNG:
        every evaluation (and every run with the same corpus and shapes) sees the same windows."""
        check_positive_int("n_batches", n_batches)
        tokens = self._split_tokens(check_split(split))
        rng = np.random.Generator(np.random.PCG64(seed))
        return [self._batch(rng, tokens) for _ in range(n_batches)]

    def state_dict(self) -> dict:
        """The RNG state and the number of batches drawn (plain Python types: torch.save or JSON)."""
        return {
            "split": self.split,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_tokens": len(self._tokens),
            "seed": self.seed,
            "batches_drawn": self.batches_drawn,
            "rng_state": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: the next batches are the ones the saving sampler would have drawn."""
        for key in ("split", "seq_len", "batch_size", "n_tokens"):
            mine = len(self._tokens) if key == "n_tokens" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(
                    f"state was saved by a sampler with {key}={state.get(key)!r}; this one has {key}={mine!r}"
                )
        self._rng.bit_generator.state = state["rng_state"]
        self.seed = state["seed"]
        self.batches_drawn = state["batches_drawn"]
