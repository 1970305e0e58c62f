"""The quantized KV cache: int8 or float8 (e4m3) keys and values with one scale per token and KV head.

With `kv_cache_dtype="int8"` or `"fp8_e4m3"` each of K and V is a `QuantizedKV`: the values
`[num_layers, num_blocks, block_size, kv_heads, head_dim]` (int8, or the bits of float8_e4m3fn
values held as uint8) and their float32 scales `[num_layers, num_blocks, block_size, kv_heads]`.
`write_kv` quantizes a new token's K (and V) of each KV head with the scale `max |x| / qmax` of
that head's vector (qmax 127 for int8, 448 for e4m3), and every reader (the jnp reference, the Pallas and C++ kernels) widens
`values * scale` back to float32 as it loads a page.

Why one scale per token and KV head rather than per block (or per tensor, as vLLM's fp8 cache):
a token's scale is fixed when it is written and depends on nothing else, so a block's bytes never
change after their tokens are written (copy-on-write copies, swaps and prefix-cache hits move
them as they are), a token's attention does not depend on which tokens share its block or batch,
and an outlier token costs precision only to itself. The price is 4 bytes per `head_dim` values:
a block of int8 keys and values takes `(head_dim + 4) / (4 * head_dim)` of float32's bytes
(0.27 at head_dim 64, 0.26 at 128) and `(head_dim + 4) / (2 * head_dim)` of bfloat16's.

float8 values are kept as their bits because XLA's CPU and GPU compilers widen a whole float8
operand of a gather or scatter to float32 first: reading one page of a float8 cache would copy the
whole cache. On uint8 the gather moves bytes, and the bits become float8 in registers.

Everything that moves whole blocks (`jpaged/kv_cache_ops.py`) treats the cache as a pytree
whose leaves all keep blocks on axis 1, so the scales travel with their values.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
# kv_cache_dtype: (array dtype, dtype of its values, largest value)
STORAGE = {"int8": (jnp.int8, jnp.int8, 127.0), "fp8_e4m3": (jnp.uint8, jnp.float8_e4m3fn, 448.0)}
SCALE_BYTES = 4  # one float32 scale per token and KV head
BF16_BITS = jnp.uint16  # a bfloat16 cache kept as its bits (see `empty_cache`)


@dataclass(frozen=True)
class QuantizedKV:
    """K or V of a quantized cache (a jax pytree): `values [L, B, bs, kv_heads, head_dim]` int8, or
    uint8 holding float8_e4m3fn bits, and `scales [L, B, bs, kv_heads]` float32."""

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype


jax.tree_util.register_dataclass(QuantizedKV, data_fields=["values", "scales"], meta_fields=[])


def is_quantized(cache) -> bool:
    return isinstance(cache, QuantizedKV)


def storage_dtype(kv_cache_dtype: str, dtype):
    """The dtype the cache's values are kept in: `dtype` (the model's) for "auto"."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                         f"got {kv_cache_dtype!r}")
    return jnp.dtype(dtype if kv_cache_dtype == "auto" else STORAGE[kv_cache_dtype][0])


def bytes_per_token_head(kv_cache_dtype: str, dtype, head_dim: int) -> int:
    """Bytes one token's K (or V) of one KV head takes in the cache, its scale included."""
    itemsize = storage_dtype(kv_cache_dtype, dtype).itemsize
    return head_dim * itemsize + (SCALE_BYTES if kv_cache_dtype != "auto" else 0)


def empty_cache(shape: tuple[int, ...], kv_cache_dtype: str, dtype, place=jnp.zeros, bf16_as_bits: bool = False):
    """One of K or V, zeros: an array of `shape` in `dtype` for "auto", else a `QuantizedKV`.
    `place(shape, dtype)` makes each array (for example, sharded). With `bf16_as_bits`, a bfloat16
    cache is kept as its bits (uint16, `BF16_BITS`): XLA's CPU compiler widens a whole bfloat16
    operand of a gather or scatter to float32 as it does float8's, so each layer's KV write copied
    the whole cache (a decode step of the default model took 8 s with a 1 GiB cache)."""
    storage = storage_dtype(kv_cache_dtype, dtype)
    values = place(shape, BF16_BITS if bf16_as_bits and storage == jnp.bfloat16 else storage)
    if kv_cache_dtype == "auto":
        return values
    return QuantizedKV(values, place(shape[:-1], jnp.float32))


def to_storage(x, storage):
    """`x` as elements of a float cache of array dtype `storage` (for `BF16_BITS`, bfloat16 bits)."""
    if storage == BF16_BITS:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)
    return x.astype(storage)


def from_storage(values):
    """A float cache's elements as floats (`BF16_BITS` as bfloat16)."""
    return jax.lax.bitcast_convert_type(values, jnp.bfloat16) if values.dtype == BF16_BITS else values


def quantize(x, dtype):
    """`x [..., head_dim]` as (`values` in the cache's array `dtype` (int8, or uint8 for float8 bits),
    `scales [...]` float32), one scale per vector: `max |x| * (1 / qmax)` (1 for an all-zero vector)."""
    _, value_dtype, qmax = _format(dtype)
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scales = jnp.where(amax > 0, amax * (1.0 / qmax), 1.0)
    scaled = x / scales[..., None]
    if value_dtype == jnp.int8:
        return jnp.clip(jnp.round(scaled), -qmax, qmax).astype(jnp.int8), scales
    return jax.lax.bitcast_convert_type(scaled.astype(value_dtype), dtype), scales


def widen(values):
    """A quantized cache's `values` (int8, or uint8 float8 bits) as float32, unscaled."""
    value_dtype = _format(values.dtype)[1]
    if value_dtype != values.dtype:
        values = jax.lax.bitcast_convert_type(values, value_dtype)
    return values.astype(jnp.float32)


def dequantize(values, scales):
    """`values [..., head_dim]` times `scales [...]`, float32."""
    return widen(values) * scales[..., None]


def _format(dtype):
    for storage in STORAGE.values():
        if jnp.dtype(storage[0]) == jnp.dtype(dtype):
            return storage
    raise ValueError(f"{jnp.dtype(dtype).name} is not a quantized KV cache dtype")
