"""Float32 products of few rows on CPUs: a C++ kernel called from the jitted step through XLA's FFI.

`cpu_float_matmul(x, w)` is `x @ w` for float32 `x [M, K]` and `w [K, N]` (the model's `x @ W`
layout), equal to XLA's product to float32 rounding. With a row or two (one request decoding)
the product is bound by streaming the weights from memory; XLA's dot streams the `[K, N]` layout
at about 20 GB/s on a 2-core VM where the kernel (`cpu_float_matmul.cc`: contiguous chunks of
weight rows shared with the kernels' helper threads) reaches about 25, 1.25x on a one-row step's
layer products (docs/BENCHMARKS.md). Products of more than `MAX_ROWS` rows are XLA's: at 8 rows
and beyond its blocked matmul is faster. Each output's sum runs in one fixed order whatever the
number of rows, so a row's result does not depend on the others.

`transposed=True` multiplies by `w [N, K]` transposed (an embedding table used as the LM head,
`[vocab, hidden]`): for 2 to `MAX_ROWS` rows XLA's product on that layout streamed the 113 MB
table of the default model at a third of the memory's speed (9.5 ms in a 4-row decode step on a
2-core VM), where the kernel reads each table row once for all rows; for one row XLA's own
matrix-vector product is as fast and stays.

Built as the CPU kernels' libraries "float-matmul" and "float-matmul-transposed"
(`cpu_kernels.py`); until they are registered (or where they cannot be built), and for other
dtypes or shapes, XLA's product is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_kernels

LIBRARY = "float-matmul"
TRANSPOSED_LIBRARY = "float-matmul-transposed"
TARGET = cpu_kernels.target(LIBRARY)
TRANSPOSED_TARGET = cpu_kernels.target(TRANSPOSED_LIBRARY)
MAX_ROWS = 4


def cpu_float_matmul(x, w, transposed: bool = False):
    """`x [M, K] @ w [K, N]` (or `x @ w.T` for `w [N, K]` with `transposed`) in x's dtype: the
    kernel for float32 with M <= MAX_ROWS (2 <= M with `transposed`), else XLA's."""
    library, target = (TRANSPOSED_LIBRARY, TRANSPOSED_TARGET) if transposed else (LIBRARY, TARGET)
    fewest_rows = 2 if transposed else 1
    if (not cpu_kernels.is_loaded(library) or x.ndim != 2 or w.ndim != 2 or not fewest_rows <= x.shape[0] <= MAX_ROWS
            or x.dtype != jnp.float32 or w.dtype != jnp.float32):
        return x @ (w.T if transposed else w)
    n = w.shape[0] if transposed else w.shape[1]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32), vmap_method="sequential")
    return call(x, w)
