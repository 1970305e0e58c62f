"""Paged decode attention as a Mosaic GPU kernel (Hopper, sm_90+): the decode path of the
`pallas` attention backend on GPUs and jax versions that have Mosaic GPU.

Same contract as `decode_attention.paged_decode_attention_kernel` (the Triton-style kernel that
pre-Hopper GPUs keep): one query token per sequence, `q [B, heads, head_dim]`, attends to its
`context_lens[b]` cached tokens of layer `layer`, reached through `block_tables [B, max_blocks]`
in the stacked cache `[num_layers, num_blocks, block_size, kv_heads, head_dim]`.

One CUDA block (one warpgroup, 128 threads) handles one (sequence, KV head). The GQA group's
queries sit in the first rows of a 64-row tile in shared memory, the rest zeros: WGMMA wants
M = 64. The context is walked in chunks of `chunk_tokens` (at least 64) tokens; each chunk is
`pages_per_chunk` TMA copies of one page's `[block_size, head_dim]` slice for this KV head,
gathered through the block table into one swizzled shared-memory tile. Scores are
`q_tile @ k_chunk^T` on WGMMA, an online softmax in float32 registers (log2 units), then
`probs @ v_chunk` on WGMMA into a float32 accumulator. Copies and matmuls are not yet
overlapped (no pipelining, no split-K, no warp specialization): a first, checkable version.

Limits (`mosaic_unsupported_reason` says which one a shape hits): 16-bit float dtypes (WGMMA's
float32 path is TF32, not the full precision the engine asks for), head_dim a multiple of 64
(the 128-byte swizzle of a WGMMA operand row), block_size a power of two from 8 to 256.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # a jax without Mosaic GPU Pallas
    plgpu = None

LOG2E = math.log2(math.e)
WGMMA_ROWS = 64  # WGMMA's M: the query tile's rows, GQA group first, zeros after
SWIZZLE_BYTES = 128
MIN_CHUNK_TOKENS = 64  # WGMMA's K for probs @ v: a whole 128-byte swizzle of 16-bit elements
MAX_CHUNK_TOKENS = 256  # WGMMA's N for q @ k^T
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
# Finite start of the running max, as in the Triton kernels: exp2(-inf - -inf) would be NaN.
RUNNING_MAX_INIT = -1e30


def runs_here() -> bool:
    """Whether this process's first device can run the kernel: a CUDA GPU of compute capability
    9.0 or newer, and a jax with Mosaic GPU."""
    try:
        return (plgpu is not None and jax.default_backend() == "gpu"
                and float(jax.devices()[0].compute_capability) >= 9.0)
    except (AttributeError, ValueError):  # no such attribute, or a ROCm architecture name
        return False


def mosaic_unsupported_reason(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                              dtype) -> str | None:
    """Why the Mosaic GPU decode kernel cannot run this shape, or None when it can."""
    if plgpu is None:
        return "this jax has no jax.experimental.pallas.mosaic_gpu"
    if jnp.dtype(dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float16"
    if head_dim % 64:
        return f"head_dim {head_dim} is not a multiple of 64"
    if num_heads % num_kv_heads:
        return f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    if num_heads // num_kv_heads > WGMMA_ROWS:
        return f"GQA group {num_heads // num_kv_heads} is over {WGMMA_ROWS}"
    if block_size & (block_size - 1) or not 8 <= block_size <= MAX_CHUNK_TOKENS:
        return f"block_size {block_size} is not a power of two from 8 to {MAX_CHUNK_TOKENS}"
    return None


def _operand_transforms(dtype):
    """Tiling and swizzle that make a `[rows, 64 * k]` shared-memory tile a WGMMA operand."""
    swizzle_elems = SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(SWIZZLE_BYTES)


def _query_key_scores(q_smem, k_smem, interpreted: bool):
    """`q_tile [64, D] @ k_chunk [T, D]^T` in float32, on WGMMA (k read transposed from SMEM)."""
    if interpreted:
        # jax's GPU interpreter (0.10.2 to 0.11) cannot read a transposed WGMMA operand.
        return lax.dot_general(q_smem[...], k_smem[...], (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)

    def scores_scope(scores_ref):
        plgpu.wgmma(scores_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
        return scores_ref[...]

    return pl.run_scoped(scores_scope, plgpu.ACC((WGMMA_ROWS, k_smem.shape[0]), jnp.float32))


def _decode_body(layer_ref, block_tables_ref, context_lens_ref, q_ref, k_ref, v_ref, out_ref,
                 q_smem, k_smem, v_smem, p_smem, q_barrier, k_barrier, v_barrier, *,
                 block_size: int, pages_per_chunk: int, scale: float, interpreted: bool):
    seq, kv_head = lax.axis_index("seq"), lax.axis_index("kv_head")
    chunk_tokens = block_size * pages_per_chunk
    head_dim = q_smem.shape[1]
    layer = layer_ref[0]
    context_len = context_lens_ref[seq]

    plgpu.copy_gmem_to_smem(q_ref.at[seq, kv_head], q_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)

    def fetch(cache_ref, smem, barrier, chunk):
        for j in range(pages_per_chunk):
            page = block_tables_ref[seq, chunk * pages_per_chunk + j]
            plgpu.copy_gmem_to_smem(cache_ref.at[layer, page, :, kv_head, :],
                                    smem.at[pl.ds(j * block_size, block_size)], barrier)

    def chunk_step(chunk, state):
        acc, running_max, running_sum = state
        fetch(k_ref, k_smem, k_barrier, chunk)
        fetch(v_ref, v_smem, v_barrier, chunk)
        plgpu.barrier_wait(k_barrier)

        scores = _query_key_scores(q_smem, k_smem, interpreted)
        key_pos = chunk * chunk_tokens + lax.broadcasted_iota(jnp.int32, (WGMMA_ROWS, chunk_tokens), 1)
        scores = jnp.where(key_pos < context_len, scores * (scale * LOG2E), -jnp.inf)
        new_max = jnp.maximum(running_max, scores.max(axis=1))
        rescale = jnp.exp2(running_max - new_max)
        probs = jnp.exp2(scores - lax.broadcast_in_dim(new_max, scores.shape, [0]))
        running_sum = running_sum * rescale + probs.sum(axis=1)
        p_smem[...] = probs.astype(p_smem.dtype)
        plgpu.commit_smem()
        plgpu.barrier_wait(v_barrier)

        def chunk_out_scope(chunk_out_ref):
            plgpu.wgmma(chunk_out_ref, p_smem, v_smem)
            return chunk_out_ref[...]

        chunk_out = pl.run_scoped(chunk_out_scope, plgpu.ACC((WGMMA_ROWS, head_dim), jnp.float32))
        acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0]) + chunk_out
        return acc, new_max, running_sum

    state = (jnp.zeros((WGMMA_ROWS, head_dim), jnp.float32),
             jnp.full((WGMMA_ROWS,), RUNNING_MAX_INIT, jnp.float32),
             jnp.zeros((WGMMA_ROWS,), jnp.float32))
    acc, _, running_sum = lax.fori_loop(0, pl.cdiv(context_len, chunk_tokens), chunk_step, state)
    total = jnp.where(running_sum > 0, running_sum, 1.0)
    q_smem[...] = (acc / lax.broadcast_in_dim(total, acc.shape, [0])).astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, out_ref.at[seq, kv_head])
    plgpu.wait_smem_to_gmem(0)


def mosaic_paged_decode_attention(q, k_cache, v_cache, layer, block_tables, context_lens, scale: float, *,
                                  chunk_tokens: int | None = None, interpret=None) -> jax.Array:
    """Attention of one query token per sequence, `q [B, heads, head_dim]`, over its paged context.

    Arguments and result as `paged_decode_attention_kernel`: the stacked caches
    `[num_layers, num_blocks, block_size, kv_heads, head_dim]` in q's dtype, `block_tables
    [B, max_blocks]` and `context_lens [B]` int32 (0 for padding rows, whose output is zeros);
    returns `[B, heads, head_dim]` in q's dtype. `chunk_tokens` (a multiple of 64 and of the
    block size, at most 256) defaults to max(64, block_size). `interpret` is passed to
    `plgpu.kernel` (an `InterpretGPUParams` runs it on a CPU). Raises ValueError on a shape or
    dtype the kernel cannot run (see `mosaic_unsupported_reason`).
    """
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_dim = k_cache.shape
    reason = mosaic_unsupported_reason(num_heads, num_kv_heads, head_dim, block_size, q.dtype)
    if reason:
        raise ValueError(reason)
    if cache_dim != head_dim or k_cache.dtype != q.dtype or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {k_cache.shape} {k_cache.dtype} / {v_cache.shape} do not match "
                         f"queries {q.shape} {q.dtype}")
    chunk_tokens = chunk_tokens or max(MIN_CHUNK_TOKENS, block_size)
    if chunk_tokens % MIN_CHUNK_TOKENS or chunk_tokens % block_size or chunk_tokens > MAX_CHUNK_TOKENS:
        raise ValueError(f"chunk_tokens {chunk_tokens} must be a multiple of {MIN_CHUNK_TOKENS} and of "
                         f"block_size {block_size}, at most {MAX_CHUNK_TOKENS}")
    pages_per_chunk = chunk_tokens // block_size
    group = num_heads // num_kv_heads

    # Whole chunks of table entries (page 0 fills; its keys are masked out by position).
    missing = -block_tables.shape[1] % pages_per_chunk
    block_tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, missing)))
    q_tiles = jnp.pad(q.reshape(batch, num_kv_heads, group, head_dim),
                      ((0, 0), (0, 0), (0, WGMMA_ROWS - group), (0, 0)))
    transforms = _operand_transforms(q.dtype)
    kernel = plgpu.kernel(
        functools.partial(_decode_body, block_size=block_size, pages_per_chunk=pages_per_chunk, scale=scale,
                          interpreted=bool(interpret)),
        out_type=jax.ShapeDtypeStruct(q_tiles.shape, q.dtype),
        scratch_types=[
            plgpu.SMEM((WGMMA_ROWS, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((chunk_tokens, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((chunk_tokens, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((WGMMA_ROWS, chunk_tokens), q.dtype, transforms=transforms),
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=pages_per_chunk),
            plgpu.Barrier(num_arrivals=pages_per_chunk),
        ],
        grid=(batch, num_kv_heads),
        grid_names=("seq", "kv_head"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
        kernel_name=f"mosaic_paged_decode_attention_p{pages_per_chunk}",
    )
    out = kernel(jnp.reshape(layer, (1,)).astype(jnp.int32), block_tables, context_lens.astype(jnp.int32),
                 q_tiles, k_cache, v_cache)
    return out[:, :, :group].reshape(batch, num_heads, head_dim)
