"""Weight-only quantized matmul: the pure-jnp reference of the quantized kernels.

Two kinds of quantized weight, both stored as checkpoints store them, `[N, ...]` (one row per
output channel of the product):

- grouped: int8 or float8_e4m3fn values `w [N, K]` with float32 scales `scale [N, G]`, one per
  output channel and group of `K / G` consecutive inputs: `GROUP_SIZE` of them where K is a
  multiple of it, else the whole row (G = 1, one scale per output channel). Weight `[n, k]` stands
  for `w[n, k] * scale[n, k // (K / G)]`; the product with activations `x [M, K]` is `x` times
  that widened weight (`dequantize`), a form XLA fuses into the dot's operand. Weights with
  leading axes (experts `[E, N, K]` with `scale [E, N, G]`) widen the same way;
- GGML blocks (llama.cpp's GGUF formats, `BLOCK_FORMATS`): each row is a run of blocks of 32
  weights (Q4_0, Q4_1, Q8_0) or super-blocks of 256 (the K-quants Q4_K, Q5_K, Q6_K) with their
  own scales (and minimums), `w [N, K / block weights * block bytes]` uint8; the product is
  `x @ dequantize_blocks(w, kind).T`.

The K-quants split a super-block into sub-blocks with integer scales relative to its float16
`d` (and minimums relative to `dmin`): Q4_K and Q5_K have 8 sub-blocks of 32 weights whose 6-bit
scales and minimums are packed into 12 bytes, w = d * scale * q - dmin * min with q of 4 bits (Q5_K:
a fifth, high bit from `qh`); Q6_K has 16 sub-blocks of 16 weights with int8 scales, w = d *
scale * (q - 32) with q of 6 bits (4 in `ql`, 2 in `qh`).
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp

QUANTIZED_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
GROUP_SIZE = 32  # inputs per scale of a grouped weight (llama.cpp's Q8_0 block)


class BlockFormat(NamedTuple):
    type_id: int  # GGML's type id
    block_bytes: int
    block_weights: int


BLOCK_FORMATS = {
    "Q4_0": BlockFormat(2, 18, 32), "Q4_1": BlockFormat(3, 20, 32), "Q8_0": BlockFormat(8, 34, 32),
    "Q4_K": BlockFormat(12, 144, 256), "Q5_K": BlockFormat(13, 176, 256), "Q6_K": BlockFormat(14, 210, 256),
}


def num_groups(k: int) -> int:
    """Scales per output channel of a weight with K = `k` inputs: one per `GROUP_SIZE` inputs
    where `k` is a multiple of it, else one."""
    return k // GROUP_SIZE if k % GROUP_SIZE == 0 else 1


def check_scale(w, scale) -> None:
    """ValueError unless `scale [..., N, G]` fits the quantized `w [..., N, K]`: G = `num_groups(K)`."""
    *lead, n, k = w.shape
    want = (*lead, n, num_groups(k))
    if tuple(scale.shape) != want:
        raise ValueError(f"a quantized weight of shape {tuple(w.shape)} takes scales of shape {want} "
                         f"(one per output channel and group of {GROUP_SIZE} inputs, or per channel where K is "
                         f"not a multiple of {GROUP_SIZE}), got {tuple(scale.shape)}")


def quantized_matmul(x, w, scale):
    """`x [M, K]` (float) times quantized `w [N, K]` with `scale [N, G]` (float32): `[M, N]` in
    x's dtype. ValueError for a scale of the wrong shape."""
    check_scale(w, scale)
    return (x @ dequantize(w, scale, x.dtype)).astype(x.dtype)


def dequantize(w, scale, dtype):
    """Quantized `w [..., N, K]` with `scale [..., N, G]` as `dtype` values in `x @ W` layout `[..., K, N]`."""
    *lead, n, k = w.shape
    groups = scale.shape[-1]
    grouped = w.astype(jnp.float32).reshape(*lead, n, groups, k // groups) * scale[..., None].astype(jnp.float32)
    return jnp.swapaxes(grouped.reshape(*lead, n, k).astype(dtype), -1, -2)


def row_bytes(kind: str, k: int) -> int:
    """Bytes of one row of `k` weights in GGML format `kind`; ValueError unless `k` is a whole
    number of its blocks."""
    fmt = BLOCK_FORMATS[kind]
    if k <= 0 or k % fmt.block_weights:
        raise ValueError(f"{kind} rows hold a multiple of {fmt.block_weights} weights, got K = {k}")
    return k // fmt.block_weights * fmt.block_bytes


def bytes_per_weight(kind: str) -> Fraction:
    """A format's row bytes per weight: two formats with the same value have rows of the same size."""
    fmt = BLOCK_FORMATS[kind]
    return Fraction(fmt.block_bytes, fmt.block_weights)


def block_format(w, k: int, kinds=tuple(BLOCK_FORMATS)) -> str:
    """Which of `kinds` (names in `BLOCK_FORMATS`) the uint8 rows `w [N, row bytes]` hold for K =
    `k` weights a row. ValueError when none fits, or several do (Q4_0 and Q4_K rows are the same
    size whenever K is a multiple of 256: pass the kinds a model holds)."""
    fits = [kind for kind in kinds if k > 0 and k % BLOCK_FORMATS[kind].block_weights == 0
            and w.shape[-1] == row_bytes(kind, k)]
    if len(fits) > 1:
        raise ValueError(f"rows of {w.shape[-1]} bytes hold {k} weights in each of {', '.join(fits)}")
    if not fits:
        raise ValueError(f"rows of {w.shape[-1]} bytes hold {k} weights in none of {', '.join(kinds)}")
    return fits[0]


def check_block_rows(w, k: int, kind: str) -> None:
    """ValueError unless the uint8 rows `w [N, row bytes]` hold `k` weights in format `kind`."""
    if w.shape[-1] != row_bytes(kind, k):
        raise ValueError(f"{kind} rows of {k} weights take {row_bytes(kind, k)} bytes, got rows of {w.shape[-1]}")


def dequantize_blocks(w, kind: str):
    """GGML block rows `w [..., K / block weights * block bytes]` (uint8) as float32 `[..., K]`."""
    nbytes = BLOCK_FORMATS[kind].block_bytes
    if w.shape[-1] % nbytes:
        raise ValueError(f"{kind} rows are whole blocks of {nbytes} bytes, got rows of {w.shape[-1]}")
    blocks = w.reshape(*w.shape[:-1], -1, nbytes)
    values = _DEQUANTIZE[kind](blocks)
    return values.reshape(*w.shape[:-1], -1)


def block_matmul(x, w, kind: str):
    """`x [M, K]` times GGML block rows `w [N, ...]` of format `kind`: `[M, N]` in x's dtype."""
    check_block_rows(w, x.shape[-1], kind)
    return (x @ dequantize_blocks(w, kind).astype(x.dtype).T).astype(x.dtype)


def _q8_0(blocks):
    d = _half(blocks[..., 0:2])[..., None]
    return jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.float32) * d


def _q4_0(blocks):
    return _half(blocks[..., 0:2])[..., None] * (_nibbles(blocks[..., 2:]) - 8.0)


def _q4_1(blocks):
    return _half(blocks[..., 0:2])[..., None] * _nibbles(blocks[..., 4:]) + _half(blocks[..., 2:4])[..., None]


def _nibbles(packed):
    """A 32-weight block's 16 bytes `[..., 16]`: weight j < 16 is byte j's low nibble, j + 16 its high one."""
    return jnp.concatenate([packed & 0xF, packed >> 4], axis=-1).astype(jnp.float32)


def _q4_k(blocks):
    return _scaled_with_min(blocks, _low_and_high_nibbles(blocks[..., 16:144]))


def _q5_k(blocks):
    high = (blocks[..., 16:48, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1  # [..., 32 weights, 8 sub-blocks]
    return _scaled_with_min(blocks, _low_and_high_nibbles(blocks[..., 48:176]) | (jnp.swapaxes(high, -1, -2) << 4))


def _low_and_high_nibbles(qs):
    """Q4_K / Q5_K's 128 bytes `[..., 128]` as 8 sub-blocks of 4-bit values `[..., 8, 32]`: bytes
    32 g .. 32 g + 31 hold sub-block 2 g in their low nibbles and 2 g + 1 in their high ones."""
    groups = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return ((groups >> jnp.array([0, 4], jnp.uint8)[:, None]) & 0xF).reshape(*qs.shape[:-1], 8, 32)


def _scaled_with_min(blocks, q):
    """Q4_K / Q5_K weights `[..., 256]` from super-blocks `[..., bytes]` and their sub-blocks'
    values `q [..., 8, 32]` (uint8): d * scale * q - dmin * min."""
    scales, mins = _six_bit_scales(blocks[..., 4:16])
    d = _half(blocks[..., 0:2])[..., None] * scales
    dm = _half(blocks[..., 2:4])[..., None] * mins
    return (d[..., None] * q.astype(jnp.float32) - dm[..., None]).reshape(*blocks.shape[:-1], 256)


def _six_bit_scales(packed):
    """The 8 sub-blocks' 6-bit scales and minimums `([..., 8], [..., 8])` (float32) from their 12
    bytes: sub-block j < 4 has the low 6 bits of bytes j (scale) and j + 4 (minimum); j >= 4 has
    byte j + 4's low (scale) and high (minimum) nibble, with bits 4-5 from the top two bits of
    bytes j - 4 and j."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = jnp.concatenate([a & 0x3F, (c & 0xF) | ((a >> 6) << 4)], axis=-1)
    mins = jnp.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return scales.astype(jnp.float32), mins.astype(jnp.float32)


def _q6_k(blocks):
    """Q6_K: weights in two halves of 128; in half h, weight 32 i + l (i < 4, l < 32) has the low
    (i < 2) or high nibble of `ql` byte 64 h + 32 (i % 2) + l and bits 2 i, 2 i + 1 of `qh` byte
    32 h + l as its top two bits."""
    lead = blocks.shape[:-1]
    ql = blocks[..., 0:128].reshape(*lead, 2, 1, 64) >> jnp.array([0, 4], jnp.uint8)[:, None]
    ql = (ql & 0xF).reshape(*lead, 2, 4, 32)
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32) >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]
    q = (ql | ((qh & 3) << 4)).astype(jnp.float32) - 32.0
    scales = jax.lax.bitcast_convert_type(blocks[..., 192:208], jnp.int8).astype(jnp.float32)
    d = _half(blocks[..., 208:210])[..., None] * scales  # [..., 16 sub-blocks of 16]
    return (d[..., None] * q.reshape(*lead, 16, 16)).reshape(*lead, 256)


_DEQUANTIZE = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def _half(pair):
    """Little-endian float16 from its two bytes `[..., 2]` (uint8), as float32."""
    bits = pair[..., 0].astype(jnp.uint16) | (pair[..., 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)
