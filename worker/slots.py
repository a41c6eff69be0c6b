"""A batch of sequences in fixed slots of one preallocated KV cache.

mlx-lm's ``BatchGenerator`` keeps its batch left-padded to a common length:
each time a sequence joins or leaves, the whole KV cache of the batch is
copied (``BatchKVCache.extend``/``filter``), which on the CPU costs about as
much as several decode steps and, while it runs, twice the cache's memory.
Here every sequence has a row of a cache that is allocated once per layer
(``rows x kv_heads x length x head_dim``) and grows in blocks. Each row holds
its own tokens from position 0; a decode step writes each row's new key and
value at that row's own position (one scatter, in place) and masks the rest.
Sequences that join are prefilled together straight into their rows: packed
one after another into one sequence, each segment rotated and attended at its
own row's positions (Qwen2 and Llama models; others side by side,
right-padded); one that leaves hands its row to the last row, whose keys and
values move into it. Nothing else is ever copied, and the cache is the only memory
that grows with the batch.

The batch runs mlx-lm models unchanged: a layer's cache is a
:class:`SlotKVCache`, which offers what their attention uses (``offset``,
``update_and_fetch``, ``make_mask``, ``state``). In a decode step, attention
reads each group of :data:`ATTENTION_ROWS` neighbouring rows only up to the
longest of them, not every row up to the longest in the batch
(:func:`slot_attention`, which takes the place of mlx-lm's
``scaled_dot_product_attention`` in the model's module): rows are prefilled
in order of length, so neighbours are of similar length, and decode attention
is bound by reading the cache. Neighbouring rows whose prompts start with the
same tokens (a batch file's shared instructions) read those positions once,
from the first of them, for all of them. Sampling is NumPy's
(:mod:`mlxq.worker.sampling`), for all rows at once. New rows copy the keys and values
of prompt prefixes already computed from the prefix cache (:mod:`mlxq.worker.prefix`)
and prefill only the rest.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .fastmath import decode_attention, fast_exp, kernels, shared_attention, softmax_prefix
from .prefix import PrefixCache
from .sampling import RowSampler, sample
from .smallgemm import decoding

__all__ = ["SlotBatch", "SlotKVCache", "Step", "slot_attention"]

#: Token positions a row's cache grows by.
LENGTH_BLOCK = 32
#: Rows the cache grows by.
ROW_BLOCK = 8
#: Prompt tokens processed per model call (bounds the attention scores' memory).
PREFILL_CHUNK = 512
#: Prompt tokens per prefill batch, prompts of similar length together (0.5B shape:
#: 221 tok/s at 120 tokens, 256 at 960, 192 at 1920).
PREFILL_TOKENS = 1024
#: Tokens of a row's history the penalty processors see (mlx-lm's use the last 20).
PENALTY_CONTEXT = 256
#: Rows whose decode attention reads the cache up to the longest of them (0.5B shape,
#: 64 rows of 42-200 tokens: a step 5% faster than reading all up to the longest).
ATTENTION_ROWS = 8
#: The most bytes of attention scores prompt processing computes at once: below
#: glibc's mmap threshold (32 MiB), so that their buffers are reused, not mapped
#: and faulted in afresh for every layer.
SCORES_BYTES = 16 * 2**20
#: Prompt tokens neighbouring rows must have in common for decode attention to read
#: their keys and values once for all of them.
SHARED_MIN = 64


class SlotKVCache:
    """One layer's keys and values: a row per sequence, each at its own length.

    :class:`SlotBatch` sets ``offset`` (each active row's length, an array),
    ``_fetch`` (the longest row after this step) and ``groups`` (row ranges
    and the longest of each, for :func:`slot_attention`) before a decode step.
    """

    def __init__(self) -> None:
        self.keys: Optional[mx.array] = None  # rows x heads x length x dim
        self.values: Optional[mx.array] = None
        self.offset: Optional[mx.array] = None
        self._fetch = 0
        #: In a decode step: how many positions each active row sees (its length + 1).
        self.visible: Optional[np.ndarray] = None
        self.groups: list[tuple[int, int, int]] = []  # (first row, end row, positions to read)
        #: Runs of neighbouring rows whose first ``shared`` positions hold the same
        #: prompt tokens: (first row, end row, shared); and each group's run (or None).
        self.runs: list[tuple[int, int, int]] = []
        self.group_runs: list[Optional[int]] = []
        #: While prefilling: rows ``lo:hi`` take positions from ``start`` on.
        self.span: Optional[tuple[int, int, int]] = None
        #: While prefilling packed prompts (:class:`_Packed`), their segments; and the
        #: layer's own RoPE, which the model's then leaves to the cache and attention.
        self.packed: Optional[_Packed] = None
        self.rope: Optional[Callable] = None

    @property
    def rows(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def state(self):
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Write one new position per active row at its own offset; return the rows' views.

        While prefilling (``span`` is set), write the chunk at the same
        positions of each row of the span instead (one slice, in place).
        """
        if self.packed is not None:
            for row, a, b, start in self.packed.segments:
                end = start + b - a
                self.keys[row, :, start:end] = self.rope(keys[:, :, a:b], offset=start)[0]
                self.values[row, :, start:end] = values[0, :, a:b]
            return keys, values  # packed attention reads each segment's row (slot_attention)
        if self.span is not None:
            lo, hi, start = self.span
            end = start + keys.shape[2]
            self.keys[lo:hi, :, start:end] = keys
            self.values[lo:hi, :, start:end] = values
            return self.keys[lo:hi, :, :end], self.values[lo:hi, :, :end]
        n = keys.shape[0]
        if keys.shape[2] != 1:
            raise ValueError("a slot cache takes one token per row per step")
        if self._write_in_place(keys, values):
            return self.keys[:n, :, : self._fetch], self.values[:n, :, : self._fetch]
        rows = self.keys.shape[0]
        positions = self.offset
        if n < rows:
            # The scatter covers every row (so that it runs in place); idle rows
            # write zeros at their last position, which no row reads unmasked
            # before writing it itself.
            pad = rows - n
            keys = mx.concatenate([keys, mx.zeros((pad, *keys.shape[1:]), keys.dtype)])
            values = mx.concatenate([values, mx.zeros((pad, *values.shape[1:]), values.dtype)])
            positions = mx.concatenate([positions, mx.full((pad,), self.length - 1, positions.dtype)])
        index = positions[:, None, None, None]
        self.keys = mx.put_along_axis(
            self.keys, mx.broadcast_to(index, keys.shape), keys, axis=2
        )
        self.values = mx.put_along_axis(
            self.values, mx.broadcast_to(index, values.shape), values, axis=2
        )
        return self.keys[:n, :, : self._fetch], self.values[:n, :, : self._fetch]

    def _write_in_place(self, keys: mx.array, values: mx.array) -> bool:
        """Where the C kernels read the cache (float32 on the CPU), write each row's new
        position straight into its memory and return True.

        MLX's scatter (``put_along_axis``) took about 0.3 ms a call for a decode
        step's 32 rows, two a layer; this is a NumPy assignment of the same
        values after evaluating them (which the step's attention does next anyway).
        """
        if (self.visible is None or kernels() is None or mx.default_device() != mx.cpu
                or not all(x.dtype == mx.float32 for x in (keys, values, self.keys, self.values))):
            return False
        mx.eval(keys, values)
        k, v = np.array(self.keys, copy=False), np.array(self.values, copy=False)
        if not (k.flags.writeable and v.flags.writeable):
            return False
        n = keys.shape[0]
        rows, positions = np.arange(n), self.visible[:n] - 1
        k[rows, :, positions] = np.array(keys, copy=False)[:, :, 0]
        v[rows, :, positions] = np.array(values, copy=False)[:, :, 0]
        return True

    def make_mask(self, N: int, return_array: bool = False, **kwargs) -> mx.array:
        """Row ``i`` sees positions ``0..offset[i]`` (its history and the new token).

        While prefilling, a causal mask over the span's positions (packed: none here;
        attention builds each segment's own).
        """
        if self.packed is not None:
            return None
        if self.span is not None:
            from mlx_lm.models.base import create_causal_mask

            return create_causal_mask(N, offset=self.span[2])
        visible = mx.arange(self._fetch)[None, :] <= self.offset[:, None]
        return visible[:, None, None, :]

    def resize(self, rows: int, length: int, used_rows: int, used_length: int,
               like: Optional[tuple[int, int, mx.Dtype]]) -> None:
        """Reallocate to ``rows`` x ``length``, keeping the first ``used_rows`` x ``used_length``;
        ``like`` is the heads, head size and dtype of the keys and values."""
        if rows == 0:
            self.keys = self.values = None
            return
        heads, dim, dtype = like
        keep = self.keys is not None and used_rows and used_length
        # The keys, then the values, of one layer at a time: each old array is
        # freed before the next new one is made, so a growth's peak is the cache
        # plus half a layer, not plus a layer.
        for name in ("keys", "values"):
            new = mx.zeros((rows, heads, length, dim), dtype)
            if keep:
                new[:used_rows, :, :used_length] = getattr(self, name)[:used_rows, :, :used_length]
            setattr(self, name, new)
            mx.eval(new)


def slot_attention(queries, keys, values, cache, scale: float, mask: Optional[mx.array], sinks=None) -> mx.array:
    """mlx-lm's ``scaled_dot_product_attention``; for a slot cache's decode step, attention
    that reads each row's cache only as far as it needs: in one call of the C kernel
    where it is loaded, else by groups of rows.

    A run of rows whose prompts start with the same tokens reads those
    positions' keys and values once, from its first row, for all its rows (as
    one matmul per head: ``rows x shared``); each row (or group) then reads
    only its own positions after them, and the two parts are joined by their
    softmax statistics (as cascade attention does). On the CPU in float32,
    prompt chunks and decode steps alike take their softmax with
    :func:`fast_exp` or the C kernels.
    """
    cpu_float32 = queries.dtype == mx.float32 and mx.default_device() == mx.cpu
    if isinstance(cache, SlotKVCache) and cache.packed is not None:
        return _packed_attention(queries, cache, scale)
    if (isinstance(cache, SlotKVCache) and cache.span is not None and sinks is None
            and isinstance(mask, mx.array) and cpu_float32):
        return _prompt_attention(queries, keys, values, scale, mask)
    if not isinstance(cache, SlotKVCache) or cache.span is not None or sinks is not None or not cache.groups:
        from mlx_lm.models.base import scaled_dot_product_attention

        return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    if cpu_float32 and kernels() is not None:
        out = _fused_decode_attention(queries, keys, values, cache, scale)
        if out is not None:
            return out
    shared = [_shared_part(queries[a:b], cache.keys[a, :, :n], cache.values[a, :, :n], scale)
              for a, b, n in cache.runs]
    out = []
    for (lo, hi, fetch), run in zip(cache.groups, cache.group_runs):
        if run is None:
            keys, values = cache.keys[lo:hi, :, :fetch], cache.values[lo:hi, :, :fetch]
            out.append(_decode_attention(queries[lo:hi], keys, values, scale, mask[lo:hi, ..., :fetch],
                                         cache.visible[lo:hi]) if cpu_float32 else
                       mx.fast.scaled_dot_product_attention(queries[lo:hi], keys, values, scale=scale,
                                                            mask=mask[lo:hi, ..., :fetch]))
            continue
        a, _, n = cache.runs[run]
        part = [x[lo - a:hi - a] for x in shared[run]]
        out.append(_own_part(queries[lo:hi], cache.keys[lo:hi, :, n:fetch], cache.values[lo:hi, :, n:fetch], scale,
                             mask[lo:hi, ..., n:fetch], cache.visible[lo:hi] - n, *part))
    return out[0] if len(out) == 1 else mx.concatenate(out)


def _fused_decode_attention(queries: mx.array, keys: mx.array, values: mx.array, cache: SlotKVCache,
                            scale: float) -> Optional[mx.array]:
    """A decode step's attention of every row in one call of the C kernel (None where it
    declines): each row reads its keys and values only as far as it goes, and a row in a
    run of rows that share a prefix only from the end of that prefix on, joined with the
    run's shared part (computed once for the run, by the C kernel from the first row's cache
    memory, else by :func:`_shared_part`)."""
    if not cache.runs:
        return decode_attention(queries, keys, values, scale, cache.visible)
    rows, heads, _, dim = queries.shape
    start = np.zeros(rows, np.int32)
    top = np.full((rows, heads), -np.inf, np.float32)
    total = np.zeros((rows, heads), np.float32)
    out = np.zeros((rows, heads, dim), np.float32)
    for a, b, n in cache.runs:
        parts = shared_attention(queries[a:b], cache.keys[a, :, :n], cache.values[a, :, :n], scale)
        if parts is None:
            parts = _shared_part(queries[a:b], cache.keys[a, :, :n], cache.values[a, :, :n], scale)
            mx.eval(parts)
        start[a:b] = n
        for whole, part in zip((top, total, out), parts):
            whole[a:b] = np.array(part, copy=False).reshape(whole[a:b].shape)
    return decode_attention(queries, keys, values, scale, cache.visible, start, (top, total, out))


def _packed_attention(queries: mx.array, cache: SlotKVCache, scale: float) -> mx.array:
    """Attention of packed prompt segments (``1 x heads x tokens x dim`` queries, not yet
    rotated): each segment's queries, rotated at their own positions, over its own row's
    keys and values up to its end, causally."""
    from mlx_lm.models.base import create_causal_mask

    cpu_float32 = queries.dtype == mx.float32 and mx.default_device() == mx.cpu
    out = []
    for row, a, b, start in cache.packed.segments:
        end = start + b - a
        q = cache.rope(queries[:, :, a:b], offset=start)
        keys, values = cache.keys[row:row + 1, :, :end], cache.values[row:row + 1, :, :end]
        mask = create_causal_mask(b - a, offset=start)
        out.append(_prompt_attention(q, keys, values, scale, mask) if cpu_float32 else
                   mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask))
    return out[0] if len(out) == 1 else mx.concatenate(out, axis=2)


def _prompt_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array) -> mx.array:
    """Causal attention of a prompt chunk on the CPU, a few rows' heads at a time.

    MLX's fused attention has no CPU kernel: it falls back to a softmax whose
    ``exp`` takes most of the time, over scores that for a chunk after a long
    prefix are larger than glibc reuses (each of them then page-faulted in
    afresh). Here the softmax uses :func:`fast_exp`, over at most
    :data:`SCORES_BYTES` of scores at a time: each slice is computed before
    the next is built (left lazy, MLX runs the slices' matmuls side by side,
    and all their scores live at once).
    """
    rows, heads, n, dim = queries.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    per = heads // kv_heads
    q = (queries * scale).reshape(rows * kv_heads, per * n, dim)
    keys = keys.reshape(rows * kv_heads, length, dim)
    values = values.reshape(rows * kv_heads, length, dim)
    step = max(1, SCORES_BYTES // (per * n * length * 4))
    # With the C kernels, each slice's softmax is one pass over its scores in place,
    # each query over the positions the (causal) mask shows it.
    valid = np.tile(np.array(mask.astype(mx.int32).sum(axis=-1)), per) if kernels() and mask.ndim == 2 else None
    out = []
    for lo in range(0, rows * kv_heads, step):
        hi = min(lo + step, rows * kv_heads)
        scores = q[lo:hi] @ keys[lo:hi].swapaxes(-1, -2)
        if valid is not None:
            out.append(softmax_prefix(scores, valid) @ values[lo:hi])
        else:
            scores = mx.where(mask, scores.reshape(hi - lo, per, n, length), -mx.inf)
            weights = fast_exp(scores - scores.max(axis=-1, keepdims=True)).reshape(hi - lo, per * n, length)
            out.append((weights @ values[lo:hi]) / weights.sum(axis=-1, keepdims=True))
        if hi < rows * kv_heads:
            # MLX would otherwise compute every slice's scores side by side.
            mx.eval(out[-1])
    out = out[0] if len(out) == 1 else mx.concatenate(out)
    return out.reshape(rows, heads, n, dim)


def _decode_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array,
                      visible: np.ndarray) -> mx.array:
    """One decode step's attention of a group of rows (``rows x heads x 1 x dim`` queries,
    row ``i`` seeing its first ``visible[i]`` positions, as ``mask`` shows them) on the CPU:
    MLX's fused attention falls back there to a softmax on its slow ``exp``; this one is
    the C kernel where it is loaded, else uses :func:`fast_exp`."""
    out = decode_attention(queries, keys, values, scale, visible)
    if out is not None:
        return out
    scores = _decode_scores(queries, keys, scale, mask)
    weights = fast_exp(scores - scores.max(axis=-1, keepdims=True))
    out = (weights @ values) / weights.sum(axis=-1, keepdims=True)
    return out.reshape(queries.shape)


def _decode_scores(queries: mx.array, keys: mx.array, scale: float, mask: Optional[mx.array]) -> mx.array:
    """A decode step's attention scores, ``rows x kv_heads x heads per kv head x n``, in
    float32, of ``rows x heads x 1 x dim`` queries over ``rows x kv_heads x n x dim`` keys;
    -inf where ``mask`` hides a position (None: as they are)."""
    rows, heads, _, dim = queries.shape
    kv_heads = keys.shape[1]
    q = (queries * scale).reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = (q @ keys.swapaxes(-1, -2)).astype(mx.float32)
    return scores if mask is None else mx.where(mask, scores, -mx.inf)


def _shared_part(queries: mx.array, keys: mx.array, values: mx.array, scale: float):
    """Attention of ``rows x heads x 1 x dim`` queries over one row's ``kv_heads x n x dim``
    keys and values: the running max, the softmax's sum and the unnormalised output,
    each ``rows x kv_heads x heads per kv head x (1 or dim)``, in float32."""
    rows, heads, _, dim = queries.shape
    kv_heads = keys.shape[0]
    per = heads // kv_heads
    q = (queries * scale).reshape(rows, kv_heads, per, dim).transpose(1, 2, 0, 3).reshape(kv_heads, per * rows, dim)
    scores = (q @ keys.swapaxes(-1, -2)).astype(mx.float32)
    if kernels() is not None and values.dtype == mx.float32:
        weights, top, total = softmax_prefix(scores, np.array(scores.shape[-1], np.int32), stats=True)
    else:
        top = scores.max(axis=-1, keepdims=True)
        weights = fast_exp(scores - top)  # rows x shared scores: MLX's exp would take most of the time
        total = weights.sum(axis=-1, keepdims=True)
    out = (weights.astype(values.dtype) @ values).astype(mx.float32)

    def by_row(x: mx.array) -> mx.array:
        return x.reshape(kv_heads, per, rows, -1).transpose(2, 0, 1, 3)

    return by_row(top), by_row(total), by_row(out)


def _own_part(queries, keys, values, scale: float, mask, visible, top, total, out) -> mx.array:
    """Attention of each row over its own positions after the shared ones (``keys``,
    ``values``: ``rows x kv_heads x n x dim``; row ``i`` sees the first ``visible[i]`` of
    them, as ``mask`` shows), joined with the shared part's statistics."""
    if kernels() is not None and values.dtype == mx.float32 and queries.dtype == mx.float32:
        scores = _decode_scores(queries, keys, scale, None)
        weights, own_top, own_total = softmax_prefix(scores, visible[:, None, None], stats=True)
        top_all = mx.maximum(top, own_top)
        shared, own = mx.exp(top - top_all), mx.exp(own_top - top_all)  # one per row's head
        total = total * shared + own_total * own
        out = out * shared + (weights @ values) * own
        return (out / total).reshape(queries.shape)
    scores = _decode_scores(queries, keys, scale, mask)
    own_top = scores.max(axis=-1, keepdims=True)
    top_all = mx.maximum(top, own_top)
    weights = fast_exp(scores - top_all)
    rescale = mx.exp(top - top_all)
    total = total * rescale + weights.sum(axis=-1, keepdims=True)
    out = out * rescale + (weights.astype(values.dtype) @ values).astype(mx.float32)
    return (out / total).reshape(queries.shape).astype(queries.dtype)


@dataclass(frozen=True)
class _Packed:
    """The prompts of one prefill call, packed into one sequence: ``segments`` holds, in
    input order, (row, first input index, end input index, first position)."""

    segments: tuple[tuple[int, int, int, int], ...]


class _LeaveRoPEToTheCache(nn.Module):
    """A layer's RoPE that does nothing to packed prompts (:class:`_Packed` offsets): their
    positions differ from segment to segment, so the cache rotates the keys and
    :func:`_packed_attention` the queries, each segment at its own positions."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return x if isinstance(offset, _Packed) else self.rope(x, offset=offset)


#: Modules of mlx-lm models whose attention rotates its queries and keys by
#: ``self.rope(x, offset=cache.offset)`` and uses the offset for nothing else: their
#: prompts are prefilled packed.
PACKED_MODULES = ("mlx_lm.models.qwen2", "mlx_lm.models.llama")


def _packable_ropes(model) -> Optional[List[Callable]]:
    """Each layer's own RoPE where prompts can be prefilled packed, else None."""
    if type(model).__module__ not in PACKED_MODULES:
        return None
    ropes = []
    for layer in model.layers:
        rope = getattr(getattr(layer, "self_attn", None), "rope", None)
        if isinstance(rope, _LeaveRoPEToTheCache):
            rope = rope.rope
        if type(rope) is not nn.RoPE:
            return None
        ropes.append(rope)
    return ropes


def _use_slot_attention(model) -> None:
    """Put :func:`slot_attention` in place of mlx-lm's in the module of ``model``'s class."""
    from mlx_lm.models.base import scaled_dot_product_attention

    module = sys.modules.get(type(model).__module__)
    if getattr(module, "scaled_dot_product_attention", None) is scaled_dot_product_attention:
        module.scaled_dot_product_attention = slot_attention


@dataclass(frozen=True)
class Step:
    """The token one sequence got in one decode step."""

    uid: int
    token: int


@dataclass(eq=False)
class _Row:
    uid: int
    tokens: List[int]  # the prompt, then every generated token
    length: int  # positions held in the cache (the last token is not yet there)
    sampler: RowSampler
    processors: Sequence[Callable] = field(default_factory=tuple)
    limit: int = 0  # the most positions the row may need (0: unknown)
    prefilled: int = 0  # prompt positions whose keys and values prefill computed or copied
    cached: int = 0  # prompt tokens whose keys and values came from the prefix cache


class SlotBatch:
    """Continuous batching over one model: insert, step, remove, in any order.

    ``insert`` only queues; :meth:`next` prefills queued sequences while rows
    are free (prompt processing before decoding keeps the batch full), and
    otherwise runs one decode step for every row. A sequence never ends by
    itself: its owner removes it.
    """

    def __init__(
        self,
        model,
        width: int = 32,
        prefill_tokens: int = PREFILL_TOKENS,
        prefix_cache: Optional[PrefixCache] = None,
        namespace: Hashable = None,
    ):
        if hasattr(model, "make_cache"):
            from mlx_lm.models.cache import KVCache

            if not all(type(c) is KVCache for c in model.make_cache()):
                raise ValueError("this model's layers need special caches; only plain KV caches are batched")
        self.model = model
        _use_slot_attention(model)
        self.width = width
        self.prefill_tokens = prefill_tokens
        #: Keys and values of prompts prefilled before, shared with other batches
        #: under their own ``namespace`` (the LoRA adapter: it changes them).
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.max_bytes else None
        self.namespace = namespace
        self.layers = len(model.layers)
        self.caches = [SlotKVCache() for _ in range(self.layers)]
        ropes = _packable_ropes(model)
        if ropes is not None:
            for layer, rope, c in zip(model.layers, ropes, self.caches):
                if not isinstance(layer.self_attn.rope, _LeaveRoPEToTheCache):
                    layer.self_attn.rope = _LeaveRoPEToTheCache(rope)
                c.rope = rope
        #: Whether prompts are prefilled packed, one after another in one sequence,
        #: rather than side by side, right-padded to the longest.
        self.packed = ropes is not None
        self.rows: List[_Row] = []
        self.waiting: List[_Row] = []
        self._next_uid = 0
        self._runs_for: tuple = ()
        self._runs: list[tuple[int, int, int]] = []
        #: Seconds spent growing and shrinking the KV cache (fresh memory's page faults, copies).
        self.resize_seconds = 0.0

    # -- bookkeeping -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def insert(
        self,
        prompts: Sequence[Sequence[int]],
        samplers: Sequence[RowSampler],
        processors: Optional[Sequence[Sequence[Callable]]] = None,
        max_tokens: Optional[Sequence[int]] = None,
    ) -> List[int]:
        """Queue sequences; ``max_tokens`` (the most each will generate) lets the cache grow less often."""
        processors = processors or [()] * len(prompts)
        max_tokens = max_tokens or [0] * len(prompts)
        uids = []
        for prompt, sampler, procs, most in zip(prompts, samplers, processors, max_tokens):
            if not prompt:
                raise ValueError("empty prompt")
            uid, self._next_uid = self._next_uid, self._next_uid + 1
            limit = len(prompt) + most if most else 0
            self.waiting.append(_Row(uid, list(prompt), 0, sampler, tuple(procs), limit))
            uids.append(uid)
        return uids

    def cached_tokens(self, uid: int) -> int:
        """Prompt tokens of sequence ``uid`` served by the prefix cache (0 before it is prefilled)."""
        return next((r.cached for r in self.rows if r.uid == uid), 0)

    def close(self) -> None:
        """Drop every sequence and free the cache."""
        self.rows, self.waiting = [], []
        self._resize(0, 0, [])

    def remove(self, uids: Sequence[int]) -> None:
        """Drop sequences (queued or running); their rows go to the last rows."""
        gone = set(uids)
        self.waiting = [r for r in self.waiting if r.uid not in gone]
        for i in reversed(range(len(self.rows))):
            if self.rows[i].uid in gone:
                self._free_row(i)
        self._shrink()

    def _free_row(self, i: int) -> None:
        last = len(self.rows) - 1
        if i != last:
            moved = self.rows[last]
            n = moved.length
            if n:
                # Materialise the last row first: the write must not read the
                # buffer it writes to (that would copy the whole cache). A layer
                # at a time: all layers' at once of a long row are a transient of
                # hundreds of MB (0.5B shape, 1,248 positions: 245 MB).
                for c in self.caches:
                    k, v = c.keys[last, :, :n] + 0, c.values[last, :, :n] + 0
                    mx.eval(k, v)
                    c.keys[i, :, :n] = k
                    c.values[i, :, :n] = v
                    mx.eval(c.state)
            self.rows[i] = moved
        self.rows.pop()

    # -- capacity ----------------------------------------------------------------------

    def _capacity(self) -> tuple[int, int]:
        c = self.caches[0]
        return c.rows, c.length

    def _ensure(self, rows: int, length: int, limits: Sequence[int] = ()) -> None:
        """Room for ``rows`` x ``length``; growth copies the cache, so it is rare.

        Fresh memory is slow to touch (page faults: about 1 GB/s on small VMs), so the
        length grows at once to the longest any row may need (its prompt and
        ``max_tokens``; ``limits`` are those of rows about to join) when that
        is at most four times what is needed now, else it doubles.
        """
        have_rows, have_length = self._capacity()
        if rows <= have_rows and length <= have_length:
            return
        if rows > have_rows:
            rows = min(max(self.width, rows), max(rows, 2 * have_rows))
        if length > have_length:
            bound = max([length, *limits] + [r.limit for r in self.rows])
            length = bound if bound <= 4 * length else max(length, 2 * have_length)
        like = self._probe_like() if self.caches[0].keys is None else []
        self._resize(
            max(have_rows, _round_up(rows, ROW_BLOCK)), max(have_length, _round_up(length, LENGTH_BLOCK)), like
        )

    def _shrink(self) -> None:
        """Give memory back once the rows use a quarter of it (or none), unless sequences
        wait to take rows: fresh memory is slow to touch, so it is kept for them."""
        if self.waiting:
            return
        have_rows, have_length = self._capacity()
        if not self.rows:
            if have_rows:
                self._resize(0, 0, [])
            return
        need_rows = _round_up(len(self.rows), ROW_BLOCK)
        need_length = _round_up(max(max(r.length + 1, r.limit) for r in self.rows), LENGTH_BLOCK)
        if need_rows * 4 <= have_rows or need_length * 4 <= have_length:
            self._resize(min(2 * need_rows, have_rows), min(need_length, have_length), [])

    def _resize(self, rows: int, length: int, like: List[mx.array]) -> None:
        started = time.perf_counter()
        try:
            self._reallocate(rows, length, like)
        finally:
            self.resize_seconds += time.perf_counter() - started

    def _reallocate(self, rows: int, length: int, like: List[mx.array]) -> None:
        used_rows = len(self.rows)
        used_length = max((r.length for r in self.rows), default=0)
        for layer, c in enumerate(self.caches):
            if rows == 0:
                c.resize(0, 0, 0, 0, None)
                continue
            ref = c.keys if c.keys is not None else like[layer]
            shape = (ref.shape[1], ref.shape[3], ref.dtype)
            del ref  # a reference to the old keys would keep them until the values are copied too
            c.resize(rows, length, used_rows, min(used_length, length), shape)

    # -- prefill -----------------------------------------------------------------------

    def _prefill(self) -> bool:
        """Prefill one batch of queued sequences straight into free rows; False if none could start.

        A sequence whose prompt starts with blocks in the prefix cache gets
        their keys and values copied into its row and prefills only the rest.
        The batch is taken from the first sequences that fit in the free rows:
        those with the same cached length, least left to prefill first and up
        to ``prefill_tokens`` tokens. Each row's tokens go to positions
        ``0..n-1`` of its own row, as decoding wants them. Packed (``packed``),
        the prompts are one sequence of their tokens alone, so the model's
        matmuls take no padding: each layer's cache rotates each segment's keys
        at its own positions and :func:`_packed_attention` its queries.
        Otherwise they are right-padded to the longest, side by side (the
        padding is overwritten by decoding before any query can see it), and
        ``prefill_tokens`` counts the padding too. Chunks end at multiples of
        ``PREFILL_CHUNK`` whatever the cached length, so a position's keys and
        values are computed the same way with the prefix cache and without it.
        """
        free = self.width - len(self.rows)
        if free <= 0 or not self.waiting:
            return False
        candidates = self.waiting[:free]
        cache = self.prefix_cache
        hits = {id(r): cache.match(self.namespace, r.tokens, len(r.tokens) - 1) if cache is not None else []
                for r in candidates}
        block = cache.block if cache is not None else 0

        def todo(row: _Row) -> int:
            return len(row.tokens) - 1 - len(hits[id(row)]) * block

        def next_block(row: _Row) -> Optional[tuple]:
            """The first block this row would compute, if whole: rows that share it wait a batch."""
            start = len(hits[id(row)]) * block
            if cache is None or len(row.tokens) - 1 < start + block:
                return None
            return tuple(row.tokens[start:start + block])

        candidates.sort(key=todo)
        group = [candidates[0]]
        reused = hits[id(group[0])]
        computing = {next_block(group[0])} - {None}
        for row in candidates[1:]:
            if len(hits[id(row)]) != len(reused):
                continue
            first = next_block(row)
            if first is not None and first in computing:
                continue  # the next batch finds it in the cache
            # Packed, a batch holds its prompts' tokens; padded, each as many as the longest.
            size = sum(map(todo, group)) + todo(row) if self.packed else (len(group) + 1) * todo(row)
            if size > self.prefill_tokens:
                break
            group.append(row)
            computing.add(first)
        # Rows that reuse the same blocks side by side: one copy of them serves each run.
        if reused:
            group.sort(key=lambda r: hits[id(r)][-1].id)
        chosen = {id(r) for r in group}
        self.waiting = [r for r in self.waiting if id(r) not in chosen]
        lengths = [len(r.tokens) - 1 for r in group]  # the last token is the first decode input
        longest = max(lengths)
        first = len(self.rows)
        # Room for the rows that will join next too: growing copies the cache.
        upcoming = group + self.waiting[: max(0, free - len(group))]
        self._ensure(first + len(upcoming), max([longest + 1] + [r.length + 1 for r in self.rows]),
                     [r.limit for r in upcoming])
        self.rows.extend(group)
        lo, hi = first, first + len(group)
        start = len(reused) * block
        if reused:
            # Each row gets its own blocks (rows with as many cached blocks may have other ones).
            runs: list[tuple[int, int]] = []
            for i, row in enumerate(group):
                if runs and hits[id(row)][-1] is hits[id(group[runs[-1][0]])][-1]:
                    runs[-1] = (runs[-1][0], i + 1)
                else:
                    runs.append((i, i + 1))
            for a, b in runs:
                for j, kv in enumerate(cache.use(hits[id(group[a])], rows=b - a)):
                    for layer, c in enumerate(self.caches):
                        c.keys[lo + a:lo + b, :, j * block:(j + 1) * block] = kv[0, layer]
                        c.values[lo + a:lo + b, :, j * block:(j + 1) * block] = kv[1, layer]
                mx.eval([c.state for c in self.caches])
        try:
            while start < longest:
                end = min(longest, (start // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
                pieces = [(lo + i, row.tokens[start:min(end, n)]) for i, (row, n) in enumerate(zip(group, lengths))]
                if self.packed:
                    inputs, segments = [], []
                    for i, piece in pieces:
                        if piece:
                            segments.append((i, len(inputs), len(inputs) + len(piece), start))
                            inputs.extend(piece)
                    span, offset = None, _Packed(tuple(segments))
                    inputs = [inputs]
                else:
                    span, offset = (lo, hi, start), start
                    inputs = [piece + [0] * (end - start - len(piece)) for _, piece in pieces]
                for c in self.caches:
                    c.span, c.offset = span, offset
                    c.packed = offset if self.packed else None
                self.model(mx.array(inputs), cache=self.caches)
                mx.eval([c.state for c in self.caches])
                start = end
        finally:
            for c in self.caches:
                c.span = c.packed = None
        for i, (row, n) in enumerate(zip(group, lengths)):
            row.length = row.prefilled = n
            row.cached = len(reused) * block
            if cache is not None:
                cache.store(self.namespace, row.tokens, n, self.caches, lo + i)
        return True

    def _probe_like(self) -> List[mx.array]:
        """The keys of every layer for one token: their heads, dimension and dtype."""
        from mlx_lm.models.cache import KVCache

        cache = [KVCache() for _ in range(self.layers)]
        self.model(mx.array([[0]]), cache=cache)
        mx.eval([c.state for c in cache])
        return [c.keys for c in cache]

    # -- decoding ----------------------------------------------------------------------

    def next(self) -> List[Step]:
        """One prefill batch while rows are free and sequences wait, else one decode step.

        Prompt processing goes first, so the batch is as full as it can be when
        it decodes; each call does one bounded piece of work, so the caller can
        look at cancellations in between. A prefill call returns no steps.
        """
        if self._prefill() or not self.rows:
            return []
        rows = self.rows
        with decoding():  # the step's matmuls go to the few-row kernel, if it is loaded
            logits = self.forward()
            if any(r.processors for r in rows):
                logits = self._process(logits, rows)
            samplers = [r.sampler for r in rows]
            if all(s.greedy for s in samplers):
                # Only the tokens leave MLX, not rows x vocabulary logits.
                tokens = np.array(mx.argmax(logits, axis=-1))
            else:
                logits = logits.astype(mx.float32)
                mx.eval(logits)
                tokens = sample(np.array(logits, copy=False), samplers)
        steps = []
        for row, token in zip(rows, tokens.tolist()):
            row.length += 1
            row.tokens.append(token)
            steps.append(Step(row.uid, token))
        return steps

    def forward(self) -> mx.array:
        """The logits of a decode step of every row (``rows x vocabulary``, not evaluated)."""
        rows = self.rows
        lengths = [r.length for r in rows]
        longest = max(lengths) + 1
        self._ensure(len(rows), longest)
        offset = mx.array(lengths, dtype=mx.int32)
        runs = self._shared_runs()
        groups, group_runs = [], []
        for a, b, run in _segments(len(rows), runs):
            for lo in range(a, b, ATTENTION_ROWS):
                hi = min(lo + ATTENTION_ROWS, b)
                groups.append((lo, hi, max(lengths[lo:hi]) + 1))
                group_runs.append(run)
        visible = np.array(lengths, np.int32) + 1
        for c in self.caches:
            c.offset, c._fetch, c.groups, c.runs, c.group_runs = offset, longest, groups, runs, group_runs
            c.visible = visible
        inputs = mx.array([[r.tokens[-1]] for r in rows])
        return self.model(inputs, cache=self.caches)[:, -1, :]

    def _shared_runs(self) -> list[tuple[int, int, int]]:
        """Runs of neighbouring rows whose prompts start with at least :data:`SHARED_MIN`
        of the same tokens: (first row, end row, tokens all of them share).

        Their keys and values at those positions are the same (computed from
        the same tokens, or copied from the same prefix cache blocks), so
        decode attention reads them from the run's first row for all of them.
        """
        key = tuple(r.uid for r in self.rows)
        if key == self._runs_for:
            return self._runs
        runs, i, rows = [], 0, self.rows
        while i < len(rows):
            first, shared, j = rows[i], rows[i].prefilled, i + 1
            while j < len(rows):
                common = _common_prefix(first.tokens, rows[j].tokens, min(shared, rows[j].prefilled))
                if common < SHARED_MIN:
                    break
                shared, j = common, j + 1
            if j - i > 1:
                runs.append((i, j, shared))
            i = j
        self._runs_for, self._runs = key, runs
        return runs

    @staticmethod
    def _process(logits: mx.array, rows: List[_Row]) -> mx.array:
        out = []
        for i, row in enumerate(rows):
            part = logits[i:i + 1]
            if row.processors:
                context = mx.array(row.tokens[-PENALTY_CONTEXT:])
                for processor in row.processors:
                    part = processor(context, part)
            out.append(part)
        return mx.concatenate(out, axis=0)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many of the first ``limit`` tokens of ``a`` and ``b`` are the same."""
    if a[:limit] == b[:limit]:
        return limit
    lo, hi = 0, limit  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _segments(rows: int, runs: Sequence[tuple[int, int, int]]):
    """``0..rows`` cut at the runs' ends: (first row, end row, run index or None)."""
    at = 0
    for k, (a, b, _) in enumerate(runs):
        if at < a:
            yield at, a, None
        yield a, b, k
        at = b
    if at < rows:
        yield at, rows, None


def _round_up(n: int, block: int) -> int:
    return max(block, -(-n // block) * block)

