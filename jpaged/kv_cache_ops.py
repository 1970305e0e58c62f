"""Block-level moves of the paged KV cache: copy-on-write copies and swaps to and from host memory.

The scheduler decides which blocks move (pairs of block ids); these functions move their
contents for all layers at once, K and V together, as one device operation per kind of move.
Index lists are padded to a power of two (`jpaged/padding.py`) so each operation compiles for few
shapes; padding pairs point past the end of the cache and are dropped.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np

from jpaged.padding import power_of_two

KVCache = tuple[jax.Array, jax.Array]  # each [num_layers, num_blocks, block_size, kv_heads, head_dim]


def padded_indices(ids: list[int], fill: int) -> np.ndarray:
    length = power_of_two(len(ids))
    return np.array(ids + [fill] * (length - len(ids)), np.int32)


@partial(jax.jit, donate_argnums=0)
def _copy_blocks(kv_cache: KVCache, src, dst) -> KVCache:
    return tuple(cache.at[:, dst].set(cache[:, src], mode="drop") for cache in kv_cache)


@jax.jit
def _gather_blocks(kv_cache: KVCache, src):
    return tuple(cache[:, src] for cache in kv_cache)


@partial(jax.jit, donate_argnums=0)
def _scatter_blocks(kv_cache: KVCache, blocks, dst) -> KVCache:
    return tuple(cache.at[:, dst].set(data, mode="drop") for cache, data in zip(kv_cache, blocks))


def copy_blocks(kv_cache: KVCache, pairs: list[tuple[int, int]]) -> KVCache:
    """Copy device block `src` onto device block `dst` for each pair."""
    if not pairs:
        return kv_cache
    num_blocks = kv_cache[0].shape[1]
    src = padded_indices([s for s, _ in pairs], 0)
    dst = padded_indices([d for _, d in pairs], num_blocks)
    return _copy_blocks(kv_cache, src, dst)


class HostKVPool:
    """Host-memory blocks for swapped-out sequences, laid out like the device cache."""

    def __init__(self, kv_cache: KVCache, num_host_blocks: int):
        layers, _, block_size, kv_heads, head_dim = kv_cache[0].shape
        shape = (layers, num_host_blocks, block_size, kv_heads, head_dim)
        self.blocks = tuple(np.zeros(shape, cache.dtype) for cache in kv_cache)

    def swap_out(self, kv_cache: KVCache, pairs: list[tuple[int, int]]) -> None:
        """Copy device block -> host block for each pair."""
        if not pairs:
            return
        src = padded_indices([s for s, _ in pairs], 0)
        for host, gathered in zip(self.blocks, _gather_blocks(kv_cache, src)):
            host[:, [h for _, h in pairs]] = np.asarray(gathered)[:, : len(pairs)]

    def swap_in(self, kv_cache: KVCache, pairs: list[tuple[int, int]]) -> KVCache:
        """Copy host block -> device block for each pair."""
        if not pairs:
            return kv_cache
        num_blocks = kv_cache[0].shape[1]
        host_ids = padded_indices([h for h, _ in pairs], 0)
        dst = padded_indices([d for _, d in pairs], num_blocks)
        return _scatter_blocks(kv_cache, tuple(host[:, host_ids] for host in self.blocks), dst)
