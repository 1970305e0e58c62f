"""Weight-only quantized matmul: the pure-jnp reference of the quantized kernels.

Two kinds of quantized weight, both stored as checkpoints store them, `[N, ...]` (one row per
output channel of the product):

- per-channel: int8 or float8_e4m3fn values `w [N, K]` with one float32 scale per output channel
  (`scale [N]`); the product with activations `x [M, K]` is `(x @ w.T) * scale`, the scale applied
  to the product's columns rather than to a widened copy of the weight. Weights with leading axes
  (experts `[E, N, K]` with `scale [E, N]`) widen through `dequantize`;
- GGML blocks (llama.cpp's GGUF formats, `BLOCK_FORMATS`): each row is K / 32 blocks of 32
  weights with their own float16 scale (and minimum), `w [N, K / 32 * block bytes]` uint8; the
  product is `x @ dequantize_blocks(w, kind).T`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QUANTIZED_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
BLOCK_SIZE = 32
# GGML type: (id, bytes per 32-weight block)
BLOCK_FORMATS = {"Q4_0": (2, 18), "Q4_1": (3, 20), "Q8_0": (8, 34)}


def quantized_matmul(x, w, scale):
    """`x [M, K]` (float) times quantized `w [N, K]` with `scale [N]` (float32): `[M, N]` in x's dtype."""
    return ((x @ w.astype(x.dtype).T) * scale.astype(x.dtype)).astype(x.dtype)


def dequantize(w, scale, dtype):
    """Quantized `w [..., N, K]` with `scale [..., N]` as `dtype` values in `x @ W` layout `[..., K, N]`."""
    return jnp.swapaxes(w.astype(dtype) * scale[..., :, None].astype(dtype), -1, -2)


def block_format(w, k: int) -> str:
    """Which of `BLOCK_FORMATS` the uint8 rows `w [N, row bytes]` hold for K = `k` weights a row."""
    for kind, (_, nbytes) in BLOCK_FORMATS.items():
        if k % BLOCK_SIZE == 0 and w.shape[-1] == k // BLOCK_SIZE * nbytes:
            return kind
    raise ValueError(f"rows of {w.shape[-1]} bytes hold {k} weights in none of {', '.join(BLOCK_FORMATS)}")


def dequantize_blocks(w, kind: str):
    """GGML block rows `w [N, K / 32 * block bytes]` (uint8) as float32 `[N, K]`."""
    nbytes = BLOCK_FORMATS[kind][1]
    blocks = w.reshape(*w.shape[:-1], -1, nbytes)
    d = _half(blocks[..., 0:2])[..., None]
    if kind == "Q8_0":
        values = jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.float32) * d
    else:
        header = 4 if kind == "Q4_1" else 2
        nibbles = blocks[..., header:]
        q = jnp.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1).astype(jnp.float32)
        values = d * q + _half(blocks[..., 2:4])[..., None] if kind == "Q4_1" else d * (q - 8.0)
    return values.reshape(*w.shape[:-1], -1)


def block_matmul(x, w, kind: str):
    """`x [M, K]` times GGML block rows `w [N, ...]` of format `kind`: `[M, N]` in x's dtype."""
    return (x @ dequantize_blocks(w, kind).astype(x.dtype).T).astype(x.dtype)


def _half(pair):
    """Little-endian float16 from its two bytes `[..., 2]` (uint8), as float32."""
    bits = pair[..., 0].astype(jnp.uint16) | (pair[..., 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)
