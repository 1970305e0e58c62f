"""Weight-only quantized matmul on CPUs: a C++ kernel called from the jitted step through XLA's FFI.

`cpu_quantized_matmul(x, w, scale)` has the contract of the jnp reference
`quantized_matmul.quantized_matmul` (same result to float32 rounding). XLA on CPU widens an int8
or float8 operand into a float32 copy before its dot, so the reference reads a quantized weight
slower than the float32 one; the kernel (`cpu_quantized_matmul.cc`) reads each weight once at its
own width and widens it in registers. Output column tiles are shared between the calling thread
and the kernels' helper threads (`cpu_ffi.h`); a row's result does not depend on the other rows.

The kernel is built as the CPU kernels' library "quantized-matmul" (`cpu_kernels.py`); until it is
registered (or where it cannot be built) this function computes with the jnp reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_kernels
from pallas_kernels.quantized_matmul import BLOCK_FORMATS, block_matmul, check_block_rows, check_scale, quantized_matmul

LIBRARY = "quantized-matmul"
TARGET = cpu_kernels.target(LIBRARY)


def cpu_quantized_matmul(x, w, scale):
    """`x [M, K]` times `w [N, K]` (int8 or float8_e4m3fn) with grouped scales `scale [N, G]`
    float32 (`quantized_matmul.num_groups`): `[M, N]` in x's dtype. float32 activations run the
    kernel; other dtypes, or a process where the kernel is not registered, the jnp reference.
    ValueError for a scale of the wrong shape."""
    if not cpu_kernels.is_loaded(LIBRARY) or x.dtype != jnp.float32 or w.ndim != 2:
        return quantized_matmul(x, w, scale)
    check_scale(w, scale)
    return _call(x, w, scale.astype(jnp.float32), 0)


def cpu_block_matmul(x, w, kind: str):
    """`x [M, K]` times GGML block rows `w [N, K / block weights * block bytes]` (uint8) of format
    `kind` (`quantized_matmul.BLOCK_FORMATS`): `[M, N]` in x's dtype, as `quantized_matmul.block_matmul`."""
    if not cpu_kernels.is_loaded(LIBRARY) or x.dtype != jnp.float32 or w.ndim != 2:
        return block_matmul(x, w, kind)
    check_block_rows(w, x.shape[-1], kind)
    return _call(x, w, jnp.zeros((1, 1), jnp.float32), BLOCK_FORMATS[kind].type_id)


def _call(x, w, scale, block_format: int):
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32),
                            vmap_method="sequential")
    return call(x, w, scale, block_format=np.int32(block_format))
