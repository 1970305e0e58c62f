"""Ragged paged attention on CPUs: a C++ kernel called from the jitted step through XLA's FFI.

`cpu_ragged_paged_attention(q, k_cache, v_cache, layer, md, scale)` has the contract of the
jnp reference `paged_attention.ragged_paged_attention` (same arguments, same result to float32
rounding). Where the reference gathers every row's context into a padded copy before its einsums,
the kernel (`cpu_paged_attention.cc`) reads each live key and value once, in place, from the
blocks the row's block table names; rows (and 16-query tiles of prompt chunks) are shared between
the calling thread and XLA's intra-op thread pool.

The kernel is built with jpaged's other CPU kernels (`cpu_kernels.py`); until they are
registered (or where they cannot be built) this function computes with the jnp reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_kernels
from pallas_kernels.paged_attention import AttentionMetadata, ragged_paged_attention

TARGET = "jpaged_ragged_paged_attention"


def cpu_ragged_paged_attention(q, k_cache, v_cache, layer, md: AttentionMetadata, scale: float):
    """Attention of `q [T, heads, head_dim]` over layer `layer` of the paged caches
    `[layers, blocks, block_size, kv_heads, head_dim]`; `[T, heads, head_dim]` in q's dtype.

    float32 or bfloat16, q and caches of one dtype; other dtypes, or a process where the kernel is
    not registered, compute with the jnp reference. The kernel checks the metadata it reads
    (layer, block ids, query and context ranges) and fails the step with an error naming what was
    out of range.
    """
    if not cpu_kernels.is_loaded() or q.dtype != k_cache.dtype or q.dtype not in (jnp.float32, jnp.bfloat16):
        return ragged_paged_attention(q, k_cache, v_cache, layer, md, scale)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    return call(q, k_cache, v_cache, jnp.asarray(layer, jnp.int32).reshape(1), md.block_tables, md.context_lens,
                md.query_start, md.query_lens, scale=np.float32(scale))
