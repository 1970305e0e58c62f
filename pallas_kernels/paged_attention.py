"""Paged attention over a block-table KV cache: the pure-jnp reference.

The model calls `write_kv` then `ragged_paged_attention` once per layer. The cache of all layers
is one array `[num_layers, num_blocks, block_size, num_kv_heads, head_dim]`; a token in slot
`s` lives in block `s // block_size` at offset `s % block_size`, all its KV heads together.

The batch is ragged: sequence `i` brings `query_lens[i]` new tokens, flattened in `q` from
`query_start[i]`, and attends causally to its `context_lens[i]` cached tokens (the new ones
included, as `write_kv` ran first). Sequences `[0, num_decode_seqs)` are decodes: row `i` brings
at most one token, at flat index `i`. The rest are prefill chunks of at most `max_query_len`
tokens. The reference computes the two groups separately so a decode-heavy batch does not pay
for the longest prefill chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array  # [T] int32, -1 for padding tokens
    block_tables: jax.Array  # [S, max_blocks] int32
    context_lens: jax.Array  # [S] int32, cached tokens after this step's write
    query_start: jax.Array  # [S] int32, first flattened token of each sequence
    query_lens: jax.Array  # [S] int32, new tokens of each sequence (0 for padding)
    num_decode_seqs: int  # static: leading sequences with query_len <= 1
    max_query_len: int  # static: bound on query_lens of the other sequences


jax.tree_util.register_dataclass(
    AttentionMetadata,
    data_fields=["slot_mapping", "block_tables", "context_lens", "query_start", "query_lens"],
    meta_fields=["num_decode_seqs", "max_query_len"],
)


def write_kv(k_cache, v_cache, layer, k, v, slot_mapping):
    """Store the new tokens' K/V `[T, kv_heads, head_dim]` of one layer into their slots."""
    num_blocks, block_size = k_cache.shape[1], k_cache.shape[2]
    block = jnp.where(slot_mapping >= 0, slot_mapping // block_size, num_blocks)
    offset = slot_mapping % block_size
    k_cache = k_cache.at[layer, block, offset].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[layer, block, offset].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache


def paged_attention_layer(attend):
    """One layer's paged attention: write the step's K/V into the cache, then `attend` over it.

    The returned function maps `(q, k, v, k_cache, v_cache, layer, md, scale)` to
    `(out, k_cache, v_cache)`; `attend` is the reference below or a Pallas kernel.
    """

    def attention_layer(q, k, v, k_cache, v_cache, layer, md: AttentionMetadata, scale: float):
        k_cache, v_cache = write_kv(k_cache, v_cache, layer, k, v, md.slot_mapping)
        return attend(q, k_cache, v_cache, layer, md, scale), k_cache, v_cache

    return attention_layer


def ragged_paged_attention(q, k_cache, v_cache, layer, md: AttentionMetadata, scale: float):
    """Attention of `q [T, heads, head_dim]` over layer `layer` of the paged cache."""
    num_seqs, num_decode = md.block_tables.shape[0], md.num_decode_seqs
    out = jnp.zeros(q.shape, jnp.float32)
    if num_seqs > num_decode and md.max_query_len > 0:
        out = _attend_rows(out, q, k_cache, v_cache, layer, md, slice(num_decode, num_seqs), scale)
    if num_decode:
        out = out.at[:num_decode].set(_attend_decodes(q[:num_decode], k_cache, v_cache, layer, md, scale))
    return out.astype(q.dtype)


def _gather_context(cache, layer, block_tables, num_kv_heads, head_dim):
    """The cached tokens of each row's sequence, float32 `[rows, max_blocks * block_size, kv_heads, d]`."""
    rows = block_tables.shape[0]
    return cache[layer, block_tables].reshape(rows, -1, num_kv_heads, head_dim).astype(jnp.float32)


def _attend_decodes(q, k_cache, v_cache, layer, md, scale):
    """One query per row, `q [D, heads, head_dim]`; padding rows (empty context) come out finite."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[3]
    block_tables, context_lens = md.block_tables[:rows], md.context_lens[:rows]
    keys = _gather_context(k_cache, layer, block_tables, num_kv_heads, head_dim)
    values = _gather_context(v_cache, layer, block_tables, num_kv_heads, head_dim)
    q = q.astype(jnp.float32).reshape(rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    # Key position leads the scores' axes: XLA on CPU then reads each gathered key row once.
    scores = jnp.einsum("nkgd,nlkd->nlkg", q, keys) * scale
    visible = jnp.arange(keys.shape[1])[None, :] < jnp.maximum(context_lens, 1)[:, None]
    scores = jnp.where(visible[:, :, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=1)
    return jnp.einsum("nlkg,nlkd->nkgd", probs, values).reshape(rows, num_heads, head_dim)


def _attend_rows(out, q, k_cache, v_cache, layer, md, rows, scale):
    """Attention for the prefill sequences in `rows`, queries laid on a `[rows, max_query_len]` grid."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[3]
    block_tables = md.block_tables[rows]
    context_lens, query_lens = md.context_lens[rows], md.query_lens[rows]
    query_offsets = jnp.arange(md.max_query_len)
    token_index = md.query_start[rows][:, None] + query_offsets  # [N, Q]
    is_query = query_offsets < query_lens[:, None]
    n = block_tables.shape[0]

    q_grid = q[jnp.clip(token_index, 0, num_tokens - 1)].astype(jnp.float32)
    q_grid = q_grid.reshape(n, md.max_query_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    keys = _gather_context(k_cache, layer, block_tables, num_kv_heads, head_dim)
    values = _gather_context(v_cache, layer, block_tables, num_kv_heads, head_dim)

    scores = jnp.einsum("nqkgd,nlkd->nlkgq", q_grid, keys) * scale
    query_pos = (context_lens - query_lens)[:, None] + query_offsets  # [N, Q]
    key_pos = jnp.arange(keys.shape[1])
    visible = key_pos[None, :, None] <= query_pos[:, None, :]  # [N, L, Q]
    scores = jnp.where(visible[:, :, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=1)
    attended = jnp.einsum("nlkgq,nlkd->nqkgd", probs, values).reshape(n, -1, num_heads, head_dim)
    scatter_index = jnp.where(is_query, token_index, num_tokens)
    return out.at[scatter_index].set(attended, mode="drop")
