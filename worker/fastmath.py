"""A faster ``exp`` for MLX on the CPU, and the SiLU built on it.

MLX's CPU ``exp`` is slow (about 4x NumPy's), and SiLU (``swiglu``, in every
MLP layer) is built on it. :func:`fast_exp` is Cephes' ``expf`` (range
reduction by ln 2, a degree-7 polynomial, the power of two built in the
exponent bits) compiled by ``mx.compile`` into one fused kernel: about 4x
faster than ``mx.exp``, and closer to the true value (largest relative error
8e-8 against 2e-6 over 720,000 values of N(0, 10)).

Attention's softmax on the CPU uses :func:`fast_exp` too, in prompt processing
and decode steps (:func:`mlxq.worker.slots.slot_attention`): MLX's fused
attention has no CPU kernel and falls back to a softmax built on the slow ``exp``.

A compiled function is traced again for every new input shape, so inputs are
flattened and padded up to one of a few sizes (eight per power of two): the
number of traces stays small however many shapes a worker sees.

:func:`patch_model` swaps :func:`swiglu` in for the name of the module that
defines a loaded mlx-lm model (only the CPU path does this).
"""

from __future__ import annotations

import logging
import shutil
import sys
from typing import Any

import mlx.core as mx

__all__ = ["compiler_available", "fast_exp", "swiglu", "patch_model"]

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
    for name, fn in (("swiglu", swiglu),):
        current = getattr(module, name, None)
        if current is not None and current is not fn:
            _original(name)
            setattr(module, name, fn)
            swapped.append(name)
    return swapped
