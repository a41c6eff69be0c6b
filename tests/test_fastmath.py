"""The CPU's faster exp, SiLU and attention agree with MLX's and mlx-lm's own."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu
from mlx_lm.models.base import scaled_dot_product_attention as mlx_lm_attention

from mlxq.worker.fastmath import _bucket, fast_exp, patch_model, swiglu


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
    assert module.swiglu is swiglu
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
