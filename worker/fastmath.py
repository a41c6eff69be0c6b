"""A faster ``exp`` for MLX on the CPU, and the SiLU and softmax built on it.

MLX's CPU ``exp`` is slow (about 4x NumPy's), and SiLU (``swiglu``, in every
MLP layer) is built on it. :func:`fast_exp` is Cephes' ``expf`` (range
reduction by ln 2, a degree-7 polynomial, the power of two built in the
exponent bits) compiled by ``mx.compile``: about 3x faster than ``mx.exp``,
and closer to the true value (largest relative error 8e-8 against 2e-6 over
720,000 values of N(0, 10)). MLX compiles it without vector instructions and
splits it into several passes over memory, though: about 8 ns an element.

Where the worker has mlxq's C library preloaded (:mod:`mlxq.worker.smallgemm`),
its kernels run the same ``expf`` a vector at a time, in one pass (about
0.5 ns an element): :func:`swiglu_in_place` for the MLP, and
:func:`softmax_prefix` for attention's softmax, in prompt processing and
decode steps (:func:`mlxq.worker.slots.slot_attention`), where
:func:`decode_attention` and :func:`shared_attention` (cascade attention's
shared part) take a step's attention whole. They work on an
evaluated array's memory through NumPy, so each costs an evaluation of the
graph up to it. Without the library, attention's softmax uses
:func:`fast_exp`: MLX's fused attention has no CPU kernel and falls back to
a softmax built on the slow ``exp``.

A compiled function is traced again for every new input shape, so inputs are
flattened and padded up to one of a few sizes (eight per power of two): the
number of traces stays small however many shapes a worker sees.

:func:`patch_model` swaps :func:`swiglu_in_place` in for the name of the module
that defines a loaded mlx-lm model (only the CPU path does this).
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import sys
from typing import Any, Optional

import mlx.core as mx
import numpy as np

__all__ = ["compiler_available", "decode_attention", "fast_exp", "shared_attention", "swiglu", "patch_model",
           "kernels", "load_kernels", "sample_weights", "softmax_prefix", "swiglu_in_place"]

log = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_MIN, _MAX = -87.0, 88.0  # exp stays a normal float32 in between


def _exp_kernel(x: mx.array) -> mx.array:
    x = mx.clip(x, _MIN, _MAX)
    k = mx.floor(x * _LOG2E + 0.5)
    r = x - k * _LN2_HI - k * _LN2_LO
    y = _POLY[0]
    for c in _POLY[1:]:
        y = y * r + c
    y = y * r * r + r + 1.0
    two_k = ((k.astype(mx.int32) + 127) << 23).view(mx.float32)
    return y * two_k


def _swiglu_kernel(gate: mx.array, x: mx.array) -> mx.array:
    return gate / (1.0 + _exp_kernel(-gate)) * x


_exp = mx.compile(_exp_kernel)
_swiglu = mx.compile(_swiglu_kernel)


def _bucket(n: int) -> int:
    """``n`` rounded up to one of eight sizes per power of two (at most 1/8 more)."""
    if n <= 1024:
        return 1024
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def _flat(x: mx.array, size: int) -> mx.array:
    flat = x.reshape(-1)
    return mx.pad(flat, (0, size - flat.size)) if size != flat.size else flat


def fast_exp(x: mx.array) -> mx.array:
    """``exp(x)`` for float32 ``x``; below -87 it gives about 1.6e-38 instead of 0."""
    if x.dtype != mx.float32:
        return mx.exp(x)
    size = _bucket(x.size)
    return _exp(_flat(x, size))[: x.size].reshape(x.shape)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x``, as mlx-lm's, with :func:`fast_exp`."""
    if gate.dtype != mx.float32 or x.dtype != mx.float32 or gate.shape != x.shape:
        return _original("swiglu")(gate, x)
    size = _bucket(gate.size)
    return _swiglu(_flat(gate, size), _flat(x, size))[: gate.size].reshape(gate.shape)


# -- the C kernels of mlxq's preloaded library ------------------------------------

_kernels: Optional[ctypes.CDLL] = None
_looked = False


def load_kernels(path: Optional[str]) -> Optional[ctypes.CDLL]:
    """Use the kernels of the library at ``path`` (None: MLX's operations only)."""
    global _kernels, _looked
    _looked = True
    _kernels = None
    if path:
        lib = ctypes.CDLL(path)
        lib.mlxq_softmax.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p]
        lib.mlxq_softmax.restype = None
        lib.mlxq_swiglu.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
        lib.mlxq_swiglu.restype = None
        lib.mlxq_decode_attention.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_long] * 6 + [ctypes.c_void_p] * 2
                                              + [ctypes.c_float] + [ctypes.c_void_p] * 3)
        lib.mlxq_decode_attention.restype = ctypes.c_int
        lib.mlxq_shared_attention.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_long] * 6 + [ctypes.c_float]
                                              + [ctypes.c_void_p] * 3)
        lib.mlxq_shared_attention.restype = ctypes.c_int
        lib.mlxq_sample_weights.argtypes = ([ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 3
                                            + [ctypes.c_long])
        lib.mlxq_sample_weights.restype = None
        _kernels = lib
    return _kernels


def kernels() -> Optional[ctypes.CDLL]:
    """The library of :mod:`mlxq.worker.smallgemm` if this process has it mapped (the worker
    preloads it), whose vector ``exp`` runs a softmax, a SiLU or a decode step's attention in
    one pass; else None."""
    if not _looked:
        from .smallgemm import loaded_path

        load_kernels(loaded_path())
    return _kernels


def _buffer(x: mx.array) -> Optional[np.ndarray]:
    """The memory of evaluated, contiguous float32 ``x`` as a NumPy array (no copy), or None."""
    view = np.array(x, copy=False)
    return view if view.flags.c_contiguous and view.flags.writeable and view.dtype == np.float32 else None


def softmax_prefix(scores: mx.array, valid: np.ndarray, stats: bool = False):
    """Softmax over the last axis of float32 ``scores`` in place, each row over its first
    ``valid`` entries (an int per row of the last axis, broadcast over the rest: attention's
    masks are prefixes), 0 after them; with the C kernels only (:func:`kernels`).

    ``scores`` must be a fresh array no other array shares. With ``stats``, the rows keep
    ``exp(x - max)`` unnormalised, and the row maxima and sums are returned beside them.
    """
    lib = kernels()
    mx.eval(scores)
    data = _buffer(scores)
    if lib is None or data is None:
        raise RuntimeError("softmax_prefix needs mlxq's C kernels and a contiguous float32 array")
    n = scores.shape[-1]
    rows = scores.size // n if n else 0
    counts = np.ascontiguousarray(np.broadcast_to(valid, scores.shape[:-1]), dtype=np.int32).reshape(-1)
    if not stats:
        lib.mlxq_softmax(data.ctypes.data, rows, n, counts.ctypes.data, None, None)
        return scores
    top = np.empty(scores.shape[:-1] + (1,), np.float32)
    total = np.empty_like(top)
    lib.mlxq_softmax(data.ctypes.data, rows, n, counts.ctypes.data, top.ctypes.data, total.ctypes.data)
    return scores, mx.array(top), mx.array(total)


def swiglu_in_place(gate: mx.array, x: mx.array) -> mx.array:
    """:func:`swiglu` written over ``gate`` by the C kernel where it is loaded: for a model's
    MLP, whose ``gate`` is its projection's fresh output, read by nothing else."""
    lib = kernels()
    if lib is None or gate.dtype != mx.float32 or x.dtype != mx.float32 or gate.shape != x.shape:
        return swiglu(gate, x)
    mx.eval(gate, x)
    g, u = _buffer(gate), np.array(x, copy=False)
    if g is None or not u.flags.c_contiguous:
        return swiglu(gate, x)
    lib.mlxq_swiglu(g.ctypes.data, u.ctypes.data, g.ctypes.data, g.size)
    return gate


def decode_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                     visible: Optional[np.ndarray], start: Optional[np.ndarray] = None,
                     seed: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None) -> Optional[mx.array]:
    """A decode step's attention by the C kernel, or None where it does not apply.

    ``queries``: ``rows x heads x 1 x dim``; ``keys``, ``values``: ``rows x kv_heads x n x dim``,
    views of a cache (each position's ``dim`` floats contiguous); ``visible``: how many of
    its first positions each row sees (None: all ``n``). Each row's head reads only those
    keys and values, once, and is summed the same way whatever the other rows are.

    With ``start``, row ``i`` reads its positions from ``start[i]`` on only, and ``seed``
    holds the part before them, as cascade attention splits it: per row and query head the
    max of its scores, the sum of their ``exp(score - max)`` and those weights times the
    values, unnormalised (``rows x heads``, ``rows x heads``, ``rows x heads x dim``,
    float32; a sum of 0 for a row without that part). The result is over both parts.
    """
    lib = kernels()
    rows, heads, one, dim = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    if (lib is None or one != 1 or any(x.dtype != mx.float32 for x in (queries, keys, values))
            or (visible is not None and len(visible) != rows)):
        return None
    mx.eval(queries, keys, values)
    k, v = np.array(keys, copy=False), np.array(values, copy=False)
    if k.strides != v.strides or k.strides[2:] != (4 * dim, 4) or k.strides[0] % 4 or k.strides[1] % 4:
        return None
    q = np.ascontiguousarray(np.array(queries, copy=False))
    counts = np.full(rows, n, np.int32) if visible is None else np.minimum(visible, n).astype(np.int32)
    first = None if start is None else np.minimum(start, counts).astype(np.int32)
    seeds = [None] * 3 if seed is None else [np.ascontiguousarray(x, np.float32) for x in seed]
    if seed is not None and [x.size for x in seeds] != [rows * heads, rows * heads, rows * heads * dim]:
        raise ValueError("a seed holds rows x heads maxima and sums and rows x heads x dim outputs")
    out = np.empty((rows, heads, 1, dim), np.float32)
    if lib.mlxq_decode_attention(q.ctypes.data, k.ctypes.data, v.ctypes.data, out.ctypes.data, rows, heads, kv_heads,
                                 dim, k.strides[0] // 4, k.strides[1] // 4,
                                 None if first is None else first.ctypes.data, counts.ctypes.data, scale,
                                 *(None if x is None else x.ctypes.data for x in seeds)) != 0:
        return None
    return mx.array(out)


def shared_attention(queries: mx.array, keys: mx.array, values: mx.array,
                     scale: float) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cascade attention's shared part by the C kernel, or None where it does not apply.

    ``queries``: ``rows x heads x 1 x dim``; ``keys``, ``values``: one row's ``kv_heads x n x dim``,
    views of a cache (each position's ``dim`` floats contiguous), whose positions all the rows
    see. Per row and query head: the max of its scores, the sum of their ``exp(score - max)``
    and those weights times the values, unnormalised (``rows x heads``, ``rows x heads``,
    ``rows x heads x dim``, float32): the ``seed`` of :func:`decode_attention`. The keys and
    values are read where they are, once for all the rows.
    """
    lib = kernels()
    rows, heads, one, dim = queries.shape
    kv_heads, n = keys.shape[0], keys.shape[1]
    if lib is None or one != 1 or n == 0 or any(x.dtype != mx.float32 for x in (queries, keys, values)):
        return None
    mx.eval(queries, keys, values)
    k, v = np.array(keys, copy=False), np.array(values, copy=False)
    if k.strides != v.strides or k.strides[1:] != (4 * dim, 4) or k.strides[0] % 4:
        return None
    q = np.ascontiguousarray(np.array(queries, copy=False))
    top, total = np.empty((rows, heads), np.float32), np.empty((rows, heads), np.float32)
    out = np.empty((rows, heads, dim), np.float32)
    if lib.mlxq_shared_attention(q.ctypes.data, k.ctypes.data, v.ctypes.data, rows, heads, kv_heads, dim,
                                 k.strides[0] // 4, n, scale, top.ctypes.data, total.ctypes.data,
                                 out.ctypes.data) != 0:
        return None
    return top, total, out


def sample_weights(logits: np.ndarray, inv_t: np.ndarray, block: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """By the C kernel, each row's ``exp(logits * inv_t - max)`` (float32, rows x vocabulary) and
    the float64 sums of its blocks of ``block`` entries (the last may be shorter); None without
    the library. One pass over the logits, on the library's threads."""
    lib = kernels()
    if lib is None or logits.dtype != np.float32 or logits.ndim != 2 or logits.strides[1] != 4 or block % 16:
        return None
    rows, n = logits.shape
    inv_t = np.ascontiguousarray(inv_t, np.float32)
    weights = np.empty((rows, n), np.float32)
    sums = np.empty((rows, -(-n // block)), np.float64)
    lib.mlxq_sample_weights(logits.ctypes.data, rows, n, logits.strides[0] // 4, inv_t.ctypes.data,
                            weights.ctypes.data, sums.ctypes.data, block)
    return weights, sums


_ORIGINALS: dict[str, Any] = {}


def _original(name: str):
    if name not in _ORIGINALS:
        from mlx_lm.models import activations

        _ORIGINALS[name] = getattr(activations, name)
    return _ORIGINALS[name]


def compiler_available() -> bool:
    """Whether MLX can build fused CPU kernels: it compiles them with ``g++`` on Linux.

    Without one, ``mx.compile`` falls back to unfused operations, silently and
    about 2x slower for :func:`fast_exp`.
    """
    return sys.platform == "darwin" or shutil.which("g++") is not None


def warm_up() -> None:
    """Compile the kernels now (a C++ compiler run each, cached on disk by MLX).

    MLX compiles through ``system()``, which ignores SIGINT in the whole
    process while the compiler runs: compiled at load, a Ctrl-C in the first
    seconds of a job is not lost.
    """
    x = mx.zeros((16,))
    mx.eval(fast_exp(x), swiglu(x, x))


def patch_model(model: Any) -> list[str]:
    """Use this module's functions in ``model``'s own module; returns the names swapped."""
    if not compiler_available():
        log.warning("no C++ compiler (g++) on PATH: MLX runs its CPU kernels unfused, about 2x slower "
                    "for exp (install g++, e.g. apt-get install g++)")
    warm_up()
    module = sys.modules.get(type(model).__module__)
    swapped = []
    for name, fn in (("swiglu", swiglu_in_place),):
        current = getattr(module, name, None)
        if current is not None and current not in (swiglu, swiglu_in_place):
            _original(name)
            setattr(module, name, fn)
            swapped.append(name)
    return swapped

