"""Paged attention over a block-table KV cache: the pure-jnp reference.

The model calls `write_kv` then `ragged_paged_attention` once per layer. The cache of all layers
is one array `[num_layers, num_blocks, block_size, num_kv_heads, head_dim]`; a token in slot
`s` lives in block `s // block_size` at offset `s % block_size`, all its KV heads together.
A quantized cache keeps each of K and V as a `QuantizedKV` (values and per-token scales,
`quantized_kv.py`), quantized in `write_kv` and widened to float32 as a chunk is read.

The batch is ragged: sequence `i` brings `query_lens[i]` new tokens, flattened in `q` from
`query_start[i]`, and attends causally to its `context_lens[i]` cached tokens (the new ones
included, as `write_kv` ran first), or, where `key_ends` says so, also to the later tokens of
its image (bidirectional attention inside an image, whose tokens all arrive in one step); with a
sliding `window` of W tokens, a query at position p sees only the keys at positions p - W + 1 and
later (HF's and Mistral's convention: W keys, itself included); with a `softcap` c, each score s (q . k times the scale) becomes c * tanh(s / c)
before the softmax (Gemma 2's attention logit soft-capping); with `sinks` (one logit per query head,
gpt-oss's attention sinks) each softmax's denominator also holds exp(sink), so a query may attend
to less than all of its value (the sink has no value). Rows that bring one token (decodes) come first, row `i`
holding flat token `i`; then the rows that bring more (prefill chunks), then padding rows
(`query_lens` 0). Which rows are which is data, not shape: one compiled step serves every mix of
decodes and prefills of its token count.

The reference walks each context in chunks of `KV_CHUNK_TOKENS` keys with an online softmax
(FlashAttention, Dao et al. 2022), stopping after the last chunk any query can see, so a step
costs what its live context costs, whatever the block tables' padded width. Decode rows go
together, one query each; prefill rows go one at a time, in tiles of `QUERY_TILE` queries. A
chunk a query cannot see leaves its softmax state bit for bit as it was, so a token's attention
does not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.quantized_kv import QuantizedKV, dequantize, from_storage, is_quantized, quantize, to_storage

KV_CHUNK_TOKENS = 128  # keys per step of the online softmax (whole blocks)
QUERY_TILE = 32  # prefill queries per tile
_RUNNING_MAX_INIT = -1e30  # finite: a fully masked chunk then leaves the state unchanged
NO_WINDOW = 2**30  # the span of a layer without a sliding window: longer than any context


@dataclass(frozen=True)
class AttentionMetadata:
    """Where a step's tokens go and what they attend to (all int32 arrays; a jax pytree).

    T is the step's padded token count and S its padded row count.
    """

    slot_mapping: jax.Array  # [T] cache slot of each new token, -1 for padding tokens
    block_tables: jax.Array  # [S, max_blocks] each row's blocks, in order (padding: block 0)
    context_lens: jax.Array  # [S] cached tokens after this step's write
    query_start: jax.Array  # [S] first flattened token of each row
    query_lens: jax.Array  # [S] new tokens of each row (0 for padding rows)
    # [T] one past the last key position each new token sees, or None: every token sees up to
    # itself (causal). A token inside an image that a model reads bidirectionally (Gemma 3's
    # prefix-LM mask) sees up to its image's end; the others their position + 1.
    key_ends: jax.Array | None = None


jax.tree_util.register_dataclass(
    AttentionMetadata,
    data_fields=["slot_mapping", "block_tables", "context_lens", "query_start", "query_lens", "key_ends"],
    meta_fields=[],
)


def write_kv(k_cache, v_cache, layer, k, v, slot_mapping):
    """Store the new tokens' K/V `[T, kv_heads, head_dim]` of one layer into their slots
    (quantized first where the cache is a `QuantizedKV`)."""
    num_blocks, block_size = k_cache.shape[1], k_cache.shape[2]
    block = jnp.where(slot_mapping >= 0, slot_mapping // block_size, num_blocks)
    offset = slot_mapping % block_size

    def write(cache, x):
        if not is_quantized(cache):
            return cache.at[layer, block, offset].set(to_storage(x, cache.dtype), mode="drop")
        values, scales = quantize(x, cache.dtype)
        return QuantizedKV(cache.values.at[layer, block, offset].set(values, mode="drop"),
                           cache.scales.at[layer, block, offset].set(scales, mode="drop"))

    return write(k_cache, k), write(v_cache, v)


def paged_attention_layer(attend):
    """One layer's paged attention: write the step's K/V into the cache, then `attend` over it.

    The returned function maps `(q, k, v, k_cache, v_cache, layer, md, scale, window=None,
    softcap=None, sinks=None)` to `(out, k_cache, v_cache)`; `attend` is the reference below or a
    Pallas kernel.
    """

    def attention_layer(q, k, v, k_cache, v_cache, layer, md: AttentionMetadata, scale: float, window=None,
                        softcap: float | None = None, sinks=None):
        k_cache, v_cache = write_kv(k_cache, v_cache, layer, k, v, md.slot_mapping)
        return attend(q, k_cache, v_cache, layer, md, scale, window=window, softcap=softcap, sinks=sinks), k_cache, v_cache

    return attention_layer


def window_span(window) -> jax.Array:
    """The keys a query sees back from itself (itself included), int32: `window` where it is > 0,
    else `NO_WINDOW`. `window` is None (no layer has one), or an int32 scalar (0: this layer has none)."""
    if window is None:
        return jnp.int32(NO_WINDOW)
    window = jnp.asarray(window, jnp.int32)
    return jnp.where(window > 0, window, NO_WINDOW)


def decode_rows(md: AttentionMetadata) -> jax.Array:
    """[S] bool: the rows that bring exactly one token (row `i` holds flat token `i`)."""
    return md.query_lens == 1


def prefill_row_range(md: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
    """`(first, stop)`: the rows that bring more than one token, which follow the decode rows."""
    first = jnp.sum(decode_rows(md), dtype=jnp.int32)
    return first, first + jnp.sum(md.query_lens > 1, dtype=jnp.int32)


def ragged_paged_attention(q, k_cache, v_cache, layer, md: AttentionMetadata, scale: float, window=None,
                           softcap: float | None = None, sinks=None):
    """Attention of `q [T, heads, head_dim]` over layer `layer` of the paged cache; `[T, heads,
    head_dim]` in q's dtype (padding tokens: zeros). `window`: None, or this layer's sliding
    window in tokens as an int32 scalar (0: none); `softcap`: None, or the cap of the scores;
    `sinks`: None, or float32 `[heads]`, each head's sink logit (in the scaled scores' units)."""
    num_rows = md.block_tables.shape[0]
    decodes = decode_rows(md)
    span = window_span(window)
    attended = _attend_decodes(q[:num_rows], k_cache, v_cache, layer, md.block_tables,
                               jnp.where(decodes, md.context_lens, 0), scale, span, softcap, sinks)
    out = jnp.zeros(q.shape, jnp.float32).at[:num_rows].set(
        jnp.where(decodes[:, None, None], attended, 0.0))
    out = _attend_prefills(out, q, k_cache, v_cache, layer, md, scale, span, softcap, sinks)
    return out.astype(q.dtype)


def soft_cap(scores, softcap: float | None):
    """`softcap * tanh(scores / softcap)`, or `scores` for None."""
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _kv_chunk(cache, layer, block_tables, chunk: jax.Array, pages_per_chunk: int):
    """Keys or values of context chunk `chunk` of each row: float32 `[rows, chunk_tokens, kv_heads, d]`."""
    rows, kv_heads, head_dim = block_tables.shape[0], cache.shape[3], cache.shape[4]
    pages = lax.dynamic_slice_in_dim(block_tables, chunk * pages_per_chunk, pages_per_chunk, axis=1)
    if is_quantized(cache):
        keys = dequantize(cache.values[layer, pages], cache.scales[layer, pages])
    else:
        keys = from_storage(cache[layer, pages]).astype(jnp.float32)
    return keys.reshape(rows, -1, kv_heads, head_dim)


def _pages_per_chunk(block_size: int, max_blocks: int) -> int:
    return max(1, min(KV_CHUNK_TOKENS // block_size, max_blocks))


def _padded_tables(block_tables, pages_per_chunk: int):
    """Widen the tables to whole chunks (block 0 fills; those keys are masked out)."""
    missing = -block_tables.shape[1] % pages_per_chunk
    return jnp.pad(block_tables, ((0, 0), (0, missing))) if missing else block_tables


def _softmax_step(state, scores, values):
    """Fold `scores [..., L]` and `values [..., L, d]` (as `einsum` pairs them) into
    `(acc [..., d], running_max [...], running_sum [...])`."""
    acc, running_max, running_sum = state
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    rescale = jnp.exp(running_max - new_max)
    probs = jnp.exp(scores - new_max[..., None])
    return acc * rescale[..., None] + values(probs), new_max, running_sum * rescale + probs.sum(axis=-1)


def _finish(state, sinks=None):
    """The attention output of an online softmax's final state; with `sinks` (broadcasting against
    the running max), each softmax's denominator also holds exp(sink)."""
    acc, running_max, total = state
    if sinks is not None:
        new_max = jnp.maximum(running_max, sinks)
        rescale = jnp.exp(running_max - new_max)
        acc, total = acc * rescale[..., None], total * rescale + jnp.exp(sinks - new_max)
    return acc / jnp.where(total > 0, total, 1.0)[..., None]


def _grouped_sinks(sinks, num_kv_heads: int):
    """`sinks [heads]` as `[kv_heads, group]` (the queries' grouped layout), float32; None stays None."""
    return None if sinks is None else jnp.asarray(sinks, jnp.float32).reshape(num_kv_heads, -1)


def _attend_decodes(q, k_cache, v_cache, layer, block_tables, context_lens, scale, span, softcap, sinks=None):
    """One query per row, `q [S, heads, head_dim]` over the last `span` of its `context_lens [S]`
    keys (0: none)."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[3], k_cache.shape[2]
    pages = _pages_per_chunk(block_size, block_tables.shape[1])
    tables = _padded_tables(block_tables, pages)
    chunk_tokens = pages * block_size
    q = q.astype(jnp.float32).reshape(rows, num_kv_heads, num_heads // num_kv_heads, head_dim) * scale

    def step(chunk, state):
        keys = _kv_chunk(k_cache, layer, tables, chunk, pages)
        values = _kv_chunk(v_cache, layer, tables, chunk, pages)
        scores = soft_cap(jnp.einsum("nkgd,nlkd->nkgl", q, keys), softcap)
        key_pos = chunk * chunk_tokens + jnp.arange(chunk_tokens)
        visible = (key_pos[None, :] < context_lens[:, None]) & (key_pos[None, :] >= context_lens[:, None] - span)
        scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
        return _softmax_step(state, scores, lambda probs: jnp.einsum("nkgl,nlkd->nkgd", probs, values))

    state = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], _RUNNING_MAX_INIT, jnp.float32),
             jnp.zeros(q.shape[:-1], jnp.float32))
    num_chunks = (jnp.max(context_lens) + chunk_tokens - 1) // chunk_tokens
    # Chunks wholly before every row's window leave the state as it was: skipped.
    first_key = jnp.min(jnp.where(context_lens > 0, jnp.maximum(context_lens - span, 0), NO_WINDOW))
    first_chunk = jnp.minimum(first_key // chunk_tokens, num_chunks)
    state = lax.fori_loop(first_chunk, num_chunks, step, state)
    return _finish(state, _grouped_sinks(sinks, num_kv_heads)).reshape(rows, num_heads, head_dim)


def _attend_prefills(out, q, k_cache, v_cache, layer, md: AttentionMetadata, scale, span, softcap, sinks=None):
    """Write into `out [T, heads, head_dim]` (float32) the attention of the prefill rows' tokens."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[3], k_cache.shape[2]
    group = num_heads // num_kv_heads
    tile = min(QUERY_TILE, num_tokens)
    pages = _pages_per_chunk(block_size, md.block_tables.shape[1])
    tables = _padded_tables(md.block_tables, pages)
    chunk_tokens = pages * block_size
    # Padded so that a tile starting at any token stays in bounds.
    q = jnp.pad(q.astype(jnp.float32) * scale, ((0, tile), (0, 0), (0, 0)))
    q = q.reshape(num_tokens + tile, num_kv_heads, group, head_dim)
    out = jnp.pad(out, ((0, tile), (0, 0), (0, 0)))
    key_ends = None if md.key_ends is None else jnp.pad(md.key_ends, (0, tile))

    def attend_tile(row, first_query, out):
        query_len, context_len = md.query_lens[row], md.context_lens[row]
        start = md.query_start[row] + first_query
        queries = lax.dynamic_slice_in_dim(q, start, tile)  # [tile, kv, g, d]
        offset = first_query + jnp.arange(tile)
        query_pos = context_len - query_len + offset
        ends = query_pos + 1 if key_ends is None else lax.dynamic_slice_in_dim(key_ends, start, tile)
        ends = jnp.where(offset < query_len, jnp.clip(ends, query_pos + 1, context_len), 0)
        row_table = lax.dynamic_slice_in_dim(tables, row, 1)

        def step(chunk, state):
            keys = _kv_chunk(k_cache, layer, row_table, chunk, pages)[0]
            values = _kv_chunk(v_cache, layer, row_table, chunk, pages)[0]
            scores = soft_cap(jnp.einsum("qkgd,lkd->qkgl", queries, keys), softcap)
            key_pos = chunk * chunk_tokens + jnp.arange(chunk_tokens)
            visible = (key_pos[None, :] < ends[:, None]) & (key_pos[None, :] > query_pos[:, None] - span)
            visible = visible[:, None, None, :]
            scores = jnp.where(visible, scores, -jnp.inf)
            return _softmax_step(state, scores, lambda probs: jnp.einsum("qkgl,lkd->qkgd", probs, values))

        state = (jnp.zeros(queries.shape, jnp.float32),
                 jnp.full(queries.shape[:-1], _RUNNING_MAX_INIT, jnp.float32),
                 jnp.zeros(queries.shape[:-1], jnp.float32))
        num_chunks = (jnp.max(ends) + chunk_tokens - 1) // chunk_tokens
        first_chunk = jnp.maximum(context_len - query_len + first_query - span + 1, 0) // chunk_tokens
        state = lax.fori_loop(first_chunk, num_chunks, step, state)
        attended = _finish(state, _grouped_sinks(sinks, num_kv_heads)).reshape(tile, num_heads, head_dim)
        kept = lax.dynamic_slice_in_dim(out, start, tile)
        attended = jnp.where((offset < query_len)[:, None, None], attended, kept)
        return lax.dynamic_update_slice_in_dim(out, attended, start, axis=0)

    def attend_row(row, out):
        num_tiles = (md.query_lens[row] + tile - 1) // tile
        return lax.fori_loop(0, num_tiles, lambda t, out: attend_tile(row, t * tile, out), out)

    first, stop = prefill_row_range(md)
    return lax.fori_loop(first, stop, attend_row, out)[:num_tokens]
