"""The prefix cache: shared prompt prefixes are computed once, and outputs do not change (real MLX, tiny model)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlxq.worker.model import load_model
from mlxq.worker.prefix import PREFIX_BLOCK, PrefixCache
from mlxq.worker.sampling import RowSampler
from mlxq.worker.slots import SlotBatch

MB = 2**20


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(str(tiny_model))


def _encode(loaded, text):
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def _prompts(loaded):
    """Prompts that share prefixes in every way the cache must get right."""
    shared = _encode(loaded, "System: answer as a careful assistant would. " * 12)
    assert len(shared) > 4 * PREFIX_BLOCK and len(shared) % PREFIX_BLOCK, "the prefix should end mid-block"
    prompts = [shared + _encode(loaded, f" Question {i}: " + "why " * (i % 5)) for i in range(6)]
    prompts += [
        shared,  # a whole earlier prefix as the prompt
        shared[: 3 * PREFIX_BLOCK],  # a prompt of exactly three blocks
        shared[: 3 * PREFIX_BLOCK + 1],  # ... and one token more: all three blocks are reusable
        shared[:PREFIX_BLOCK - 1],  # shorter than a block
        shared + [7],  # these two differ only in their last token
        shared + [8],
        prompts[0],  # a prompt seen before, whole
        prompts[1][:-1] + [prompts[1][-1] + 1],
    ]
    return shared, prompts


def _run(loaded, prompts, samplers, cache, width=4, n=10):
    batch = SlotBatch(loaded.model, width=width, prefill_tokens=200, prefix_cache=cache)
    uids = batch.insert(prompts, samplers, max_tokens=[n] * len(prompts))
    got = {u: [] for u in uids}
    while len(batch):
        for step in batch.next():
            got[step.uid].append(step.token)
        batch.remove([u for u in uids if len(got[u]) >= n and u in {r.uid for r in batch.rows}])
    return [got[u] for u in uids]


def test_greedy_output_is_the_same_with_the_cache_and_without(loaded, elementwise):
    shared, prompts = _prompts(loaded)
    without = _run(loaded, prompts, [RowSampler(0.0) for _ in prompts], None)
    cache = PrefixCache(64 * MB)
    with_cache = _run(loaded, prompts, [RowSampler(0.0) for _ in prompts], cache)
    assert with_cache == without
    # The shared prefix's whole blocks came from the cache for (at least) the eight
    # prompts that start with all of it and join after the first batch of four.
    assert cache.hit_tokens >= 8 * (len(shared) // PREFIX_BLOCK) * PREFIX_BLOCK
    # Every row in the batch at once (the rows in flight share too), and again from a warm cache.
    assert _run(loaded, prompts, [RowSampler(0.0) for _ in prompts], cache, width=len(prompts)) == without


def test_seeded_sampling_is_the_same_with_the_cache_and_without(loaded, elementwise):
    _, prompts = _prompts(loaded)

    def samplers():
        return [RowSampler(0.9, 0.9 if i % 2 else None, 20 if i % 3 == 0 else None, seed=100 + i)
                for i in range(len(prompts))]

    without = _run(loaded, prompts, samplers(), None)
    cache = PrefixCache(64 * MB)
    assert _run(loaded, prompts, samplers(), cache) == without
    assert cache.hit_tokens > 0


def test_a_disabled_cache_keeps_nothing(loaded):
    prompts = _prompts(loaded)[1][:3]
    cache = PrefixCache(0)
    _run(loaded, prompts, [RowSampler(0.0) for _ in prompts], cache)
    assert len(cache) == 0 and cache.hit_tokens == 0


def _filled_batch(loaded, cache, prompts, namespace=None):
    batch = SlotBatch(loaded.model, width=len(prompts), prefix_cache=cache, namespace=namespace)
    batch.insert(prompts, [RowSampler(0.0) for _ in prompts])
    while batch.waiting:
        batch.next()
    return batch


def test_the_cache_stays_within_its_bound_and_drops_the_least_recently_used(loaded):
    first = _encode(loaded, "alpha beta gamma delta " * 20)[: 4 * PREFIX_BLOCK + 1]
    second = _encode(loaded, "one two three four five " * 20)[: 4 * PREFIX_BLOCK + 1]
    probe = PrefixCache(1024 * MB)
    _filled_batch(loaded, probe, [first])
    block_bytes = probe.nbytes // len(probe)
    assert len(probe) == 4

    cache = PrefixCache(6 * block_bytes)  # room for six of the eight blocks
    _filled_batch(loaded, cache, [first])
    _filled_batch(loaded, cache, [second])
    assert cache.nbytes <= cache.max_bytes and len(cache) == 6
    # The older prompt lost its last blocks first: its start is still there.
    assert len(cache.match(None, first, len(first) - 1)) == 2
    assert len(cache.match(None, second, len(second) - 1)) == 4


def test_adapters_do_not_share_cached_prefixes(loaded):
    prompt = _encode(loaded, "the same words for every adapter " * 10)
    cache = PrefixCache(64 * MB)
    _filled_batch(loaded, cache, [prompt], namespace="adapters/a")
    assert cache.match("adapters/a", prompt, len(prompt) - 1)
    assert cache.match("adapters/b", prompt, len(prompt) - 1) == []
    assert cache.match(None, prompt, len(prompt) - 1) == []


def test_cached_blocks_are_copies_that_later_steps_do_not_change(loaded):
    prompt = _encode(loaded, "a prompt whose keys must stay as computed " * 6)
    cache = PrefixCache(64 * MB)
    batch = _filled_batch(loaded, cache, [prompt])
    blocks = cache.match(None, prompt, len(prompt) - 1)
    before = mx.concatenate(cache.use(blocks), axis=3)
    mx.eval(before)  # a copy, taken now
    for _ in range(40):  # decoding writes the row in place
        batch.next()
    batch.close()
    assert mx.array_equal(mx.concatenate(cache.use(blocks), axis=3), before).item()


def test_rows_that_start_alike_are_not_prefilled_side_by_side(loaded):
    """Requests arriving together with a shared prefix: one computes it, the others copy it."""
    shared = _encode(loaded, "Shared instructions for every request in this batch. " * 6)[: 3 * PREFIX_BLOCK + 5]
    prompts = [shared + _encode(loaded, f" item {i}") for i in range(6)]
    without = _run(loaded, prompts, [RowSampler(0.0) for _ in prompts], None, width=8)
    cache = PrefixCache(64 * MB)
    batch = SlotBatch(loaded.model, width=8, prefill_tokens=4096, prefix_cache=cache)
    batch.insert(prompts, [RowSampler(0.0) for _ in prompts])
    batch.next()  # the first prefill batch: one of them, though all would fit
    assert len(batch.rows) == 1 and len(batch.waiting) == 5
    batch.close()
    assert cache.hit_tokens == 0
    assert _run(loaded, prompts, [RowSampler(0.0) for _ in prompts], cache, width=8) == without
    assert cache.hit_tokens == 6 * 3 * PREFIX_BLOCK


def test_rows_with_as_many_cached_blocks_each_get_their_own(loaded):
    """Prompts whose cached starts differ (same length, other tokens) prefill side by side."""
    prompts = [_encode(loaded, f"Topic {word}: " + "tell me more about it please " * 9)[: 2 * PREFIX_BLOCK + 3 + i]
               for i, word in enumerate(["rivers", "bread", "autumn", "queues"])]
    assert len({tuple(p[:PREFIX_BLOCK]) for p in prompts}) == 4
    without = _run(loaded, prompts, [RowSampler(0.0) for _ in prompts], None, width=4)
    cache = PrefixCache(64 * MB)
    for p in prompts:  # each start cached by a request of its own
        _run(loaded, [p], [RowSampler(0.0)], cache, width=1)
    before = cache.hit_tokens
    assert _run(loaded, prompts, [RowSampler(0.0) for _ in prompts], cache, width=4) == without
    assert cache.hit_tokens - before == 4 * 2 * PREFIX_BLOCK
