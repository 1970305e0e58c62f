"""Block copies and host swaps move exactly the named blocks, in every layer, K and V alike."""

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.kv_cache_ops import HostKVPool, copy_blocks
from pallas_kernels.quantized_kv import QuantizedKV


def random_cache(seed=0, shape=(3, 10, 4, 2, 8)):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(2))


def test_copy_blocks_moves_only_named_blocks():
    cache = random_cache()
    before = [np.asarray(c) for c in cache]
    after = [np.asarray(c) for c in copy_blocks(cache, [(1, 7), (4, 2), (9, 0)], width=2)]
    for old, new in zip(before, after):
        expected = old.copy()
        expected[:, [7, 2, 0]] = old[:, [1, 4, 9]]
        np.testing.assert_array_equal(new, expected)


def test_swap_round_trip_restores_blocks_into_new_places():
    cache = random_cache(1)
    before = [np.asarray(c) for c in cache]
    pool = HostKVPool(cache, num_host_blocks=5)
    pool.swap_out(cache, [(3, 4), (6, 0), (8, 2)])
    clobbered = random_cache(2)
    restored = [np.asarray(c) for c in pool.swap_in(clobbered, [(4, 1), (0, 5), (2, 9)])]
    for old, scratch, new in zip(before, [np.asarray(c) for c in random_cache(2)], restored):
        expected = scratch.copy()
        expected[:, [1, 5, 9]] = old[:, [3, 6, 8]]
        np.testing.assert_array_equal(new, expected)


def test_quantized_cache_moves_values_and_scales_together():
    """A quantized cache's scales ([layers, blocks, block_size, kv_heads]) keep blocks on axis 1 too."""
    shape = (3, 10, 4, 2, 8)

    def quantized(seed):
        rng = np.random.default_rng(seed)
        return tuple(QuantizedKV(jnp.asarray(rng.integers(-127, 128, shape, np.int8)),
                                 jnp.asarray(rng.random(shape[:-1], np.float32))) for _ in range(2))

    cache = quantized(4)
    before = [np.asarray(leaf) for leaf in jax.tree.leaves(cache)]
    moved = copy_blocks(cache, [(1, 7), (9, 0)], width=2)
    pool = HostKVPool(moved, num_host_blocks=3)
    pool.swap_out(moved, [(7, 2), (0, 1)])
    restored = pool.swap_in(quantized(5), [(2, 4), (1, 6)])
    for old, scratch, new in zip(before, jax.tree.leaves(quantized(5)), jax.tree.leaves(restored)):
        expected = np.asarray(scratch).copy()
        expected[:, [4, 6]] = old[:, [1, 9]]
        np.testing.assert_array_equal(np.asarray(new), expected)
