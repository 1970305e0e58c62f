"""Block-level moves of the paged KV cache: copy-on-write copies and swaps to and from host memory.

The scheduler decides which blocks move (pairs of block ids); these functions move their
contents for all layers at once, K and V together, one device operation per kind of move and
fixed-width run of pairs, so each operation compiles for one shape (`warm_up` compiles them
before the first request); padding pairs point past the end of the cache and are dropped. The
cache is a pytree whose every leaf keeps blocks on axis 1 (a quantized cache's scales too).
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np

KVCache = tuple  # (k, v): arrays [num_layers, num_blocks, block_size, kv_heads, head_dim] or QuantizedKV
SWAP_WIDTH = 64  # blocks per swap operation


def padded_runs(pairs: list[tuple[int, int]], width: int, fills: tuple[int, int]
                ) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """`pairs` cut into runs of `width`, each as (sources, destinations) int32 `[width]` padded
    with `fills`, and the run's real length."""
    runs = []
    for first in range(0, len(pairs), width):
        run = pairs[first : first + width]
        padded = run + [fills] * (width - len(run))
        runs.append((np.array([s for s, _ in padded], np.int32), np.array([d for _, d in padded], np.int32), len(run)))
    return runs


@partial(jax.jit, donate_argnums=0)
def _copy_blocks(kv_cache: KVCache, src, dst) -> KVCache:
    return jax.tree.map(lambda cache: cache.at[:, dst].set(cache[:, src], mode="drop"), kv_cache)


@jax.jit
def _gather_blocks(kv_cache: KVCache, src) -> list[jax.Array]:
    return [cache[:, src] for cache in jax.tree.leaves(kv_cache)]


@partial(jax.jit, donate_argnums=0)
def _scatter_blocks(kv_cache: KVCache, blocks: list, dst) -> KVCache:
    leaves, tree = jax.tree.flatten(kv_cache)
    return tree.unflatten([cache.at[:, dst].set(data, mode="drop") for cache, data in zip(leaves, blocks)])


def copy_blocks(kv_cache: KVCache, pairs: list[tuple[int, int]], width: int) -> KVCache:
    """Copy device block `src` onto device block `dst` for each pair, `width` pairs per operation."""
    for src, dst, _ in padded_runs(pairs, width, (0, _num_blocks(kv_cache))):
        kv_cache = _copy_blocks(kv_cache, src, dst)
    return kv_cache


class HostKVPool:
    """Host-memory blocks for swapped-out sequences, laid out like the device cache."""

    def __init__(self, kv_cache: KVCache, num_host_blocks: int):
        self.blocks = [np.zeros((cache.shape[0], num_host_blocks, *cache.shape[2:]), cache.dtype)
                       for cache in jax.tree.leaves(kv_cache)]

    def swap_out(self, kv_cache: KVCache, pairs: list[tuple[int, int]]) -> None:
        """Copy device block -> host block for each pair."""
        for src, host_ids, count in padded_runs(pairs, SWAP_WIDTH, (0, 0)):
            for host, gathered in zip(self.blocks, _gather_blocks(kv_cache, src)):
                host[:, host_ids[:count]] = np.asarray(gathered)[:, :count]

    def swap_in(self, kv_cache: KVCache, pairs: list[tuple[int, int]]) -> KVCache:
        """Copy host block -> device block for each pair."""
        for host_ids, dst, _ in padded_runs(pairs, SWAP_WIDTH, (0, _num_blocks(kv_cache))):
            kv_cache = _scatter_blocks(kv_cache, [host[:, host_ids] for host in self.blocks], dst)
        return kv_cache


def _num_blocks(kv_cache: KVCache) -> int:
    return jax.tree.leaves(kv_cache)[0].shape[1]
