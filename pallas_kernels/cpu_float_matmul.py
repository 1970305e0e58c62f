"""Float32 products of few rows on CPUs: a C++ kernel called from the jitted step through XLA's FFI.

`cpu_float_matmul(x, w)` is `x @ w` for float32 `x [M, K]` and `w [K, N]` (the model's `x @ W`
layout), equal to XLA's product to float32 rounding. With a row or two (one request decoding)
the product is bound by streaming the weights from memory; XLA's dot streams the `[K, N]` layout
at about 20 GB/s on a 2-core VM where the kernel (`cpu_float_matmul.cc`: contiguous chunks of
weight rows shared with the kernels' helper threads) reaches about 25, 1.25x on a one-row step's
layer products (docs/BENCHMARKS.md). Products of more than `MAX_ROWS` rows are XLA's: at 8 rows
and beyond its blocked matmul is faster. Each output's sum runs in one fixed order whatever the
number of rows, so a row's result does not depend on the others.

Built as the CPU kernels' library "float-matmul" (`cpu_kernels.py`); until it is registered (or
where it cannot be built), and for other dtypes or shapes, XLA's product is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_kernels

LIBRARY = "float-matmul"
TARGET = cpu_kernels.target(LIBRARY)
MAX_ROWS = 4


def cpu_float_matmul(x, w):
    """`x [M, K] @ w [K, N]` in x's dtype: the kernel for float32 with M <= MAX_ROWS, else XLA's."""
    if (not cpu_kernels.is_loaded(LIBRARY) or x.ndim != 2 or w.ndim != 2 or x.shape[0] > MAX_ROWS
            or x.dtype != jnp.float32 or w.dtype != jnp.float32):
        return x @ w
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32),
                            vmap_method="sequential")
    return call(x, w)
