"""The CPU's faster exp, SiLU and attention agree with MLX's and mlx-lm's own."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu
from mlx_lm.models.base import scaled_dot_product_attention as mlx_lm_attention

from mlxq.worker import fastmath
from mlxq.worker.fastmath import _bucket, fast_exp, patch_model, softmax_prefix, swiglu, swiglu_in_place


def test_fast_exp_is_as_close_to_the_true_value_as_mlx_exp():
    x = mx.random.normal((3, 1001), key=mx.random.key(1)) * 20
    true = np.exp(np.array(x, dtype=np.float64))
    ours = np.abs(np.array(fast_exp(x)) - true) / true
    theirs = np.abs(np.array(mx.exp(x)) - true) / true
    assert ours.max() <= max(theirs.max(), 2e-7)
    edges = np.array(fast_exp(mx.array([-1e30, -100.0, 0.0, 100.0])))
    assert edges[0] < 1e-37 and edges[1] < 1e-37 and edges[2] == 1.0 and np.isfinite(edges[3])


def test_buckets_bound_the_number_of_shapes():
    sizes = {_bucket(n) for n in range(1, 200_000, 7)}
    assert len(sizes) <= 8 * 8 + 1
    assert all(_bucket(n) >= n and _bucket(n) <= max(1024, n * 9 // 8 + 1) for n in range(1, 100_000, 13))


def test_swiglu_matches_mlx_lm():
    gate = mx.random.normal((2, 9, 300), key=mx.random.key(2)) * 6
    x = mx.random.normal((2, 9, 300), key=mx.random.key(3))
    np.testing.assert_allclose(np.array(swiglu(gate, x)), np.array(mlx_lm_swiglu(gate, x)), rtol=1e-5, atol=1e-6)


def test_a_loaded_cpu_model_uses_them(tiny_model):
    from mlxq.worker.model import load_model

    loaded = load_model(str(tiny_model))
    import sys

    module = sys.modules[type(loaded.model).__module__]
    assert module.swiglu is swiglu_in_place  # the C kernel where it is loaded, else swiglu
    # Attention stays MLX's fused kernel (mx.fast.scaled_dot_product_attention): mlx-lm's, or
    # slot_attention once a slot batch ran the model (the same kernel, a group of rows at a time).
    from mlxq.worker.slots import slot_attention

    assert module.scaled_dot_product_attention in (mlx_lm_attention, slot_attention)
    assert patch_model(loaded.model) == []  # a second time changes nothing


def test_a_worker_without_a_compiler_says_its_kernels_run_unfused(tmp_path, tiny_model):
    """MLX falls back to unfused CPU kernels silently when g++ is missing: the worker's log says so."""
    import os
    import subprocess
    import sys

    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO);"
        "from mlxq.worker.fastmath import compiler_available; from mlxq.worker.model import load_model;"
        "print('compiler', compiler_available()); load_model(sys.argv[1], force_cpu=True)"
    )
    env = {**os.environ, "PATH": str(tmp_path)}  # a PATH with no g++ on it
    out = subprocess.run([sys.executable, "-c", code, str(tiny_model)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert "compiler False" in out.stdout
    assert "no C++ compiler (g++) on PATH" in out.stderr
    with_compiler = subprocess.run([sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True,
                                   timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert with_compiler.returncode == 0 and "compiler True" in with_compiler.stdout
    assert "no C++ compiler" not in with_compiler.stderr


def _cpu_flags() -> set[str]:
    from mlxq.worker.smallgemm import _cpu

    return _cpu()[1]


@pytest.fixture(params=["native", "avx2"])
def kernels_of_each_build(request, kernels_path, tmp_path_factory):
    """The C kernels as built for this CPU, and the AVX2 build where this CPU has AVX-512."""
    from mlxq.worker.smallgemm import build

    path = kernels_path
    if request.param == "avx2":
        if "avx512f" not in _cpu_flags():
            pytest.skip("no AVX-512 here: the native build is the AVX2 one")
        path = build(tmp_path_factory.mktemp("avx2"), extra_flags=["-mno-avx512f"])
    before = fastmath._kernels, fastmath._looked
    fastmath.load_kernels(path)
    yield path
    fastmath._kernels, fastmath._looked = before


def test_the_c_softmax_is_each_rows_softmax_over_its_visible_prefix(kernels_of_each_build):
    """Rows of lengths around the vector width, prefixes from none to more than the row, both modes."""
    rng = np.random.default_rng(4)
    for n in (1, 7, 8, 16, 17, 40, 333):
        x = (rng.standard_normal((3, 5, n)) * 12).astype(np.float32)
        valid = rng.integers(0, n + 3, (3, 5)).astype(np.int32)
        valid[0, 0], valid[0, 1] = 0, n
        want = np.zeros(x.shape)
        for i, j in np.ndindex(3, 5):
            v = min(valid[i, j], n)
            if v:
                e = np.exp(x[i, j, :v].astype(np.float64) - x[i, j, :v].max())
                want[i, j, :v] = e / e.sum()
        got = np.array(softmax_prefix(mx.array(x), valid))
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
        weights, top, total = softmax_prefix(mx.array(x), valid, stats=True)
        seen = valid > 0
        np.testing.assert_allclose(np.array(weights)[seen] / np.array(total)[seen], want[seen], rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(np.array(top)[seen][:, 0], [x[i, j, :min(valid[i, j], n)].max()
                                                               for i, j in zip(*np.nonzero(seen))])
        assert (np.array(total)[~seen] == 0).all() and np.isneginf(np.array(top)[~seen]).all()


def test_the_c_softmax_of_a_row_does_not_depend_on_its_neighbours(kernels_of_each_build):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 100)).astype(np.float32)
    valid = rng.integers(1, 100, 64).astype(np.int32)
    together = np.array(softmax_prefix(mx.array(x), valid))
    for r in (0, 17, 63):
        alone = np.array(softmax_prefix(mx.array(x[r:r + 1]), valid[r:r + 1]))
        assert (alone[0] == together[r]).all()


def test_the_c_swiglu_matches_mlx_lm_and_writes_over_the_gate(kernels_of_each_build):
    for shape in ((2, 9, 300), (1, 1, 7), (4, 1, 2816)):
        gate = mx.random.normal(shape, key=mx.random.key(2)) * 6
        x = mx.random.normal(shape, key=mx.random.key(3))
        want = np.array(mlx_lm_swiglu(gate, x))
        got = swiglu_in_place(gate, x)
        np.testing.assert_allclose(np.array(got), want, rtol=2e-6, atol=1e-6)
        np.testing.assert_array_equal(np.array(gate), np.array(got))


def test_the_c_sampling_weights_are_each_rows_exp_at_its_temperature_with_block_sums(kernels_of_each_build):
    """Vocabularies around the block and vector widths, a row stride wider than the row, both builds."""
    from mlxq.worker.sampling import BLOCK

    rng = np.random.default_rng(6)
    for n in (1, 15, 128, 300, 1000, 151936):
        wide = (rng.standard_normal((3, n + 5)) * 8).astype(np.float32)
        logits = wide[:, :n]  # rows n + 5 floats apart
        inv_t = np.array([1 / 0.6, 1.0, 1 / 1.7], np.float32)
        weights, sums = fastmath.sample_weights(logits, inv_t, BLOCK)
        x = logits.astype(np.float64) * inv_t[:, None]
        want = np.exp(x - x.max(axis=1, keepdims=True))
        # float32 rounds x * t - max to about 6e-8 of its size: up to 1e-5 of a weight far below the max
        np.testing.assert_allclose(weights, want, rtol=1e-5, atol=1e-30)
        blocks = -(-n // BLOCK)
        own = [[weights[r, b * BLOCK:(b + 1) * BLOCK].sum(dtype=np.float64) for b in range(blocks)] for r in range(3)]
        want_sums = [[want[r, b * BLOCK:(b + 1) * BLOCK].sum() for b in range(blocks)] for r in range(3)]
        assert sums.shape == (3, blocks)
        np.testing.assert_allclose(sums, own, rtol=2e-6)
        np.testing.assert_allclose(sums, want_sums, rtol=1e-5)


def test_sampling_draws_the_same_tokens_with_the_c_weights_as_with_numpys(kernels_of_each_build):
    from mlxq.worker.sampling import RowSampler, sample

    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((16, 5000)) * 4).astype(np.float32)

    def draws():
        samplers = [RowSampler(0.4 + 0.1 * i, seed=i) for i in range(16)]
        return np.stack([sample(logits, samplers) for _ in range(20)])

    with_kernels = draws()
    state = fastmath._kernels, fastmath._looked
    fastmath.load_kernels(None)
    try:
        assert fastmath.sample_weights(logits, np.ones(16, np.float32), 128) is None
        without = draws()
    finally:
        fastmath._kernels, fastmath._looked = state
    assert (with_kernels == without).all()


def test_without_the_library_swiglu_in_place_leaves_the_gate_alone():
    state = fastmath._kernels, fastmath._looked
    fastmath.load_kernels(None)
    try:
        gate = mx.random.normal((3, 50), key=mx.random.key(2))
        before = np.array(gate)
        got = swiglu_in_place(gate, gate)
        np.testing.assert_allclose(np.array(got), np.array(mlx_lm_swiglu(mx.array(before), mx.array(before))),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.array(gate), before)
    finally:
        fastmath._kernels, fastmath._looked = state


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 16), (4, 4, 64), (16, 16, 64), (2, 1, 128)])
def test_the_c_decode_attention_equals_mlx_fused_attention(kernels_of_each_build, heads, kv_heads, dim):
    """Grouped query heads or not, on views of a larger cache, each row as far as its own length."""
    from mlxq.worker.fastmath import decode_attention

    mx.random.seed(9)
    rows, length = 6, 70
    queries = mx.random.normal((rows, heads, 1, dim))
    cache_k = mx.random.normal((rows + 2, kv_heads, 96, dim))
    cache_v = mx.random.normal((rows + 2, kv_heads, 96, dim))
    keys, values = cache_k[:rows, :, :length], cache_v[:rows, :, :length]
    seen = mx.array([0, 5, 15, 16, 17, 69])  # the last position each row sees
    mask = (mx.arange(length)[None, :] <= seen[:, None])[:, None, None, :]
    want = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=dim ** -0.5, mask=mask)
    visible = np.array(seen) + 1
    got = decode_attention(queries, keys, values, dim ** -0.5, visible)
    assert got is not None and got.shape == want.shape
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    # A row's result is the same alone as beside the others.
    alone = decode_attention(queries[3:4], keys[3:4], values[3:4], dim ** -0.5, visible[3:4])
    assert (np.array(alone)[0] == np.array(got)[3]).all()


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 16), (16, 16, 64)])
def test_the_c_decode_attention_joins_a_part_computed_before_as_cascade_attention_does(
        kernels_of_each_build, heads, kv_heads, dim):
    """Rows read from their own start on, seeded with the part before it (max, sum, unnormalised
    output): the result is attention over the whole, as MLX's fused attention computes it."""
    from mlxq.worker.fastmath import decode_attention

    mx.random.seed(10)
    rows, length, scale = 5, 70, dim ** -0.5
    queries = mx.random.normal((rows, heads, 1, dim))
    keys, values = mx.random.normal((rows, kv_heads, length, dim)), mx.random.normal((rows, kv_heads, length, dim))
    visible = np.array([40, 70, 33, 20, 9])
    start = np.array([33, 33, 33, 20, 0])  # row 3 has nothing after its part; row 4 has no part before
    mask = (mx.arange(length)[None, :] < mx.array(visible)[:, None])[:, None, None, :]
    want = np.array(mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask))
    q = np.array(queries, np.float64)[:, :, 0]  # rows x heads x dim
    k = np.repeat(np.array(keys, np.float64), heads // kv_heads, axis=1)  # rows x heads x length x dim
    v = np.repeat(np.array(values, np.float64), heads // kv_heads, axis=1)
    top, total = np.full((rows, heads), -np.inf), np.zeros((rows, heads))
    out = np.zeros((rows, heads, dim))
    for r in range(rows):
        if start[r]:
            scores = np.einsum("hd,hpd->hp", q[r], k[r, :, :start[r]]) * scale
            top[r] = scores.max(axis=-1)
            weights = np.exp(scores - top[r][:, None])
            total[r], out[r] = weights.sum(axis=-1), np.einsum("hp,hpd->hd", weights, v[r, :, :start[r]])
    got = decode_attention(queries, keys, values, scale, visible, start, (top, total, out))
    assert got is not None
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,dim,rows,n", [(8, 2, 16, 5, 70), (14, 2, 64, 7, 130), (16, 16, 64, 2, 3),
                                                        (2, 1, 128, 4, 64)])
def test_the_c_shared_attention_is_each_rows_attention_over_one_rows_prefix(kernels_of_each_build, heads, kv_heads,
                                                                             dim, rows, n):
    """Positions a block or not, queries a tile or not, on a view of a larger cache: each row's
    head gets the max, sum and unnormalised output of its attention over the shared keys, the
    same alone as beside the others."""
    from mlxq.worker.fastmath import shared_attention

    mx.random.seed(11)
    scale = dim ** -0.5
    queries = mx.random.normal((rows, heads, 1, dim)) * 3
    cache_k, cache_v = (mx.random.normal((3, kv_heads, n + 9, dim)) for _ in range(2))
    keys, values = cache_k[1, :, :n], cache_v[1, :, :n]
    got = shared_attention(queries, keys, values, scale)
    assert got is not None
    q = np.array(queries, np.float64)[:, :, 0]
    k = np.repeat(np.array(keys, np.float64), heads // kv_heads, axis=0)  # heads x n x dim
    v = np.repeat(np.array(values, np.float64), heads // kv_heads, axis=0)
    scores = np.einsum("rhd,hpd->rhp", q, k) * scale
    top = scores.max(axis=-1)
    weights = np.exp(scores - top[..., None])
    for have, want in zip(got, (top, weights.sum(axis=-1), np.einsum("rhp,hpd->rhd", weights, v))):
        np.testing.assert_allclose(have, want, rtol=2e-5, atol=2e-5)
    alone = shared_attention(queries[rows - 1:], keys, values, scale)
    for have, one in zip(got, alone):
        assert (have[rows - 1] == one[0]).all()


def test_the_c_decode_attention_declines_what_it_does_not_cover(kernels_of_each_build):
    from mlxq.worker.fastmath import decode_attention

    queries = mx.random.normal((2, 4, 1, 24))  # a head of 24 floats is not whole vectors
    keys = mx.random.normal((2, 4, 10, 24))
    assert decode_attention(queries, keys, keys, 0.2, None) is None
    half = mx.random.normal((2, 4, 1, 64)).astype(mx.float16)
    assert decode_attention(half, half, half, 0.2, None) is None
