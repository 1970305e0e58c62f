"""float8 e4m3 values from their bits, widened by integer arithmetic.

Triton converts float8_e4m3fn in hardware only from sm_89 on; before that a kernel that reads
float8 values (quantized weights, a quantized KV cache) loads their bytes and widens them here,
with shifts and masks that every GPU and interpret mode run alike.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

FLOAT32_NAN_BITS = 0x7FC00000


def widen_fp8_bits(bits):
    """float8_e4m3fn values given as their int8 bit patterns (any shape), as float32, by integer
    arithmetic: exact for every value, NaN included."""
    b = bits.astype(jnp.int32)
    magnitude = b & 0x7F
    normal = (magnitude << 20) + (120 << 23)  # exponent field rebased from bias 7 to 127
    subnormal = lax.bitcast_convert_type((magnitude & 7).astype(jnp.float32) * 2.0**-9, jnp.int32)
    value = jnp.where(magnitude >= 8, normal, subnormal)
    value = jnp.where(magnitude == 0x7F, FLOAT32_NAN_BITS, value)
    return lax.bitcast_convert_type(value | ((b & 0x80) << 24), jnp.float32)
