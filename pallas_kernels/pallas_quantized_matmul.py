"""Weight-only quantized matmul as a Triton-style Pallas kernel: the decode-sized product on GPU.

Same contract as `quantized_matmul.quantized_matmul` (the pure-jnp reference): activations
`x [M, K]` (float32 or bfloat16) times a quantized weight `w [N, K]` (int8 or float8_e4m3fn, one
row per output channel) with grouped float32 scales `scale [N, G]` (G = `num_groups(K)`: one per
output channel and group of `GROUP_SIZE` inputs, or per channel), giving `[M, N]` in x's dtype.

In a decode step M is the handful of new tokens, so the product is bound by reading the weight:
XLA's route (widen the weight to x's dtype, then a dense matmul) reads it at its own width and
writes and reads again a widened copy, or at best streams it through a generic GEMM tiling made
for large M. This kernel reads each weight byte once, at its own width, and widens it in
registers: the idea of weight-streaming GEMV kernels for quantized weights (Marlin-style kernels,
split-K GEMVs written in Triton), done here in Pallas with Triton's own pipelining.

Design. One program owns a tile of `block_n` output channels. It walks K in steps of `block_k`,
each step in sub-tiles of one scale group (`GROUP_SIZE` inputs; the whole step where G = 1): it
loads the `[block_n, group]` tile of the weight (int8 / fp8), widens it to x's dtype (exact for
both), multiplies it by the matching `[block_m, group]` tile of x in float32 (tensor cores for
bfloat16; exact float32 on FMA units for float32) and adds the product, each column times its
channel's scale for that group, to a float32 accumulator; where G = 1 the scale multiplies the
accumulator once at the end instead. The result is stored in x's dtype, rounded once. `block_k`
is a multiple of `GROUP_SIZE` where G > 1, so no group straddles two steps. Triton matmuls want
power-of-two sides of at least 16, so the M rows are padded up to `block_m` (16, 32 or 64) with
masked loads, and loads and stores are masked where N or K is not a multiple of the tile.

When N gives too few tiles to fill the GPU (a small model's 576-wide projections), K is split
too (split-K): program (tile, split) covers `blocks_per_split` steps of K and writes a float32
partial product; the partials are summed in plain jnp. The split count is capped so that the
partials stay a small fraction of the weight's bytes.

`select_quantized_linear` is the switch the model runner uses: on a GPU the kernel for bfloat16
activations up to `MAX_ROWS` rows where it measured faster (`gpu_prefers_kernel`), XLA on the
dequantized weight otherwise (prefill, where the product is compute-bound and XLA's GEMMs are the
better tool, and small weights past a few rows); the reference elsewhere.
Weights with leading axes (experts `[E, N, K]`) are not this kernel's job: the model widens them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.backend import GPU_PLATFORMS
from pallas_kernels.float8 import widen_fp8_bits
from pallas_kernels.quantized_matmul import GROUP_SIZE, num_groups, quantized_matmul
from pallas_kernels.ragged_paged_attention import MIN_DOT_SIDE, dot_precision, next_power_of_2, triton_compiler_params

MAX_ROWS = 64  # the kernel takes products of up to this many rows ("decode-sized")
SMALL_WEIGHT = 1 << 22  # K x N below this: on a GPU the kernel takes up to SMALL_WEIGHT_ROWS rows only
SMALL_WEIGHT_ROWS = 8
WEIGHT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
ACTIVATION_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Programs that keep every SM of a current GPU busy (132 SMs on an H100 / H200, two each).
TARGET_PROGRAMS = 264
# Split-K partials (float32, written then read back) may cost at most this share of the weight's bytes.
MAX_PARTIAL_SHARE = 0.25


@dataclass(frozen=True)
class Tiling:
    """How the product `[rows, n] = [rows, k] @ [n, k]^T` is cut into programs."""

    rows: int
    n: int
    k: int
    block_m: int
    block_n: int
    block_k: int
    splits: int
    blocks_per_split: int

    @property
    def n_tiles(self) -> int:
        return pl.cdiv(self.n, self.block_n)

    @property
    def k_blocks(self) -> int:
        return pl.cdiv(self.k, self.block_k)

    @property
    def groups(self) -> int:
        """Scales per output channel (`num_groups(k)`)."""
        return num_groups(self.k)

    @property
    def sub_k(self) -> int:
        """Inputs per sub-tile of a K step: one scale group, or the whole step where G = 1."""
        return GROUP_SIZE if self.groups > 1 else self.block_k


def default_block_sizes(x_dtype) -> tuple[int, int]:
    """`(block_n, block_k)`: float32 widens the weight tile to 4 bytes an element in registers and
    multiplies on FMA units, so it takes a narrower K step than bfloat16."""
    return (32, 32) if jnp.dtype(x_dtype) == jnp.float32 else (64, 128)


def choose_splits(rows: int, n_tiles: int, k_blocks: int, k: int, weight_itemsize: int,
                  target_programs: int = TARGET_PROGRAMS) -> int:
    """K splits per output tile: enough programs to fill the GPU, never an empty split, and float32
    partials (`splits * rows * 4` bytes a column, written and read) within `MAX_PARTIAL_SHARE` of
    the weight's `k * weight_itemsize` bytes a column."""
    by_traffic = int(MAX_PARTIAL_SHARE * k * weight_itemsize // (8 * max(rows, 1)))
    wanted = max(1, min(k_blocks, target_programs // n_tiles, by_traffic))
    return pl.cdiv(k_blocks, pl.cdiv(k_blocks, wanted))


def default_num_warps(block_m: int, x_dtype) -> int:
    """Four warps, eight for float32 tiles of 64 rows: at four, Triton 3.6's full-precision float32
    product for 64 rows held 255 registers a thread and spilled on sm_90 (`tests/test_pallas_quantized_matmul.py`
    compiles each case)."""
    return 8 if jnp.dtype(x_dtype) == jnp.float32 and block_m >= 64 else 4


def choose_tiling(x_shape, w_shape, x_dtype, w_dtype, *, block_n: int | None = None, block_k: int | None = None,
                  split_k: int | None = None) -> Tiling:
    """The tiling for `x [M, K]` times `w [N, K]`; sizes left as None take the defaults. ValueError
    for a block size that is not a power of two of at least `MIN_DOT_SIDE`, a `block_k` that is
    not a multiple of `GROUP_SIZE` where K is (grouped scales), or `split_k` below 1."""
    (rows, k), n = x_shape, w_shape[0]
    default_n, default_k = default_block_sizes(x_dtype)
    block_n, block_k = block_n or default_n, block_k or default_k
    for name, size in (("block_n", block_n), ("block_k", block_k)):
        if size < MIN_DOT_SIDE or size & (size - 1):
            raise ValueError(f"{name} must be a power of two of at least {MIN_DOT_SIDE}, got {size}")
    if num_groups(k) > 1 and block_k % GROUP_SIZE:
        raise ValueError(f"block_k must be a multiple of {GROUP_SIZE} (one scale group) where K = {k} has "
                         f"grouped scales, got {block_k}")
    block_m = max(MIN_DOT_SIDE, next_power_of_2(rows))
    n_tiles, k_blocks = pl.cdiv(n, block_n), pl.cdiv(k, block_k)
    if split_k is None:
        split_k = choose_splits(rows, n_tiles, k_blocks, k, jnp.dtype(w_dtype).itemsize)
    if split_k < 1:
        raise ValueError(f"split_k must be at least 1, got {split_k}")
    blocks_per_split = pl.cdiv(k_blocks, min(split_k, k_blocks))
    return Tiling(rows, n, k, block_m, block_n, block_k, pl.cdiv(k_blocks, blocks_per_split), blocks_per_split)


def unsupported_reason(x, w, scale) -> str | None:
    """Why the kernel cannot take these operands (shapes, dtypes), or None when it can."""
    if x.ndim != 2 or w.ndim != 2:
        return (f"the kernel takes x [M, K] and w [N, K], got x of shape {x.shape} and w of shape {w.shape} "
                "(weights with leading axes are dequantized by the model)")
    if x.shape[1] != w.shape[1]:
        return f"x has K = {x.shape[1]} columns but w has K = {w.shape[1]}"
    want = (w.shape[0], num_groups(w.shape[1]))
    if tuple(scale.shape) != want:
        return (f"scale must have shape {want} (one per output channel and group of {GROUP_SIZE} inputs, or per "
                f"channel where K is not a multiple of {GROUP_SIZE}), got {tuple(scale.shape)}")
    if x.shape[0] > MAX_ROWS:
        return f"x has {x.shape[0]} rows; the kernel takes at most {MAX_ROWS} (decode-sized products)"
    if jnp.dtype(x.dtype) not in ACTIVATION_DTYPES:
        return f"x dtype {jnp.dtype(x.dtype).name} is not one of {', '.join(d.name for d in ACTIVATION_DTYPES)}"
    if jnp.dtype(w.dtype) not in WEIGHT_DTYPES:
        return f"w dtype {jnp.dtype(w.dtype).name} is not one of {', '.join(d.name for d in WEIGHT_DTYPES)}"
    return None


def native_fp8_conversion(device=None) -> bool:
    """Whether Triton can widen float8_e4m3fn in hardware on `device` (default: jax's first):
    CUDA sm_89 and newer. False sends fp8 weights through `widen_fp8_bits` instead."""
    capability = getattr(device or jax.devices()[0], "compute_capability", None)
    found = re.fullmatch(r"(\d+)\.(\d+)", str(capability))
    return found is None or (int(found.group(1)), int(found.group(2))) >= (8, 9)


def _widen(w, dtype, weight: str):
    """A weight tile loaded as int8 (fp8 weights as their bits) as `dtype`."""
    if weight == "fp8":
        return lax.bitcast_convert_type(w, jnp.float8_e4m3fn).astype(dtype)
    if weight == "fp8_bits":
        return widen_fp8_bits(w).astype(dtype)
    return w.astype(dtype)


def _kernel(x_ref, w_ref, scale_ref, out_ref, *, tiling: Tiling, weight: str):
    t = tiling
    n_tile, split = pl.program_id(0), pl.program_id(1)
    first_col = n_tile * t.block_n
    row_ok = jnp.arange(t.block_m) < t.rows
    col_ok = first_col + jnp.arange(t.block_n) < t.n
    precision = dot_precision(x_ref.dtype)
    k_ragged = t.k % t.block_k != 0

    def column_scales(group):
        """`[1, block_n]`: each column's scale for scale group `group`."""
        view = scale_ref.at[pl.ds(first_col, t.block_n), pl.ds(group, 1)]
        scale = plgpu.load(view, mask=col_ok[:, None], other=0) if t.n % t.block_n else plgpu.load(view)
        return scale.T

    def k_step(k_block, acc):
        for sub in range(t.block_k // t.sub_k):
            first_k = k_block * t.block_k + sub * t.sub_k
            k_ok = first_k + jnp.arange(t.sub_k) < t.k
            x_mask = row_ok[:, None] & k_ok[None, :] if k_ragged else row_ok[:, None]
            w_mask = _mask_and(col_ok[:, None] if t.n % t.block_n else None, k_ok[None, :] if k_ragged else None)
            x = plgpu.load(x_ref.at[pl.ds(0, t.block_m), pl.ds(first_k, t.sub_k)],
                           mask=jnp.broadcast_to(x_mask, (t.block_m, t.sub_k)), other=0)
            w_view = w_ref.at[pl.ds(first_col, t.block_n), pl.ds(first_k, t.sub_k)]
            w = plgpu.load(w_view) if w_mask is None else plgpu.load(
                w_view, mask=jnp.broadcast_to(w_mask, (t.block_n, t.sub_k)), other=0)
            product = lax.dot_general(x, _widen(w, x.dtype, weight), (((1,), (1,)), ((), ())), precision=precision,
                                      preferred_element_type=jnp.float32)
            if t.groups > 1:  # a sub-tile past K (all zeros) takes the last group's scales
                group = first_k // GROUP_SIZE
                product = product * column_scales(jnp.minimum(group, t.groups - 1) if k_ragged else group)
            acc = acc + product
        return acc

    first_block = split * t.blocks_per_split
    stop_block = jnp.minimum(first_block + t.blocks_per_split, t.k_blocks) if t.splits > 1 else t.k_blocks
    acc = lax.fori_loop(first_block, stop_block, k_step, jnp.zeros((t.block_m, t.block_n), jnp.float32))
    out = (acc if t.groups > 1 else acc * column_scales(0)).astype(out_ref.dtype)
    plgpu.store(out_ref.at[split, pl.ds(0, t.block_m), pl.ds(first_col, t.block_n)], out,
                mask=row_ok[:, None] & col_ok[None, :])


def _mask_and(a, b):
    if a is None or b is None:
        return b if a is None else a
    return a & b


def pallas_quantized_matmul(x, w, scale, *, interpret: bool = False, block_n: int | None = None,
                            block_k: int | None = None, split_k: int | None = None, num_warps: int | None = None,
                            num_stages: int = 3, native_fp8: bool | None = None) -> jax.Array:
    """`x [M, K]` (float32 / bfloat16) times `w [N, K]` (int8 / float8_e4m3fn) with grouped scales
    `scale [N, num_groups(K)]` (float32): `[M, N]` in x's dtype, as `quantized_matmul.quantized_matmul`,
    for M <= `MAX_ROWS`. Tiling left as None takes `default_block_sizes`, `choose_splits` and
    `default_num_warps`.
    `native_fp8` (default: `native_fp8_conversion()`) widens fp8 weights with Triton's conversion
    (sm_89+) rather than by integer arithmetic.
    Raises ValueError for shapes or dtypes the kernel does not take (`unsupported_reason`) and for
    tilings `choose_tiling` rejects."""
    reason = unsupported_reason(x, w, scale)
    if reason:
        raise ValueError(reason)
    if x.shape[0] == 0:
        return jnp.zeros((0, w.shape[0]), x.dtype)
    t = choose_tiling(x.shape, w.shape, x.dtype, w.dtype, block_n=block_n, block_k=block_k, split_k=split_k)
    out_dtype = x.dtype if t.splits == 1 else jnp.float32
    weight = "int8"
    if w.dtype == jnp.float8_e4m3fn:  # loaded as int8 bits: Triton cannot fill masked fp8 lanes
        weight = "fp8" if (native_fp8_conversion() if native_fp8 is None else native_fp8) else "fp8_bits"
        w = lax.bitcast_convert_type(w, jnp.int8)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_kernel, tiling=t, weight=weight),
        grid=(t.n_tiles, t.splits),
        in_specs=[whole] * 3,
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((t.splits, t.rows, t.n), out_dtype),
        compiler_params=triton_compiler_params(num_warps or default_num_warps(t.block_m, x.dtype), num_stages),
        interpret=interpret,
        name=f"quantized_matmul_{weight}_m{t.block_m}_n{t.block_n}_k{t.block_k}_s{t.splits}",
    )(x, w, scale.astype(jnp.float32))
    return out[0] if t.splits == 1 else out.sum(axis=0).astype(x.dtype)


def quantized_linear(x, w, scale, *, interpret: bool = False, max_rows: int = MAX_ROWS) -> jax.Array:
    """The kernel where it takes the operands and `x` has at most `max_rows` rows; else the
    reference (XLA's matmul on the widened weight)."""
    if x.shape[0] > max_rows or unsupported_reason(x, w, scale):
        return quantized_matmul(x, w, scale)
    return pallas_quantized_matmul(x, w, scale, interpret=interpret)


def gpu_prefers_kernel(x, w) -> bool:
    """Whether the compiled kernel is the faster product on a GPU, as measured on an H200
    (docs/BENCHMARKS.md, "GPU check"): for weights of 16M elements it beats XLA's matmul on the
    widened weight at every M up to 64 (1.2x to 2.3x), for a 1000 x 1000 weight only up to
    `SMALL_WEIGHT_ROWS` rows (0.6x to 0.8x from 16 rows, where both are launch-bound). float32
    activations stay with XLA: the same check found the float32 kernel cases failing."""
    if jnp.dtype(x.dtype) != jnp.bfloat16:
        return False
    return x.shape[0] <= SMALL_WEIGHT_ROWS or w.shape[0] * w.shape[1] >= SMALL_WEIGHT


def _gpu_quantized_linear(x, w, scale, *, max_rows: int) -> jax.Array:
    if not gpu_prefers_kernel(x, w):
        return quantized_matmul(x, w, scale)
    return quantized_linear(x, w, scale, max_rows=max_rows)


def select_quantized_linear(platform: str | None = None, interpret: bool = False, max_rows: int = MAX_ROWS):
    """The `(x, w, scale) -> [M, N]` product for `platform` (default: jax's default backend): on a
    GPU the kernel up to `max_rows` rows where `gpu_prefers_kernel`; in interpret mode (tests)
    the kernel wherever it takes the operands, up to `max_rows` rows; the reference otherwise."""
    platform = platform or jax.default_backend()
    max_rows = min(max_rows, MAX_ROWS)
    if interpret:
        return functools.partial(quantized_linear, interpret=True, max_rows=max_rows)
    if platform in GPU_PLATFORMS:
        return functools.partial(_gpu_quantized_linear, max_rows=max_rows)
    return quantized_matmul
