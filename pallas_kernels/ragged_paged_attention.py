"""Ragged paged attention as a Triton-style Pallas kernel: the engine's attention on GPU.

Same contract as `paged_attention.ragged_paged_attention` (the pure-jnp reference): queries
`q [T, heads, head_dim]` of a ragged batch attend causally, through the block tables, to layer
`layer` of the stacked cache `[num_layers, num_blocks, block_size, kv_heads, head_dim]`
(or a quantized one, `quantized_kv.QuantizedKV`, whose pages are widened as they load); where the
metadata has `key_ends`, each query sees up to its own key end (an image read bidirectionally).

One program handles one sequence, one KV head and a tile of up to `tile_tokens` of that
sequence's new tokens, with all query heads of the KV head stacked into the tile's rows
(GQA: the KV chunk is read once for the whole group). It walks the context in chunks of whole
pages, `pages_per_chunk` pages gathered through the block table per step, keeping an online
softmax in float32. Chunks that every query of the tile sees whole (before its first query and,
with a sliding window, inside its last query's window) need no mask and take a cheaper loop;
chunks before the first query's window are skipped. The cache is passed whole (`memory_space=pl.ANY`) and pages are indexed inside
the kernel, so nothing is sliced or copied per layer.

Triton wants every tensor's size to be a power of two and matmul sides of at least 16, while the
engine pads tokens, sequences and block-table widths to non-power-of-two buckets. So the tile's
head slots are rounded up to a power of two (and enough slots for 16 rows), the head dimension
is rounded up to a power of two, loads and stores are masked, and the wrapper pads block tables
to whole chunks (page 0 fills, masked out) so no chunk reads past a table's row.

The building blocks (`load_kv_chunk`, `online_softmax_step`, ...) are shared with the
flash-decoding kernel in `decode_attention.py`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.float8 import widen_fp8_bits
from pallas_kernels.paged_attention import AttentionMetadata, window_span
from pallas_kernels.quantized_kv import is_quantized

LOG2E = math.log2(math.e)
# Start of the running max: finite, so a chunk whose scores are all masked (-inf) leaves the
# softmax state as it was instead of producing exp2(-inf - -inf) = NaN.
RUNNING_MAX_INIT = -1e30
MIN_DOT_SIDE = 16  # Triton's tensor-core matmuls need every side >= 16


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def triton_compiler_params(num_warps: int, num_stages: int):
    """Explicit Triton params: without them jax lowers `pallas_call` to Mosaic GPU instead."""
    params_class = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return params_class(num_warps=num_warps, num_stages=num_stages)


def default_tile_sizes(dtype, head_dim: int) -> tuple[int, int]:
    """`(target_rows, chunk_tokens)`: a program's query rows and the context tokens per step.

    Float32 matmuls at full precision run on FMA units rather than tensor cores, and hold far
    more in registers: bigger tiles spill. Heads wider than 128 shrink 16-bit tiles to keep their
    shared memory within every GPU's (`scripts/kernel_resources.py` reads these numbers off
    Triton and ptxas for sm_80, sm_89 and sm_90).
    """
    if jnp.dtype(dtype) == jnp.float32:
        return MIN_DOT_SIDE, MIN_DOT_SIDE
    size = max(MIN_DOT_SIDE, 64 * 128 // max(128, next_power_of_2(head_dim)))
    return size, size


def default_num_warps(rows: int, padded_dim: int, dtype) -> int:
    """Eight warps where four would run out of registers on the tile's accumulators."""
    elements_per_four_warps = 2048 if jnp.dtype(dtype) == jnp.float32 else 8192
    return 8 if rows * padded_dim >= elements_per_four_warps else 4


def unsupported_reason(head_dim: int) -> str | None:
    """Why the Pallas kernels cannot run this head_dim, or None when they can."""
    if head_dim % MIN_DOT_SIDE:
        return (f"head_dim {head_dim} is not a multiple of {MIN_DOT_SIDE} "
                f"(the kernels' matmuls need sides of at least {MIN_DOT_SIDE})")
    return None


def check_supported(q: jax.Array, k_cache) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[3]
    reason = unsupported_reason(head_dim)
    if reason:
        raise ValueError(reason)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if k_cache.shape[4] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[4]} != query head_dim {head_dim}")
    if q.dtype != k_cache.dtype and not is_quantized(k_cache):
        raise ValueError(f"query dtype {q.dtype} != cache dtype {k_cache.dtype} (the kernels' matmuls need one type)")


def cache_operands(k_cache, v_cache) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`(k, v, k_scales, v_scales)` as the kernels take them; a float cache's scales are a
    placeholder the kernels never read."""
    if is_quantized(k_cache):
        return k_cache.values, v_cache.values, k_cache.scales, v_cache.scales
    unused = jnp.ones((1,), jnp.float32)
    return k_cache, v_cache, unused, unused


@dataclass(frozen=True)
class KVChunking:
    """How the context is walked: `pages_per_chunk` pages of `block_size` tokens per step."""

    block_size: int
    pages_per_chunk: int

    @classmethod
    def for_cache(cls, block_size: int, chunk_tokens: int) -> KVChunking:
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        pages = max(1, chunk_tokens // block_size, MIN_DOT_SIDE // block_size)
        return cls(block_size, pages)

    @property
    def tokens(self) -> int:
        return self.block_size * self.pages_per_chunk

    def pad_block_tables(self, block_tables: jax.Array, num_chunks: int) -> jax.Array:
        """Widen rows to `num_chunks` whole chunks (page 0 fills; its keys are masked out)."""
        missing = num_chunks * self.pages_per_chunk - block_tables.shape[1]
        return jnp.pad(block_tables, ((0, 0), (0, missing))) if missing > 0 else block_tables

    def chunks_for(self, max_blocks: int) -> int:
        return pl.cdiv(max_blocks, self.pages_per_chunk)


def load_kv_chunk(cache_ref, scale_ref, layer, pages, kv_head, head_dim: int, padded_dim: int, dtype):
    """K or V of `pages [P]` for one KV head, as `[P * block_size, padded_dim]` in `dtype`.

    A quantized cache (int8, or float8 bits as uint8, widened by integer arithmetic: Triton has
    no float8 conversion before sm_89) is widened in registers with its per-token scales
    from `scale_ref [layers, blocks, block_size, kv_heads]`. Dimensions past `head_dim` (only
    when it is not a power of two) read as zeros.
    """
    block_size = cache_ref.shape[2]
    slot = jnp.arange(block_size)[None, :, None]
    dim = jnp.arange(padded_dim)[None, None, :]
    index = (layer, pages[:, None, None], slot, kv_head, dim)
    if padded_dim == head_dim:
        chunk = cache_ref[index]
    else:
        dim_ok = jnp.broadcast_to(dim < head_dim, (pages.shape[0], block_size, padded_dim))
        chunk = plgpu.load(cache_ref.at[index], mask=dim_ok, other=0)
    chunk = chunk.reshape(pages.shape[0] * block_size, padded_dim)
    if chunk.dtype == dtype:
        return chunk
    scales = scale_ref[layer, pages[:, None], jnp.arange(block_size)[None, :], kv_head]
    widened = widen_fp8_bits(chunk) if chunk.dtype == jnp.uint8 else chunk.astype(jnp.float32)
    return (widened * scales.reshape(-1, 1)).astype(dtype)


def dot_precision(dtype):
    """A kernel product's precision: full float32 (IEEE) for float32 operands, where Triton's
    default, as Pallas lowers an unset precision, is TF32 (inputs rounded to 10-bit mantissas)."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def scaled_scores(queries, keys, scale: float, softcap: float | None = None):
    """`queries [M, D] @ keys [N, D]^T` times `scale` in float32, soft-capped at `softcap` (where
    not None), in log2 units (ready for `exp2`)."""
    scores = lax.dot_general(queries, keys, (((1,), (1,)), ((), ())), precision=dot_precision(keys.dtype),
                             preferred_element_type=jnp.float32)
    if softcap is None:
        return scores * (scale * LOG2E)
    return jnp.tanh(scores * (scale / softcap)) * (softcap * LOG2E)


def online_softmax_step(state, scores, values):
    """Fold one chunk of `scores [M, N]` (log2 units) and `values [N, D]` into the softmax state.

    The state is `(acc [M, D], running_max [M], running_sum [M])`, all float32, acc unnormalised.
    """
    acc, running_max, running_sum = state
    new_max = jnp.maximum(running_max, scores.max(axis=1))
    rescale = jnp.exp2(running_max - new_max)
    probs = jnp.exp2(scores - new_max[:, None])
    running_sum = running_sum * rescale + probs.sum(axis=1)
    chunk_out = jnp.dot(probs.astype(values.dtype), values, precision=dot_precision(values.dtype),
                        preferred_element_type=jnp.float32)
    return acc * rescale[:, None] + chunk_out, new_max, running_sum


def tile_sinks(sinks_ref, tile: QueryTile, kv_head):
    """The attention sinks `[rows]` (log2 units) of a tile's rows, each its query head's (0 for
    slots past the group), from `sinks_ref [heads]` (float32)."""
    slot_ok = jnp.arange(tile.head_slots) < tile.group
    heads = plgpu.load(sinks_ref.at[pl.ds(kv_head * tile.group, tile.head_slots)], mask=slot_ok, other=0)
    return jnp.broadcast_to(heads[None, :] * LOG2E, (tile.tokens, tile.head_slots)).reshape(tile.rows)


def with_sinks(state, sinks):
    """An online softmax's final state with each row's sink logit `sinks [rows]` (log2 units) in its
    denominator: the sink counts as one more key, whose value is zero."""
    acc, running_max, running_sum = state
    new_max = jnp.maximum(running_max, sinks)
    rescale = jnp.exp2(running_max - new_max)
    return acc * rescale[:, None], new_max, running_sum * rescale + jnp.exp2(sinks - new_max)


def sinks_operand(sinks, num_heads: int) -> jax.Array:
    """The kernels' sinks input: float32 `[heads]` (zeros, unread, where the model has none)."""
    return jnp.zeros((num_heads,), jnp.float32) if sinks is None else jnp.asarray(sinks, jnp.float32)


def initial_softmax_state(rows: int, padded_dim: int):
    return (jnp.zeros((rows, padded_dim), jnp.float32),
            jnp.full((rows,), RUNNING_MAX_INIT, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


@dataclass(frozen=True)
class QueryTile:
    """A program's queries: `tokens` new tokens x `head_slots` query heads of one KV head.

    `head_slots` >= the GQA group (extra slots are masked), rounded so that the tile's
    `rows = tokens * head_slots` is a power of two and at least 16.
    """

    tokens: int
    head_slots: int
    group: int
    head_dim: int

    @classmethod
    def choose(cls, group: int, head_dim: int, max_query_len: int, target_rows: int) -> QueryTile:
        padded_group = next_power_of_2(group)
        tokens = max(1, min(target_rows // padded_group, next_power_of_2(max_query_len)))
        head_slots = max(padded_group, MIN_DOT_SIDE // tokens)
        return cls(tokens, head_slots, group, head_dim)

    @property
    def rows(self) -> int:
        return self.tokens * self.head_slots

    @property
    def padded_dim(self) -> int:
        return max(next_power_of_2(self.head_dim), MIN_DOT_SIDE)

    def mask(self, num_tokens):
        """Which `[tokens, head_slots, padded_dim]` entries are real for `num_tokens` valid tokens."""
        token_ok = jnp.arange(self.tokens)[:, None, None] < num_tokens
        head_ok = jnp.arange(self.head_slots)[None, :, None] < self.group
        dim_ok = jnp.arange(self.padded_dim)[None, None, :] < self.head_dim
        return jnp.broadcast_to(token_ok & head_ok & dim_ok, (self.tokens, self.head_slots, self.padded_dim))

    def view(self, ref, first_token, kv_head):
        """The tile's window of a flat `[T, heads, head_dim]` array (masked where out of range)."""
        return ref.at[pl.ds(first_token, self.tokens), pl.ds(kv_head * self.group, self.head_slots),
                      pl.ds(0, self.padded_dim)]


def layer_operand(layer, window) -> jax.Array:
    """int32 `[2]`: the layer, and the keys a query sees back from itself (`window_span`)."""
    return jnp.stack([jnp.asarray(layer, jnp.int32), window_span(window)])


def _ragged_kernel(layer_ref, block_tables_ref, context_lens_ref, query_start_ref, query_lens_ref,
                   q_ref, k_ref, v_ref, k_scale_ref, v_scale_ref, sinks_ref, key_ends_ref, _out_in_ref, out_ref, *,
                   first_row: int, tile: QueryTile, chunking: KVChunking, scale: float, softcap: float | None,
                   has_sinks: bool, has_key_ends: bool):
    row = first_row + pl.program_id(0)
    kv_head = pl.program_id(1)
    tile_offset = pl.program_id(2) * tile.tokens
    query_len = query_lens_ref[row]

    @pl.when(tile_offset < query_len)
    def _():
        layer, span = layer_ref[0], layer_ref[1]
        num_tokens = jnp.minimum(tile.tokens, query_len - tile_offset)
        first_token = query_start_ref[row] + tile_offset
        first_pos = context_lens_ref[row] - query_len + tile_offset  # position of the tile's first query
        mask = tile.mask(num_tokens)
        queries = plgpu.load(tile.view(q_ref, first_token, kv_head), mask=mask, other=0)
        queries = queries.reshape(tile.rows, tile.padded_dim)
        query_pos = first_pos + jnp.arange(tile.rows) // tile.head_slots
        key_ends = query_pos + 1  # one past the last key each row sees
        if has_key_ends:
            token_ok = jnp.arange(tile.tokens) < num_tokens
            ends = plgpu.load(key_ends_ref.at[pl.ds(first_token, tile.tokens)], mask=token_ok, other=0)
            ends = jnp.broadcast_to(ends[:, None], (tile.tokens, tile.head_slots)).reshape(tile.rows)
            key_ends = jnp.clip(ends, key_ends, context_lens_ref[row])

        def chunk_step(chunk, state, causal: bool):
            pages = block_tables_ref[row, pl.ds(chunk * chunking.pages_per_chunk, chunking.pages_per_chunk)]
            keys = load_kv_chunk(k_ref, k_scale_ref, layer, pages, kv_head, tile.head_dim, tile.padded_dim,
                                 queries.dtype)
            scores = scaled_scores(queries, keys, scale, softcap)
            if causal:
                key_pos = chunk * chunking.tokens + jnp.arange(chunking.tokens)
                visible = (key_pos[None, :] < key_ends[:, None]) & (key_pos[None, :] > query_pos[:, None] - span)
                scores = jnp.where(visible, scores, -jnp.inf)
            values = load_kv_chunk(v_ref, v_scale_ref, layer, pages, kv_head, tile.head_dim, tile.padded_dim,
                                   queries.dtype)
            return online_softmax_step(state, scores, values)

        # Chunks [open_start, open_stop) end at or before the first query and start inside the last
        # query's window: every query of the tile sees them whole.
        last_pos = first_pos + num_tokens - 1
        first_chunk = jnp.maximum(first_pos - span + 1, 0) // chunking.tokens
        open_stop = (first_pos + 1) // chunking.tokens
        open_start = jnp.clip(pl.cdiv(jnp.maximum(last_pos - span + 1, 0), chunking.tokens), first_chunk, open_stop)
        last_key = jnp.max(key_ends) if has_key_ends else last_pos + 1
        num_chunks = pl.cdiv(last_key, chunking.tokens)
        masked, whole = functools.partial(chunk_step, causal=True), functools.partial(chunk_step, causal=False)
        state = initial_softmax_state(tile.rows, tile.padded_dim)
        state = lax.fori_loop(first_chunk, open_start, masked, state)
        state = lax.fori_loop(open_start, open_stop, whole, state)
        state = lax.fori_loop(open_stop, num_chunks, masked, state)
        if has_sinks:
            state = with_sinks(state, tile_sinks(sinks_ref, tile, kv_head))
        acc, _, total = state
        out = acc / jnp.where(total > 0, total, 1.0)[:, None]
        out = out.reshape(tile.tokens, tile.head_slots, tile.padded_dim).astype(out_ref.dtype)
        plgpu.store(tile.view(out_ref, first_token, kv_head), out, mask=mask)


def ragged_attention_rows(out, q, k_cache, v_cache, layer, md: AttentionMetadata, scale: float,
                          rows: tuple[int, int], max_query_len: int, *, interpret: bool = False,
                          target_rows: int | None = None, chunk_tokens: int | None = None,
                          num_warps: int | None = None, num_stages: int = 2, window=None,
                          softcap: float | None = None, sinks=None) -> jax.Array:
    """Write into `out [T, heads, head_dim]` the attention of sequences `rows = (first, stop)`
    (`window`, `softcap` and `sinks` as the reference takes them).

    Their query lengths must be at most `max_query_len`; the other tokens of `out` keep their
    values (`out` is aliased to the kernel's output, so it is updated in place when donated).
    Tiling left as None takes `default_tile_sizes` and `default_num_warps`.
    """
    check_supported(q, k_cache)
    first_row, stop_row = rows
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[3]
    default_rows, default_chunk = default_tile_sizes(q.dtype, head_dim)
    tile = QueryTile.choose(num_heads // num_kv_heads, head_dim, max_query_len, target_rows or default_rows)
    chunking = KVChunking.for_cache(k_cache.shape[2], chunk_tokens or default_chunk)
    num_warps = num_warps or default_num_warps(tile.rows, tile.padded_dim, q.dtype)
    block_tables = chunking.pad_block_tables(md.block_tables, chunking.chunks_for(md.block_tables.shape[1]))
    kernel = functools.partial(_ragged_kernel, first_row=first_row, tile=tile, chunking=chunking, scale=scale,
                               softcap=softcap, has_sinks=sinks is not None, has_key_ends=md.key_ends is not None)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        grid=(stop_row - first_row, num_kv_heads, pl.cdiv(max_query_len, tile.tokens)),
        in_specs=[whole] * 13,
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
        input_output_aliases={12: 0},
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_t{tile.tokens}_h{tile.head_slots}_p{chunking.pages_per_chunk}",
    )(layer_operand(layer, window), block_tables, md.context_lens, md.query_start,
      md.query_lens, q, *cache_operands(k_cache, v_cache), sinks_operand(sinks, num_heads),
      jnp.zeros((1,), jnp.int32) if md.key_ends is None else md.key_ends, out)


def ragged_paged_attention_kernel(q, k_cache, v_cache, layer, md: AttentionMetadata, scale: float, window=None,
                                  softcap: float | None = None, sinks=None, *, interpret: bool = False,
                                  **tuning) -> jax.Array:
    """The reference's `ragged_paged_attention`, computed by the ragged Pallas kernel alone, every
    row of the batch in one launch (tiles past a row's queries exit at once). `tuning` goes to
    `ragged_attention_rows` (tile rows, chunk tokens, warps, stages)."""
    out = jnp.zeros(q.shape, q.dtype)
    return ragged_attention_rows(out, q, k_cache, v_cache, layer, md, scale, (0, md.block_tables.shape[0]),
                                 q.shape[0], interpret=interpret, window=window, softcap=softcap, sinks=sinks,
                                 **tuning)
