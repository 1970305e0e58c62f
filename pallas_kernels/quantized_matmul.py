"""Weight-only quantized matmul: the pure-jnp reference of the quantized kernels.

A weight is stored as it is in checkpoints, `[N, K]` (one row per output column), as int8 or
float8_e4m3fn values `w` with one float32 scale per output column (`scale [N]`); the product with
activations `x [M, K]` is `(x @ w.T) * scale`, the scale applied to the product's columns rather
than to a widened copy of the weight. Weights with leading axes (experts `[E, N, K]` with
`scale [E, N]`) widen through `dequantize`.
"""

from __future__ import annotations

import jax.numpy as jnp

QUANTIZED_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def quantized_matmul(x, w, scale):
    """`x [M, K]` (float) times quantized `w [N, K]` with `scale [N]` (float32): `[M, N]` in x's dtype."""
    return ((x @ w.astype(x.dtype).T) * scale.astype(x.dtype)).astype(x.dtype)


def dequantize(w, scale, dtype):
    """Quantized `w [..., N, K]` with `scale [..., N]` as `dtype` values in `x @ W` layout `[..., K, N]`."""
    return jnp.swapaxes(w.astype(dtype) * scale[..., :, None].astype(dtype), -1, -2)
