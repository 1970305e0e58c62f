"""Flash-decoding: paged attention for one new token per sequence, split across the context.

A decode step has a single query token per sequence, so one program per (sequence, KV head)
leaves most of the GPU idle when the batch is small and contexts are long. This kernel also
splits each context into `num_splits` ranges of whole page chunks: program (sequence, KV head,
split) runs an online softmax over its range for all query heads of the KV head, and writes the
unnormalised partial result with its running max and sum. `merge_splits` (plain jnp, tiny)
then combines the splits exactly.

Building blocks (page-chunk gathers, the online-softmax step, Triton shape rules) are shared
with the ragged kernel in `ragged_paged_attention.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged_paged_attention import (
    LOG2E,
    KVChunking,
    QueryTile,
    cache_operands,
    check_supported,
    default_num_warps,
    default_tile_sizes,
    initial_softmax_state,
    layer_operand,
    load_kv_chunk,
    online_softmax_step,
    scaled_scores,
    triton_compiler_params,
)

# Enough programs to keep every SM of a current GPU busy (132 SMs on an H100, a few each).
TARGET_PROGRAMS = 512


def choose_num_splits(batch: int, num_kv_heads: int, max_chunks: int, target_programs: int = TARGET_PROGRAMS) -> int:
    """Context splits per (sequence, KV head): enough programs to fill the GPU, never empty ones."""
    wanted = pl.cdiv(target_programs, batch * num_kv_heads)
    chunks_per_split = pl.cdiv(max_chunks, max(1, min(wanted, max_chunks)))
    return pl.cdiv(max_chunks, chunks_per_split)


def _decode_kernel(layer_ref, block_tables_ref, context_lens_ref, q_ref, k_ref, v_ref, k_scale_ref, v_scale_ref,
                   acc_ref, max_ref, sum_ref, *,
                   tile: QueryTile, chunking: KVChunking, chunks_per_split: int, scale: float,
                   softcap: float | None):
    seq, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, span = layer_ref[0], layer_ref[1]
    context_len = context_lens_ref[seq]
    queries = plgpu.load(tile.view(q_ref, seq, kv_head), mask=tile.mask(1), other=0)
    queries = queries.reshape(tile.rows, tile.padded_dim)

    def chunk_step(chunk, state):
        pages = block_tables_ref[seq, pl.ds(chunk * chunking.pages_per_chunk, chunking.pages_per_chunk)]
        keys = load_kv_chunk(k_ref, k_scale_ref, layer, pages, kv_head, tile.head_dim, tile.padded_dim,
                             queries.dtype)
        key_pos = chunk * chunking.tokens + jnp.arange(chunking.tokens)
        visible = (key_pos[None, :] < context_len) & (key_pos[None, :] >= context_len - span)
        scores = jnp.where(visible, scaled_scores(queries, keys, scale, softcap), -jnp.inf)
        values = load_kv_chunk(v_ref, v_scale_ref, layer, pages, kv_head, tile.head_dim, tile.padded_dim,
                               queries.dtype)
        return online_softmax_step(state, scores, values)

    first_chunk = split * chunks_per_split
    stop_chunk = jnp.minimum(first_chunk + chunks_per_split, pl.cdiv(context_len, chunking.tokens))
    first_chunk = jnp.maximum(first_chunk, jnp.maximum(context_len - span, 0) // chunking.tokens)
    state = initial_softmax_state(tile.rows, tile.padded_dim)
    acc, running_max, running_sum = lax.fori_loop(first_chunk, stop_chunk, chunk_step, state)
    acc_ref[...] = acc
    max_ref[...] = running_max
    sum_ref[...] = running_sum


def merge_splits(acc, running_max, running_sum, sinks=None):
    """Combine per-split `acc [..., splits, R, D]`, `max`/`sum [..., splits, R]` (log2 units);
    `sinks [..., 1, R]` (log2 units, broadcasting), where given, join as one more split whose
    max is the sink, sum 1 and acc zero: each row's sink logit in its denominator."""
    if sinks is not None:
        sinks = jnp.broadcast_to(sinks, (*running_max.shape[:-2], 1, running_max.shape[-1]))
        running_max = jnp.concatenate([running_max, sinks], axis=-2)
        running_sum = jnp.concatenate([running_sum, jnp.ones_like(sinks)], axis=-2)
        acc = jnp.concatenate([acc, jnp.zeros((*sinks.shape, acc.shape[-1]), acc.dtype)], axis=-3)
    overall_max = running_max.max(axis=-2, keepdims=True)
    weight = jnp.exp2(running_max - overall_max)
    total = (running_sum * weight).sum(axis=-2)
    out = (acc * weight[..., None]).sum(axis=-3)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def paged_decode_attention_kernel(q, k_cache, v_cache, layer, block_tables, context_lens, scale: float,
                                  window=None, softcap: float | None = None, sinks=None, *,
                                  num_splits: int | None = None, chunk_tokens: int | None = None,
                                  num_warps: int | None = None, num_stages: int = 2,
                                  interpret: bool = False) -> jax.Array:
    """Attention of one query token per sequence, `q [B, heads, head_dim]`, over its paged context.

    `block_tables [B, max_blocks]` and `context_lens [B]` (tokens to attend to, the new one
    included; 0 for padding rows, whose output is zeros) describe each sequence's context in
    layer `layer` of the stacked cache `[num_layers, num_blocks, block_size, kv_heads, head_dim]`
    (or a `quantized_kv.QuantizedKV`); `window`, `softcap` and `sinks` as the reference takes them
    (the sinks join when the splits are merged).
    `num_splits` defaults to enough context splits to fill a GPU; the tiling defaults as the
    ragged kernel's does.
    """
    check_supported(q, k_cache)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[3]
    tile = QueryTile.choose(num_heads // num_kv_heads, head_dim, max_query_len=1, target_rows=1)
    chunking = KVChunking.for_cache(k_cache.shape[2], chunk_tokens or default_tile_sizes(q.dtype, head_dim)[1])
    num_warps = num_warps or default_num_warps(tile.rows, tile.padded_dim, q.dtype)
    max_chunks = chunking.chunks_for(block_tables.shape[1])
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_chunks)
    chunks_per_split = pl.cdiv(max_chunks, num_splits)
    block_tables = chunking.pad_block_tables(block_tables, num_splits * chunks_per_split)

    rows, dim = tile.rows, tile.padded_dim
    partial_shape = (batch, num_kv_heads, num_splits)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    kernel = functools.partial(_decode_kernel, tile=tile, chunking=chunking,
                               chunks_per_split=chunks_per_split, scale=scale, softcap=softcap)
    acc, running_max, running_sum = pl.pallas_call(
        kernel,
        grid=partial_shape,
        in_specs=[whole] * 8,
        out_specs=[
            pl.BlockSpec((None, None, None, rows, dim), lambda s, h, p: (s, h, p, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, h, p: (s, h, p, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, h, p: (s, h, p, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, rows, dim), jnp.float32),
            jax.ShapeDtypeStruct((*partial_shape, rows), jnp.float32),
            jax.ShapeDtypeStruct((*partial_shape, rows), jnp.float32),
        ],
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"paged_decode_attention_h{tile.head_slots}_p{chunking.pages_per_chunk}_s{num_splits}",
    )(layer_operand(layer, window), block_tables, context_lens, q, *cache_operands(k_cache, v_cache))
    real_heads = slice(0, tile.group)
    sink_rows = None if sinks is None else (jnp.asarray(sinks, jnp.float32) * LOG2E).reshape(num_kv_heads, 1, -1)
    out = merge_splits(acc[..., real_heads, :head_dim], running_max[..., real_heads], running_sum[..., real_heads],
                       sink_rows)
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)
