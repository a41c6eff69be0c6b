"""The slot batch and the batch sampler, against mlx-lm's own generation (real MLX, tiny model)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from mlxq.worker.model import load_model
from mlxq.worker.sampling import RowSampler, make_request_processors, sample
from mlxq.worker.slots import ATTENTION_ROWS, LENGTH_BLOCK, SHARED_MIN, SlotBatch, SlotKVCache, slot_attention


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(str(tiny_model))


# Every test with softmax and SiLU in MLX's operations, and in the C kernels the worker preloads.
pytestmark = pytest.mark.usefixtures("elementwise")


def _prompts(tokenizer, count):
    # Lengths from 1 token to a few hundred, so prefill batches pad and rows differ.
    prompts = [tokenizer.encode("Hi", add_special_tokens=False)[:1]]
    for i in range(1, count):
        prompts.append(tokenizer.encode(f"Request {i}: " + "many words " * (i * 13 % 90), add_special_tokens=False))
    return prompts


def _stock_greedy(model, prompt, n):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=make_sampler(0.0))]


def _run(batch, prompts, samplers, lengths, processors=None):
    """Run ``prompts`` through ``batch``, removing each after ``lengths[i]`` tokens."""
    uids = batch.insert(prompts, samplers, processors)
    want = dict(zip(uids, lengths))
    got = {u: [] for u in uids}
    while len(batch):
        for step in batch.next():
            got[step.uid].append(step.token)
        batch.remove([u for u in uids if len(got[u]) >= want[u] and u in {r.uid for r in batch.rows}])
    return [got[u] for u in uids]


def test_greedy_tokens_equal_mlx_lm_through_joins_and_leaves(loaded):
    """Rows of different lengths join and leave a batch narrower than the requests."""
    model = loaded.model
    prompts = _prompts(loaded.tokenizer, 14)
    lengths = [3 + (i * 7) % 25 for i in range(len(prompts))]
    expected = [_stock_greedy(model, p, n) for p, n in zip(prompts, lengths)]
    batch = SlotBatch(model, width=5, prefill_tokens=300)
    assert _run(batch, prompts, [RowSampler(0.0) for _ in prompts], lengths) == expected
    assert batch.nbytes == 0  # an empty batch holds no cache


def test_packed_prompts_get_the_keys_values_and_tokens_of_padded_ones(loaded):
    """Prompts of different lengths prefilled one after another in one sequence, each rotated
    and attended at its own positions, against the same prompts side by side, right-padded."""
    model = loaded.model
    prompts = _prompts(loaded.tokenizer, 9)
    lengths = [2 + i % 5 for i in range(len(prompts))]
    batches = {}
    for packed in (True, False):
        batch = SlotBatch(model, width=len(prompts), prefill_tokens=4096)
        assert batch.packed  # a Qwen2 model's prompts are packed
        batch.packed = packed
        batch.insert(prompts, [RowSampler(0.0) for _ in prompts], max_tokens=lengths)
        assert batch.next() == [] and not batch.waiting  # one prefill call took them all
        batches[packed] = batch
    for rows in zip(batches[True].rows, batches[False].rows):
        assert rows[0].uid == rows[1].uid
    for packed_cache, padded_cache in zip(batches[True].caches, batches[False].caches):
        for i, row in enumerate(batches[True].rows):
            for got, want in ((packed_cache.keys, padded_cache.keys), (packed_cache.values, padded_cache.values)):
                np.testing.assert_allclose(np.array(got[i, :, :row.length]), np.array(want[i, :, :row.length]),
                                           rtol=1e-5, atol=1e-6)
    tokens = {packed: [[s.token for s in batch.next()] for _ in range(4)] for packed, batch in batches.items()}
    assert tokens[True] == tokens[False]


def test_decode_attention_reads_each_group_of_rows_only_as_far_as_it_needs(loaded):
    model = loaded.model
    prompts = _prompts(loaded.tokenizer, 3 * ATTENTION_ROWS)
    expected = [_stock_greedy(model, p, 6) for p in prompts]
    batch = SlotBatch(model, width=len(prompts), prefill_tokens=10_000)
    uids = batch.insert(prompts, [RowSampler(0.0) for _ in prompts])
    got = {u: [] for u in uids}
    for _ in range(40):
        steps = batch.next()
        for step in steps:
            got[step.uid].append(step.token)
        if steps:
            groups = batch.caches[0].groups
            assert len(groups) == 3 and [hi - lo for lo, hi, _ in groups] == [ATTENTION_ROWS] * 3
            for lo, hi, fetch in groups:  # the step read up to the new token of its longest row
                assert fetch == max(r.length for r in batch.rows[lo:hi])
            assert len({fetch for _, _, fetch in groups}) > 1  # neighbours are of similar length
        if all(len(t) >= 6 for t in got.values()):
            break
    assert [got[u][:6] for u in uids] == expected


def test_rows_that_share_a_prompt_prefix_read_it_once_for_all(loaded):
    """Decode attention reads a prefix neighbouring rows share from the first of them only."""
    model, tokenizer = loaded.model, loaded.tokenizer
    shared = tokenizer.encode("Instructions: answer briefly and well. " * 14, add_special_tokens=False)
    assert len(shared) > SHARED_MIN + 20
    prompts = [shared + tokenizer.encode(f" Question {i}: " + "why " * i, add_special_tokens=False)
               for i in range(ATTENTION_ROWS + 3)]
    prompts[4] = shared[:SHARED_MIN + 20] + tokenizer.encode(" Other question", add_special_tokens=False)
    expected = [_stock_greedy(model, p, 6) for p in prompts]
    batch = SlotBatch(model, width=len(prompts), prefill_tokens=10_000)
    uids = batch.insert(prompts, [RowSampler(0.0) for _ in prompts])
    got = {u: [] for u in uids}
    checked = False
    while not all(len(t) >= 6 for t in got.values()):
        steps = batch.next()
        for step in steps:
            got[step.uid].append(step.token)
        if steps and not checked:
            cache = batch.caches[0]
            # One run of every row: the prefix they all share (row 4's is the shortest).
            assert cache.runs == [(0, len(prompts), SHARED_MIN + 20)]
            assert cache.group_runs == [0, 0]
            # The same attention as each row reading its whole own cache.
            rows, fetch = len(batch.rows), cache._fetch
            queries = mx.random.normal((rows, model.layers[0].self_attn.n_heads, 1, cache.keys.shape[-1]))
            mask = cache.make_mask(1)
            keys, values = cache.keys[:rows, :, :fetch], cache.values[:rows, :, :fetch]
            once = slot_attention(queries, keys, values, cache, scale=0.125, mask=mask)
            cache.runs, cache.group_runs = [], [None] * len(cache.groups)
            each = slot_attention(queries, keys, values, cache, scale=0.125, mask=mask)
            assert mx.allclose(once, each, rtol=1e-4, atol=1e-5).item()
            checked = True
    assert checked
    assert [got[u][:6] for u in uids] == expected


def test_seeded_rows_are_the_same_alone_and_beside_others(loaded):
    model = loaded.model
    prompts = _prompts(loaded.tokenizer, 9)
    settings = [(0.9, None, None), (1.3, 0.8, None), (0.7, None, 12), (1.0, 0.5, 40)]
    for temperature, top_p, top_k in settings:
        alone = _run(SlotBatch(model, width=4), [prompts[3]], [RowSampler(temperature, top_p, top_k, 99)], [20])[0]
        samplers = [RowSampler(0.8, None, None, s) for s in range(len(prompts))]
        samplers[3] = RowSampler(temperature, top_p, top_k, 99)
        beside = _run(SlotBatch(model, width=4), prompts, samplers, [20] * len(prompts))[3]
        assert beside == alone


def test_penalties_run_per_row(loaded):
    """A repetition penalty changes greedy output only for the row that asked for it."""
    model = loaded.model
    prompt = loaded.tokenizer.encode("again and again and again", add_special_tokens=False)
    plain = _stock_greedy(model, prompt, 30)
    processors = [(), make_request_processors(1.9, None, 1.5)]
    out = _run(SlotBatch(model, width=4), [prompt, prompt], [RowSampler(0.0), RowSampler(0.0)], [30, 30], processors)
    assert out[0] == plain
    assert out[1] != plain


def test_the_cache_grows_in_blocks_and_shrinks_when_rows_leave(loaded):
    model = loaded.model
    prompts = _prompts(loaded.tokenizer, 8)
    batch = SlotBatch(model, width=8)
    uids = batch.insert(prompts, [RowSampler(0.0) for _ in prompts])
    while batch.waiting:
        batch.next()
    batch.next()
    rows, length = batch._capacity()
    assert rows == 8 and length % LENGTH_BLOCK == 0 and length > max(len(p) for p in prompts)
    full = batch.nbytes
    batch.remove(uids[1:])  # the shortest prompt is left
    assert 0 < batch.nbytes < full / 2
    batch.next()
    batch.remove(uids[:1])
    assert batch.nbytes == 0


def test_growing_the_cache_holds_at_most_half_a_layer_more_than_the_grown_cache():
    """Keys, then values: each old array goes before the next new one is made."""
    mx.set_default_device(mx.cpu)
    cache = SlotKVCache()
    cache.resize(8, 1024, 0, 0, (8, 64, mx.float32))  # 16 MiB of keys, 16 of values
    cache.keys, cache.values = cache.keys + 1, cache.values + 2
    mx.eval(cache.keys, cache.values)
    mx.reset_peak_memory()
    others = mx.get_active_memory() - cache.keys.nbytes - cache.values.nbytes  # arrays of other tests
    cache.resize(8, 2048, 8, 1024, (8, 64, mx.float32))
    grown = cache.keys.nbytes + cache.values.nbytes
    # The grown cache + the old values (16 MiB) and some room; with a whole old layer it would be + 32 MiB.
    assert mx.get_peak_memory() - others <= grown + 24 * 2**20
    assert cache.keys[:, :, :1024].min().item() == cache.keys[:, :, :1024].max().item() == 1
    assert cache.values[:, :, :1024].min().item() == 2 and cache.values[:, :, 1024:].max().item() == 0


def test_the_cache_is_kept_for_sequences_that_wait(loaded):
    """When every row leaves at once but sequences wait, their rows are not allocated afresh."""
    model = loaded.model
    prompts = _prompts(loaded.tokenizer, 8)
    batch = SlotBatch(model, width=4)
    uids = batch.insert(prompts, [RowSampler(0.0) for _ in prompts])
    while len(batch.rows) < 4:
        batch.next()
    batch.next()
    keys = batch.caches[0].keys
    batch.remove([r.uid for r in batch.rows])
    assert batch.waiting and batch.caches[0].keys is keys
    while not batch.next():
        pass
    assert batch.caches[0].keys.shape[0] == keys.shape[0]
    batch.remove(uids)
    assert batch.nbytes == 0


def test_the_sampler_draws_from_the_softmax_at_its_temperature():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    for temperature in (1.0, 0.5):
        sampler = RowSampler(temperature, seed=3)
        draws = np.array([sample(logits, [sampler])[0] for _ in range(20000)])
        freq = np.bincount(draws, minlength=4) / len(draws)
        p = np.exp(logits[0] / temperature)
        assert np.allclose(freq, p / p.sum(), atol=0.015), (temperature, freq)


def test_the_draw_by_blocks_inverts_the_whole_cumulative_sum():
    """Sampling's blockwise inverse (block sums, then one block) picks the token the
    cumulative sum of the whole row picks: a vocabulary of two full blocks and a tail,
    tokens of no weight (never picked), draws near 0 and 1."""
    from mlxq.worker.sampling import BLOCK, _draw

    rng = np.random.default_rng(1)
    vocab = 2 * BLOCK + 45
    weights = rng.random((5, vocab)).astype(np.float32) ** 4
    weights[:, ::7] = 0
    weights[2, :BLOCK] = 0  # a whole block of no weight
    weights[3, BLOCK:] = 0  # all the weight in the first block
    draws = [0.0, 1e-9, 0.5, 1 - 1e-9] + list(rng.random(400))
    for row in range(5):
        cdf = np.cumsum(weights[row], dtype=np.float64)
        want = [min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), vocab - 1) for u in draws]
        got = [int(_draw(weights[row:row + 1], [u])[0]) for u in draws]
        assert got == want
        assert all(weights[row, t] > 0 for t in got)


def test_the_sampler_cuts_and_greedy():
    logits = np.log(np.array([[0.05, 0.5, 0.3, 0.15]], dtype=np.float32))
    assert sample(logits, [RowSampler(0.0)])[0] == 1
    top_k = RowSampler(1.0, top_k=2, seed=1)
    assert set(sample(logits, [top_k])[0] for _ in range(300)) == {1, 2}
    top_p = RowSampler(1.0, top_p=0.7, seed=1)  # 0.5 + 0.3 reaches 0.7
    assert set(sample(logits, [top_p])[0] for _ in range(300)) == {1, 2}
    tiny_p = RowSampler(2.0, top_p=0.01, seed=1)
    assert set(sample(logits, [tiny_p])[0] for _ in range(50)) == {1}


def test_each_row_keeps_its_own_random_stream():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 1000)).astype(np.float32) * 3
    alone = [sample(logits[2:3], [RowSampler(0.9, seed=5)])[0] for _ in range(1)]
    a, b = RowSampler(0.9, seed=5), RowSampler(0.9, seed=5)
    seq_alone = [sample(logits[2:3], [a])[0] for _ in range(10)]
    others = [RowSampler(0.5 + i / 10, 0.9 if i % 2 else None, None, i) for i in range(6)]
    seq_batched = []
    for _ in range(10):
        others[2] = b
        seq_batched.append(sample(logits, others)[2])
    assert seq_alone == seq_batched and seq_alone[0] == alone[0]


@pytest.mark.parametrize("scores_bytes", [1, 2**30])
def test_prompt_attention_equals_mlx_fused_attention(monkeypatch, scores_bytes):
    """Prompt chunks' attention on the CPU (fast exp, a few heads at a time), grouped query heads included."""
    from mlx_lm.models.base import create_causal_mask

    import mlxq.worker.slots as slots

    monkeypatch.setattr(slots, "SCORES_BYTES", scores_bytes)  # 1: one row's kv head at a time
    mx.random.seed(7)
    rows, heads, kv_heads, n, start, dim = 3, 8, 2, 9, 23, 16
    queries = mx.random.normal((rows, heads, n, dim))
    keys = mx.random.normal((rows, kv_heads, start + n, dim))
    values = mx.random.normal((rows, kv_heads, start + n, dim))
    mask = create_causal_mask(n, offset=start)
    want = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=dim ** -0.5, mask=mask)
    got = slots._prompt_attention(queries, keys, values, dim ** -0.5, mask)
    assert got.shape == want.shape
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()


def test_prompt_attention_holds_one_slice_of_scores_at_a_time(monkeypatch):
    """The scores' bound holds: one slice's scores (and what is computed from them) at a
    time, not every slice's side by side."""
    from mlx_lm.models.base import create_causal_mask

    import mlxq.worker.slots as slots

    rows, heads, n, length, dim = 4, 4, 64, 1024, 64
    monkeypatch.setattr(slots, "SCORES_BYTES", n * length * 4)  # one row's head a slice: 16 slices
    queries = mx.random.normal((rows, heads, n, dim))
    keys = mx.random.normal((rows, heads, length, dim))
    values = mx.random.normal((rows, heads, length, dim))
    mask = create_causal_mask(n, offset=length - n)
    mx.eval(queries, keys, values, mask)
    mx.reset_peak_memory()
    active = mx.get_active_memory()
    mx.eval(slots._prompt_attention(queries, keys, values, dim ** -0.5, mask))
    scores = n * length * 4
    # One slice's scores, their softmax and the scaled queries: about 9x a slice's scores;
    # every slice's side by side: about 37x.
    assert mx.get_peak_memory() - active < 16 * scores


def test_prompt_processing_on_the_cpu_uses_that_attention(loaded, monkeypatch):
    import mlxq.worker.slots as slots

    calls = []
    original = slots._prompt_attention
    monkeypatch.setattr(slots, "_prompt_attention", lambda *a: calls.append(a[0].shape) or original(*a))
    prompt = loaded.tokenizer.encode("a prompt of a few words", add_special_tokens=False)
    assert _run(SlotBatch(loaded.model, width=2), [prompt], [RowSampler(0.0)], [3]) == [
        _stock_greedy(loaded.model, prompt, 3)]
    assert len(calls) == len(loaded.model.layers) and calls[0][2] == len(prompt) - 1


def test_decode_attention_equals_mlx_fused_attention():
    """A decode step's attention of a group of rows on the CPU (fast exp), each row seeing its own length."""
    import mlxq.worker.slots as slots

    mx.random.seed(8)
    rows, heads, kv_heads, length, dim = 5, 8, 2, 40, 16
    queries = mx.random.normal((rows, heads, 1, dim))
    keys = mx.random.normal((rows, kv_heads, length, dim))
    values = mx.random.normal((rows, kv_heads, length, dim))
    seen = mx.array([3, 17, 39, 25, 0])  # the last position each row sees
    mask = (mx.arange(length)[None, :] <= seen[:, None])[:, None, None, :]
    want = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=dim ** -0.5, mask=mask)
    got = slots._decode_attention(queries, keys, values, dim ** -0.5, mask, np.array(seen) + 1)
    assert got.shape == want.shape
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()


def test_decode_steps_on_the_cpu_use_that_attention(loaded, monkeypatch, elementwise):
    """Rows in one group and in several: every decode step goes through it (with the C kernel,
    once a layer for all rows), and the tokens are mlx-lm's."""
    import mlxq.worker.slots as slots

    calls, fused = [], []
    original, kernel = slots._decode_attention, slots.decode_attention
    monkeypatch.setattr(slots, "_decode_attention", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))

    def counted(*a, **k):
        out = kernel(*a, **k)
        if out is not None:
            fused.append(a[0].shape)
        return out

    monkeypatch.setattr(slots, "decode_attention", counted)
    for count in (2, ATTENTION_ROWS + 3):
        prompts = _prompts(loaded.tokenizer, count)
        calls.clear(), fused.clear()
        expected = [_stock_greedy(loaded.model, p, 4) for p in prompts]
        assert _run(SlotBatch(loaded.model, width=count, prefill_tokens=10_000), prompts,
                    [RowSampler(0.0) for _ in prompts], [4] * count) == expected
        if elementwise == "c-kernels":
            assert not calls and len(fused) >= 3 * len(loaded.model.layers)  # at least 3 decode steps
            assert all(shape[0] == count and shape[2] == 1 for shape in fused)
            continue
        groups = -(-count // ATTENTION_ROWS)
        assert not fused and len(calls) >= 3 * groups * len(loaded.model.layers)
        assert sum(shape[0] for shape in calls) % count == 0 and all(shape[2] == 1 for shape in calls)
