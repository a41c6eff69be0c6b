"""Sampling for a whole batch at once, with each row's own parameters and random stream.

The engine hands :func:`sample` the logits of every row after one step; rows
are grouped by what they need (greedy, plain temperature, or a top-p/top-k
cut) and each group is done in one vectorised NumPy pass (the plain group's
weights in one pass of mlxq's C library where the worker has it loaded). Every sampled
request owns a random generator seeded from its ``seed`` and draws exactly one
number per token, so a seeded request gives the same tokens alone or beside
any number of others.

Sampling is exact: a token is drawn from the whole (cut) distribution by
inverting its cumulative sum with that one uniform number (for plain
temperature sampling, the sum of blocks of the vocabulary first, then within
one block). Per-row MLX samplers cost far more on the CPU (at 32 rows of a
151,936-token vocabulary: 125 ms per step against 8 ms here), most of it in
drawing a Gumbel number per vocabulary entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

from .fastmath import sample_weights

__all__ = ["RowSampler", "make_request_sampler", "make_request_processors", "sample"]

#: Vocabulary entries per block of the cumulative sum (:func:`_draw`).
BLOCK = 128


@dataclass(eq=False)
class RowSampler:
    """One request's sampling parameters and random generator."""

    temperature: float
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: int = 0
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        if self.top_p is not None and not 0 < self.top_p < 1:
            self.top_p = None  # 1 (or more) keeps every token
        if self.top_k is not None and self.top_k <= 0:
            self.top_k = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def cuts(self) -> bool:
        return self.top_p is not None or self.top_k is not None


def make_request_sampler(
    temperature: float, top_p: Optional[float], top_k: Optional[int], seed: int
) -> RowSampler:
    """A sampler with its own random stream; temperature 0 is greedy."""
    return RowSampler(temperature, top_p, top_k, seed)


def sample(logits: np.ndarray, samplers: Sequence[RowSampler]) -> np.ndarray:
    """One token per row of ``logits`` (rows x vocabulary, float32)."""
    n = len(samplers)
    out = np.empty(n, dtype=np.int64)
    greedy = [i for i, s in enumerate(samplers) if s.greedy]
    plain = [i for i, s in enumerate(samplers) if not s.greedy and not s.cuts]
    cut = [i for i, s in enumerate(samplers) if not s.greedy and s.cuts]
    if greedy:
        out[greedy] = np.argmax(logits[greedy], axis=1)
    if plain:
        inv_t = np.array([1.0 / samplers[i].temperature for i in plain], dtype=np.float32)
        rows = logits if len(plain) == n else logits[plain]
        by_kernel = sample_weights(rows, inv_t, BLOCK)  # None without mlxq's C library
        if by_kernel is not None:
            weights, sums = by_kernel
        else:
            weights = rows * inv_t[:, None]
            weights -= weights.max(axis=1, keepdims=True)
            np.exp(weights, out=weights)
            sums = None
        out[plain] = _draw(weights, [samplers[i].rng.random() for i in plain], sums)
    for i in cut:
        out[i] = _sample_cut(logits[i], samplers[i])
    return out


def _block_sums(weights: np.ndarray) -> np.ndarray:
    """Each row's sums of its blocks of :data:`BLOCK` entries (the last may be shorter), float64."""
    rows, vocab = weights.shape
    full = vocab // BLOCK
    sums = np.empty((rows, full + (vocab > full * BLOCK)), dtype=np.float64)
    sums[:, :full] = weights[:, :full * BLOCK].reshape(rows, full, BLOCK).sum(axis=2, dtype=np.float64)
    if vocab > full * BLOCK:
        sums[:, full] = weights[:, full * BLOCK:].sum(axis=1, dtype=np.float64)
    return sums


def _draw(weights: np.ndarray, draws: Sequence[float], sums: Optional[np.ndarray] = None) -> np.ndarray:
    """For each row of ``weights`` (rows x vocabulary, not negative), the index whose
    cumulative weight first exceeds its draw times the row's total.

    The cumulative sum is taken over the sums of blocks of :data:`BLOCK` entries
    (``sums``, else computed here), then within the one block the draw falls in:
    NumPy's cumulative sum of a whole row runs one element at a time (16 ms of a
    22 ms step's sampling at 32 rows of a 151,936-token vocabulary), a block's
    sum does not.
    """
    sums = _block_sums(weights) if sums is None else sums
    np.cumsum(sums, axis=1, out=sums)
    out = np.empty(weights.shape[0], dtype=np.int64)
    for row, u in enumerate(draws):
        target = u * sums[row, -1]
        block = min(int(np.searchsorted(sums[row], target, side="right")), sums.shape[1] - 1)
        lo = block * BLOCK
        part = weights[row, lo:lo + BLOCK]
        before = sums[row, block - 1] if block else 0.0
        cdf = np.cumsum(part, dtype=np.float64) + before
        index = int(np.searchsorted(cdf, target, side="right"))
        if index >= part.shape[0]:  # the two sums' rounding: the block's last token with weight
            index = int(np.flatnonzero(part)[-1]) if part.any() else part.shape[0] - 1
        out[row] = lo + index
    return out


def _invert(cdf: np.ndarray, u: float) -> int:
    """The index whose cumulative mass first exceeds ``u`` times the total."""
    index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return min(index, cdf.shape[0] - 1)


def _sample_cut(logits: np.ndarray, sampler: RowSampler) -> int:
    """Sample one row after top-p (nucleus) and top-k cuts.

    As in mlx-lm, the cuts are made on the distribution at temperature 1 and
    the temperature applies to what is left. top-p keeps the smallest set of
    most likely tokens whose mass reaches ``top_p``; top-k keeps ``top_k``.
    """
    vocab = logits.shape[0]
    k = vocab if sampler.top_k is None else min(sampler.top_k, vocab)
    if k < vocab:
        keep = np.argpartition(logits, vocab - k)[vocab - k:]
    else:
        keep = np.arange(vocab)
    order = keep[np.argsort(logits[keep])[::-1]]  # most likely first
    kept = logits[order].astype(np.float64)
    if sampler.top_p is not None:
        probs = np.exp(kept - kept[0])
        mass = np.cumsum(probs)
        cutoff = int(np.searchsorted(mass, sampler.top_p * mass[-1], side="left")) + 1
        order, kept = order[:cutoff], kept[:cutoff]
    weights = np.exp((kept - kept[0]) / sampler.temperature)
    return int(order[_invert(np.cumsum(weights), sampler.rng.random())])


def make_request_processors(
    repetition_penalty: Optional[float],
    frequency_penalty: Optional[float],
    presence_penalty: Optional[float],
) -> List[Callable]:
    """Penalties as mlx-lm logits processors; 0 (and a repetition penalty of 1) is off."""
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(
        repetition_penalty=repetition_penalty if repetition_penalty not in (None, 0, 1) else None,
        frequency_penalty=frequency_penalty or None,
        presence_penalty=presence_penalty or None,
    )
