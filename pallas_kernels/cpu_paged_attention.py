"""Ragged paged attention on CPUs: a C++ kernel called from the jitted step through XLA's FFI.

`cpu_ragged_paged_attention(q, k_cache, v_cache, layer, md, scale)` has the contract of the
jnp reference `paged_attention.ragged_paged_attention` (same arguments, same result to float32
rounding). Where the reference gathers every row's context into a padded copy before its einsums,
the kernel (`cpu_paged_attention.cc`) reads each live key and value once, in place, from the
blocks the row's block table names; rows (and 16-query tiles of prompt chunks) are shared between
the calling thread and the kernels' helper threads (`cpu_ffi.h`). A quantized cache
(`quantized_kv.QuantizedKV`) is read at its own width, its scales applied to the scores and to
the values' weights.

The kernel is built once per pair of query and cache types, each pair its own library of jpaged's
CPU kernels (`cpu_kernels.py`, named by `attention_library`); until the pair's library is
registered (or where it cannot be built) this function computes with the jnp reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_kernels
from pallas_kernels.paged_attention import AttentionMetadata, ragged_paged_attention, window_span
from pallas_kernels.quantized_kv import BF16_BITS, is_quantized

QUERY_DTYPES = {jnp.dtype(name): name for name in ("float32", "bfloat16", "float16")}
QUANTIZED_CACHES = {"int8": "int8", "fp8_e4m3": "fp8"}  # kv_cache_dtype: the library's name for it
QUANTIZED_VALUES = {jnp.dtype(jnp.int8): "int8", jnp.dtype(jnp.uint8): "fp8_e4m3"}  # QuantizedKV values: kv_cache_dtype


def attention_library(dtype, kv_cache_dtype: str = "auto") -> str | None:
    """The CPU kernels' library (`cpu_kernels.LIBRARIES`) whose attention reads queries of `dtype`
    over a cache of `kv_cache_dtype` ("auto": the queries' dtype, "int8" or "fp8_e4m3"); None for
    a query dtype the kernel does not take."""
    query = QUERY_DTYPES.get(jnp.dtype(dtype))
    if query is None:
        return None
    return f"attention-{query}-{QUANTIZED_CACHES.get(kv_cache_dtype, query)}"


def cpu_ragged_paged_attention(q, k_cache, v_cache, layer, md: AttentionMetadata, scale: float, window=None,
                               softcap: float | None = None, sinks=None):
    """Attention of `q [T, heads, head_dim]` over layer `layer` of the paged caches; `[T, heads,
    head_dim]` in q's dtype; `window`, `softcap` and `sinks` as the reference takes them (None, or an int32
    scalar: the layer's sliding window, 0 for none; None or the scores' cap; None or each head's sink).

    q is float32, bfloat16 or float16. Each cache is an array `[layers, blocks, block_size,
    kv_heads, head_dim]` of q's dtype (for bfloat16, or its bits as `BF16_BITS`), or (both) a
    `QuantizedKV`: values of that shape, int8 or uint8 holding float8_e4m3fn bits, and float32 scales `[layers, blocks, block_size, kv_heads]`. Other dtypes,
    or a process where the kernel is not registered, compute with the jnp reference. The kernel
    checks the metadata it reads (layer, block ids, query and context ranges) and fails the step
    with an error naming what was out of range.
    """
    library = _library_for(q, k_cache, v_cache)
    if library is None or not cpu_kernels.is_loaded(library):
        return ragged_paged_attention(q, k_cache, v_cache, layer, md, scale, window, softcap, sinks)
    if is_quantized(k_cache):
        caches = (k_cache.values, v_cache.values, k_cache.scales, v_cache.scales)
    else:
        unused = jnp.zeros((1,), jnp.float32)  # the kernel reads scales only for a quantized cache
        caches = (k_cache, v_cache, unused, unused)
    call = jax.ffi.ffi_call(cpu_kernels.target(library), jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    layer_and_span = jnp.stack([jnp.asarray(layer, jnp.int32), window_span(window)])
    sinks = jnp.zeros((0,), jnp.float32) if sinks is None else jnp.asarray(sinks, jnp.float32)
    key_ends = jnp.zeros((0,), jnp.int32) if md.key_ends is None else md.key_ends
    return call(q, *caches, layer_and_span, md.block_tables, md.context_lens, md.query_start, md.query_lens,
                sinks, key_ends, scale=np.float32(scale), softcap=np.float32(softcap or 0.0))


def _library_for(q, k_cache, v_cache) -> str | None:
    """The library whose kernel reads these arrays, or None: q float32, bfloat16 or float16 with
    caches of its dtype (or of bfloat16 bits, `BF16_BITS`, for bfloat16), or with quantized caches (whose
    values are int8 or uint8, as `QuantizedKV` holds them)."""
    if q.dtype not in QUERY_DTYPES:
        return None
    if is_quantized(k_cache) or is_quantized(v_cache):
        same = is_quantized(k_cache) and is_quantized(v_cache) and k_cache.dtype == v_cache.dtype
        kind = QUANTIZED_VALUES.get(jnp.dtype(k_cache.dtype)) if same else None
        return attention_library(q.dtype, kind) if kind else None
    stored_as = (q.dtype, BF16_BITS) if q.dtype == jnp.bfloat16 else (q.dtype,)
    return attention_library(q.dtype) if k_cache.dtype == v_cache.dtype and k_cache.dtype in stored_as else None
