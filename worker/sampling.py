"""Per-request samplers and logits processors, built from validated parameters.

Every sampled request owns its random key, split once per token: a seeded
request draws the same tokens alone or beside any number of others.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p, greedy_sampler, make_logits_processors

__all__ = ["make_request_sampler", "make_request_processors"]

Sampler = Callable[[mx.array], mx.array]


def make_request_sampler(
    temperature: float, top_p: Optional[float], top_k: Optional[int], seed: int
) -> Sampler:
    """A sampler with its own random stream; temperature 0 is greedy."""
    if temperature == 0:
        return greedy_sampler
    state = {"key": mx.random.key(seed)}
    inv_temp = 1.0 / temperature

    def sampler(logprobs: mx.array) -> mx.array:
        state["key"], key = mx.random.split(state["key"])
        if top_p is not None and 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if top_k is not None:
            logprobs = apply_top_k(logprobs, top_k)
        return mx.random.categorical(logprobs * inv_temp, key=key)

    return sampler


def make_request_processors(
    repetition_penalty: Optional[float],
    frequency_penalty: Optional[float],
    presence_penalty: Optional[float],
) -> List[Callable]:
    """Penalties as mlx-lm logits processors; 0 (and a repetition penalty of 1) is off."""
    return make_logits_processors(
        repetition_penalty=repetition_penalty if repetition_penalty not in (None, 0, 1) else None,
        frequency_penalty=frequency_penalty or None,
        presence_penalty=presence_penalty or None,
    )
