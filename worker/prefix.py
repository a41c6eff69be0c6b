"""Keys and values of prompt prefixes already computed, reused instead of prefilled again.

Batch files repeat themselves: the same instructions, few-shot examples or
document stand in front of many requests. :class:`PrefixCache` keeps the keys
and values of prompts the engine has prefilled, in blocks of
:data:`PREFIX_BLOCK` tokens, as vLLM's automatic prefix caching does: a block
is found by its own tokens and the block before it, so a match is always a
whole prefix. A new row copies the longest run of cached blocks its prompt
starts with into its cache (a memory copy) and prefills only the rest.

Blocks are exact: they are keyed by their token ids (not a hash of them) and
by the block before them, and separately for each LoRA adapter (an adapter
changes the keys and values). The cache holds at most ``max_bytes`` and drops
the least recently used blocks first; a match touches its blocks from the last
to the first, so a prefix outlives the blocks that extend it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, List, Sequence

import mlx.core as mx

__all__ = ["PREFIX_BLOCK", "PrefixCache"]

#: Tokens per cached block: a prefix is reused in whole blocks.
PREFIX_BLOCK = 16


@dataclass(eq=False)
class _Block:
    key: tuple
    id: int
    kv: mx.array  # 2 x layers x kv_heads x PREFIX_BLOCK x head_dim

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


class PrefixCache:
    """Blocks of computed keys and values by token prefix, least recently used out first."""

    def __init__(self, max_bytes: int, block: int = PREFIX_BLOCK):
        if block <= 0:
            raise ValueError("the block size must be positive")
        self.max_bytes = max(0, int(max_bytes))
        self.block = block
        self._blocks: "OrderedDict[tuple, _Block]" = OrderedDict()
        self._ids = itertools.count(1)
        self.nbytes = 0
        self.peak_bytes = 0
        #: Prompt tokens served from the cache instead of prefilled.
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, namespace: Hashable, tokens: Sequence[int], limit: int) -> List[_Block]:
        """The cached blocks that ``tokens[:limit]`` starts with, longest run first to last.

        Does not count as a use: :meth:`use` does, once the blocks are copied.
        """
        found: List[_Block] = []
        parent: object = ("root", namespace)
        b = self.block
        for start in range(0, limit - b + 1, b):
            block = self._blocks.get((parent, tuple(tokens[start:start + b])))
            if block is None:
                break
            found.append(block)
            parent = block.id
        return found

    def use(self, blocks: Sequence[_Block], rows: int = 1) -> List[mx.array]:
        """Mark ``blocks`` used (by ``rows`` new rows) and return their keys and values, a block each.

        Each is ``2 x layers x kv_heads x block x head_dim``; the caller copies
        them into place one by one (no copy of the whole run is made).
        """
        for block in reversed(blocks):
            if block.key in self._blocks:
                self._blocks.move_to_end(block.key)
        self.hit_tokens += len(blocks) * self.block * rows
        return [block.kv for block in blocks]

    def store(self, namespace: Hashable, tokens: Sequence[int], limit: int, caches, row: int) -> int:
        """Keep the blocks of ``tokens[:limit]`` that are not cached yet, from ``row`` of ``caches``.

        ``caches`` are the layers' slot caches, whose ``row`` holds the keys and
        values of ``tokens`` from position 0. Returns the blocks added.
        """
        if self.max_bytes == 0:
            return 0
        b = self.block
        parent: object = ("root", namespace)
        chain: List[_Block] = []
        added: List[_Block] = []
        for start in range(0, limit - b + 1, b):
            key = (parent, tuple(tokens[start:start + b]))
            block = self._blocks.get(key)
            if block is None:
                kv = mx.stack([
                    mx.stack([c.keys[row, :, start:start + b] for c in caches]),
                    mx.stack([c.values[row, :, start:start + b] for c in caches]),
                ])
                if kv.nbytes > self.max_bytes:
                    break
                block = _Block(key, next(self._ids), kv)
                self._blocks[key] = block
                self.nbytes += kv.nbytes
                added.append(block)
            chain.append(block)
            parent = block.id
        if added:
            # Copy now: the row's buffers are written in place by later steps.
            mx.eval([block.kv for block in added])
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)
        self._evict()
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return len(added)

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.nbytes -= block.nbytes

    def clear(self) -> None:
        self._blocks.clear()
        self.nbytes = 0
