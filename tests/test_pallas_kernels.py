"""The Pallas attention kernels (interpret mode on CPU, compiled on a GPU) against the jnp reference and jax's own
paged-attention reference; and every kernel configuration the engine uses cross-lowered for CUDA,
then compiled by Triton for sm_89 and sm_90 where the `triton` package is installed.

Batches are built the way the model runner builds them: decode rows first, then prefill rows,
then padding rows with no tokens; dimensions that are not powers of two, shuffled block tables,
fresh random queries and cache. Pools stay small: interpret mode is slow.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged_attention
from tiers import FULL, sampled

from jpaged.model_runner import matmul_precision
from pallas_kernels.backend import pallas_paged_attention, select_attention
from pallas_kernels.decode_attention import choose_num_splits, paged_decode_attention_kernel
from pallas_kernels.paged_attention import AttentionMetadata, ragged_paged_attention, write_kv
from pallas_kernels.quantized_kv import QuantizedKV, quantize, storage_dtype
from pallas_kernels.ragged_paged_attention import QueryTile, ragged_paged_attention_kernel
from pallas_kernels.triton_compile import MAX_SHARED_BYTES, TritonIRNotFound, capture_triton_kernels, compile_kernel

NUM_LAYERS = 2
LAYER = 1
INTERPRET = jax.default_backend() == "cpu"  # on a GPU the kernels run compiled by Triton
pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")  # exact float32 references on a GPU
# bfloat16 and float16: the reference rounds its output to that dtype too, so allow a couple of its ulps at |x| ~ 3.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


@dataclass
class Batch:
    q: jax.Array  # [T, heads, head_dim]
    k_cache: jax.Array  # [layers, blocks, block_size, kv_heads, head_dim]
    v_cache: jax.Array
    md: AttentionMetadata
    scale: float

    def args(self):
        return self.q, self.k_cache, self.v_cache, jnp.int32(LAYER), self.md


def make_batch(seed: int, seqs: list[tuple[int, int]], *, num_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, num_blocks: int, dtype=jnp.float32) -> Batch:
    """A padded ragged batch of `seqs = [(cached_tokens, new_tokens), ...]`, decodes listed first.

    Laid out as the model runner lays it: row `i` in the order given, decode row `i` holding its
    token at flat index `i`, prefill tokens following in row order; then two padding rows, three
    padding tokens and a spare block-table column.
    """
    rng = np.random.default_rng(seed)
    num_decode = sum(1 for _, new in seqs if new == 1)
    assert all(new == 1 for _, new in seqs[:num_decode]), "list decode sequences first"
    blocks_per_seq = [-(-(cached + new) // block_size) for cached, new in seqs]
    assert sum(blocks_per_seq) <= num_blocks, "pool too small for the batch"
    num_rows = len(seqs) + 2
    num_tokens = max(sum(new for _, new in seqs) + 3, num_rows)

    free_blocks = rng.permutation(num_blocks)
    block_tables = np.zeros((num_rows, max(blocks_per_seq) + 1), np.int32)
    context_lens, query_start, query_lens = (np.zeros(num_rows, np.int32) for _ in range(3))
    start = 0
    for row, ((cached, new), count) in enumerate(zip(seqs, blocks_per_seq)):
        block_tables[row, :count], free_blocks = free_blocks[:count], free_blocks[count:]
        context_lens[row], query_lens[row] = cached + new, new
        query_start[row], start = start, start + new
    md = AttentionMetadata(
        slot_mapping=jnp.full(num_tokens, -1, jnp.int32), block_tables=jnp.asarray(block_tables),
        context_lens=jnp.asarray(context_lens), query_start=jnp.asarray(query_start),
        query_lens=jnp.asarray(query_lens))
    cache_shape = (NUM_LAYERS, num_blocks, block_size, num_kv_heads, head_dim)
    q = rng.standard_normal((num_tokens, num_heads, head_dim))
    k_cache, v_cache = rng.standard_normal(cache_shape), rng.standard_normal(cache_shape)
    return Batch(*(jnp.asarray(a, dtype) for a in (q, k_cache, v_cache)), md, head_dim**-0.5)


def awkward_seqs(block_size: int, chunk: int) -> list[tuple[int, int]]:
    """Decodes then prefill chunks at contexts 0, 1, block_size - 1, multiples of it, one past,
    and just before an edge of two blocks."""
    b = block_size
    decodes = [(0, 1), (1, 1), (b - 2, 1), (b - 1, 1), (2 * b, 1)]
    prefills = [(0, chunk), (1, 3), (b - 2, 3), (b - 1, 2), (b, chunk), (b + 1, 5), (0, b), (2 * b - 3, b + 1),
                (2 * b - 2, 2)]
    return decodes + prefills


@pytest.fixture(autouse=True)
def full_precision_float32_matmuls():
    """As the model runner sets: no TF32 in float32 matmuls on a GPU (no change on CPU)."""
    with matmul_precision(jnp.float32):
        yield


@functools.cache
def attention_program(fn, scale: float, softcap: float | None, options: tuple):
    """`fn(q, k, v, layer, md, scale, window, softcap, sinks, **options)` jitted once per distinct
    static settings in the test process, window and sinks traced: every later batch of the same
    shapes runs the program already compiled (compiling is most of these files' time)."""
    return jax.jit(lambda q, k, v, layer, md, window, sinks: fn(q, k, v, layer, md, scale, window, softcap, sinks,
                                                                **dict(options)))


def run_jitted(fn, batch: Batch, window: int | None = None, softcap: float | None = None, sinks=None, **options):
    """`fn` over `batch`, with an int32 sliding `window` (None: no window argument) and `sinks`."""
    program = attention_program(fn, batch.scale, softcap, tuple(sorted(options.items())))
    return program(*batch.args(), None if window is None else jnp.int32(window), sinks)


def quantized(batch: Batch, kv_dtype: str) -> Batch:
    """The batch with its float caches quantized to `kv_dtype` ("int8" or "fp8_e4m3")."""
    def quantize_cache(cache):
        return QuantizedKV(*quantize(cache, storage_dtype(kv_dtype, cache.dtype)))

    return dataclasses.replace(batch, k_cache=quantize_cache(batch.k_cache), v_cache=quantize_cache(batch.v_cache))


def reference(batch: Batch, window: int | None = None, softcap: float | None = None):
    return run_jitted(ragged_paged_attention, batch, window, softcap)


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol)


def real_tokens(md: AttentionMetadata) -> np.ndarray:
    mask = np.zeros(md.slot_mapping.shape[0], bool)
    for start, length in zip(np.asarray(md.query_start), np.asarray(md.query_lens)):
        mask[start:start + length] = True
    return mask


def assert_matches_reference(out, batch: Batch, dtype, window: int | None = None, softcap: float | None = None):
    """Equal to the reference (with sliding `window` and `softcap`) on every real token; finite
    everywhere (padding is unspecified)."""
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    real = real_tokens(batch.md)
    assert_close(np.asarray(out, np.float32)[real], np.asarray(reference(batch, window, softcap), np.float32)[real], dtype)


# --- the ragged kernel ---------------------------------------------------------------------------

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
# Every GQA ratio in both dtypes at block size 16, and a few at 32 (interpret mode is slow).
RAGGED_CASES = [(16, group, dtype) for group in (1, 2, 4, 8) for dtype in (F32, BF16)] + [(32, 2, F32), (32, 8, BF16)]


def case_id(case) -> str:
    return "-".join(jnp.dtype(x).name if isinstance(x, type) else str(x) for x in case)


@pytest.mark.parametrize(("block_size", "group", "dtype"), sampled(RAGGED_CASES, {2, 7, 8}, case_id, unpack=True))
def test_ragged_kernel_matches_reference(block_size, group, dtype):
    batch = make_batch(block_size + group, awkward_seqs(block_size, chunk=24), num_heads=2 * group,
                       num_kv_heads=2, head_dim=64, block_size=block_size, num_blocks=32, dtype=dtype)
    # Two pages per KV chunk, so chunk edges fall among the awkward contexts too.
    out = run_jitted(ragged_paged_attention_kernel, batch, interpret=INTERPRET, chunk_tokens=2 * block_size)
    assert_matches_reference(out, batch, dtype)


@pytest.mark.parametrize(("head_dim", "dtype"), sampled([(16, F32), (48, F32), (128, F32), (256, BF16)], {1, 3},
                                                    unpack=True))
def test_ragged_kernel_head_dims(head_dim, dtype):
    """Powers of two, a multiple of 16 that is not one (padded to 64 inside the kernel), and a head
    wide enough to shrink the default tiles."""
    batch = make_batch(head_dim, [(3, 1), (17, 1), (5, 20), (16, 16)], num_heads=6, num_kv_heads=2,
                       head_dim=head_dim, block_size=16, num_blocks=16, dtype=dtype)
    assert_matches_reference(run_jitted(ragged_paged_attention_kernel, batch, interpret=INTERPRET), batch, dtype)


def test_ragged_kernel_group_of_three_and_long_chunk():
    """SmolLM2's 9 heads over 3 KV heads, a chunk that spans several query tiles and KV chunks, and
    query tiles that start just before, at and after the end of a 32-token KV chunk."""
    seqs = [(0, 1), (40, 70), (0, 9), (30, 3), (31, 2), (32, 1 + 4)]
    batch = make_batch(3, seqs, num_heads=9, num_kv_heads=3, head_dim=64,
                       block_size=16, num_blocks=24)
    out = run_jitted(ragged_paged_attention_kernel, batch, interpret=INTERPRET, target_rows=16, chunk_tokens=32)
    assert_matches_reference(out, batch, jnp.float32)


def test_query_tiles_satisfy_triton_shape_rules():
    for group in (1, 2, 3, 4, 6, 8, 16, 32):
        for max_query_len in (1, 2, 3, 24, 512):
            for target_rows in (1, 16, 64, 128):
                tile = QueryTile.choose(group, 64, max_query_len, target_rows)
                assert tile.head_slots >= group and tile.rows >= 16
                assert tile.rows & (tile.rows - 1) == 0 and tile.tokens & (tile.tokens - 1) == 0


# --- the flash-decoding kernel -------------------------------------------------------------------

def num_decode_rows(batch: Batch) -> int:
    """Rows before the first prefill row: decodes, and in a decode-only batch its padding rows."""
    return int(np.sum(np.asarray(batch.md.query_lens) <= 1))


def decode_inputs(batch: Batch):
    """One query row per decode sequence, as the backend hands them to the decode kernel."""
    rows = slice(0, num_decode_rows(batch))
    has_token = np.asarray(batch.md.query_lens[rows]) > 0
    queries = batch.q[batch.md.query_start[rows]]
    context_lens = jnp.where(has_token, batch.md.context_lens[rows], 0)
    return queries, batch.md.block_tables[rows], context_lens, has_token


def run_decode(batch: Batch, **kwargs):
    queries, block_tables, context_lens, _ = decode_inputs(batch)
    fn = jax.jit(lambda q, k, v, bt, cl: paged_decode_attention_kernel(
        q, k, v, jnp.int32(LAYER), bt, cl, batch.scale, interpret=INTERPRET, **kwargs))
    return fn(queries, batch.k_cache, batch.v_cache, block_tables, context_lens)


def jax_oracle(batch: Batch, queries, block_tables, context_lens):
    """jax's own `paged_attention_reference`, on each sequence's pages laid out contiguously."""
    num_seqs = block_tables.shape[0]
    keys = batch.k_cache[LAYER][block_tables].reshape(num_seqs, -1, *batch.k_cache.shape[3:])
    values = batch.v_cache[LAYER][block_tables].reshape(num_seqs, -1, *batch.v_cache.shape[3:])
    scaled = (queries.astype(jnp.float32) * batch.scale).astype(queries.dtype)
    return jax_paged_attention.paged_attention_reference(scaled, keys, values, context_lens)


DECODE_CONTEXTS = [1, 2, 15, 16, 17, 32, 33, 95, 96, 97]


# (GQA group, dtype, context splits; None = the GPU-filling default, one split per KV chunk here)
DECODE_CASES = [(1, F32, 1), (2, BF16, 3), (4, F32, None), (4, BF16, 1), (8, F32, 3), (8, BF16, None)]


@pytest.mark.parametrize(("group", "dtype", "num_splits"), sampled(DECODE_CASES, {1, 2}, case_id, unpack=True))
def test_decode_kernel_matches_both_references(group, dtype, num_splits):
    seqs = [(context - 1, 1) for context in DECODE_CONTEXTS]
    batch = make_batch(group * 7, seqs, num_heads=2 * group, num_kv_heads=2, head_dim=64, block_size=16,
                       num_blocks=48, dtype=dtype)
    queries, block_tables, context_lens, has_token = decode_inputs(batch)
    out = run_decode(batch, num_splits=num_splits, chunk_tokens=32)
    ours = reference(batch)[batch.md.query_start[: num_decode_rows(batch)]]
    assert_close(out[has_token], ours[has_token], dtype)
    assert not np.asarray(out, np.float32)[~has_token].any(), "padding rows must be zeros"
    if dtype == jnp.float32:  # jax's reference rounds queries through the input dtype after scaling
        theirs = jax_oracle(batch, queries, block_tables, context_lens)
        assert_close(out[has_token], theirs[has_token], dtype)


def test_decode_kernel_against_jax_pallas_kernel():
    """jax's own Triton paged-attention kernel, layouts converted, as a third opinion."""
    batch = make_batch(11, [(c - 1, 1) for c in (5, 16, 31, 64)], num_heads=16, num_kv_heads=2, head_dim=64,
                       block_size=16, num_blocks=20)
    queries, block_tables, context_lens, _ = decode_inputs(batch)
    k_pages = jnp.transpose(batch.k_cache[LAYER], (2, 0, 1, 3))  # -> [kv_heads, pages, page_size, head_dim]
    v_pages = jnp.transpose(batch.v_cache[LAYER], (2, 0, 1, 3))
    theirs = jax_paged_attention.paged_attention(
        queries * batch.scale, k_pages, v_pages, block_tables, context_lens, k_splits=1,
        pages_per_compute_block=block_tables.shape[1], interpret=INTERPRET)
    assert_close(run_decode(batch, num_splits=2), theirs, jnp.float32)


def test_split_choice_fills_the_gpu_without_empty_splits():
    assert choose_num_splits(batch=1, num_kv_heads=8, max_chunks=128) == 64
    assert choose_num_splits(batch=256, num_kv_heads=8, max_chunks=128) == 1
    for batch in (1, 3, 8, 64):
        for max_chunks in (1, 5, 7, 100):
            splits = choose_num_splits(batch, 2, max_chunks)
            chunks_per_split = -(-max_chunks // splits)
            assert 1 <= splits <= max_chunks and (splits - 1) * chunks_per_split < max_chunks


# --- the backend's combined path -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pallas_backend_mixed_batch(dtype):
    """Decodes by flash-decoding and prefills by the ragged kernel, written into one output."""
    batch = make_batch(5, awkward_seqs(16, chunk=12), num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       num_blocks=32, dtype=dtype)
    out = run_jitted(pallas_paged_attention, batch, interpret=INTERPRET)
    assert_matches_reference(out, batch, dtype)


def test_pallas_backend_decode_only_and_prefill_only():
    decodes = make_batch(1, [(4, 1), (30, 1), (0, 1)], num_heads=4, num_kv_heads=1, head_dim=32,
                         block_size=16, num_blocks=8)
    prefills = make_batch(2, [(0, 7), (9, 3)], num_heads=4, num_kv_heads=1, head_dim=32, block_size=16,
                          num_blocks=8)
    for batch in (decodes, prefills):
        assert_matches_reference(run_jitted(pallas_paged_attention, batch, interpret=INTERPRET), batch, jnp.float32)


# --- cross-lowering for CUDA ---------------------------------------------------------------------

def layer_scan(attention):
    """The model's use: per layer, write the new K/V, then attend, inside `lax.scan` over layers."""
    def step(q, k, v, k_cache, v_cache, md, scale):
        def layer_step(carry, _):
            k_cache, v_cache, layer = carry
            k_cache, v_cache = write_kv(k_cache, v_cache, layer, k, v, md.slot_mapping)
            out = attention(q, k_cache, v_cache, layer, md, scale)
            return (k_cache, v_cache, layer + 1), out

        (k_cache, v_cache, _), outs = jax.lax.scan(layer_step, (k_cache, v_cache, jnp.int32(0)), None,
                                                   length=k_cache.shape[0])
        return outs, k_cache, v_cache
    return step


ENGINE_CONFIGS = [
    # (dtype, head_dim, block_size, num_heads, num_kv_heads)
    (jnp.bfloat16, 128, 16, 32, 8),
    (jnp.bfloat16, 128, 32, 32, 4),
    (jnp.bfloat16, 64, 16, 9, 3),
    (jnp.bfloat16, 64, 16, 8, 8),
    (jnp.float32, 64, 16, 16, 2),
    (jnp.float32, 80, 32, 10, 10),
    (jnp.bfloat16, 256, 16, 16, 8),
]
BATCH_SHAPES = {
    "decode": [(c, 1) for c in (0, 16, 47, 200, 301)],
    "prefill": [(0, 37), (33, 16)],
    "mixed": [(5, 1), (70, 1), (0, 21), (16, 3)],
}


def config_id(config) -> str:
    dtype, head_dim, block_size, num_heads, num_kv_heads = config
    return f"{jnp.dtype(dtype).name}-d{head_dim}-b{block_size}-{num_heads}:{num_kv_heads}"


def trace_for_cuda(batch: Batch, k_cache, v_cache, dtype) -> jax.stages.Traced:
    """The model's layer scan with the Pallas backend, traced for a CUDA device."""
    head_dim, num_kv_heads = batch.q.shape[2], k_cache.shape[3]
    new_kv = jnp.zeros((batch.q.shape[0], num_kv_heads, head_dim), dtype)
    attention = select_attention("pallas", head_dim, platform="cuda")
    step = jax.jit(layer_scan(attention), static_argnums=6, donate_argnums=(3, 4))
    with matmul_precision(dtype):
        return step.trace(batch.q, new_kv, new_kv, k_cache, v_cache, batch.md, batch.scale)


def lower_for_cuda(batch: Batch, k_cache, v_cache, dtype) -> str:
    """StableHLO text of the model's layer scan with the Pallas backend, lowered for CUDA."""
    return trace_for_cuda(batch, k_cache, v_cache, dtype).lower(lowering_platforms=("cuda",)).as_text()


TRITON_CALL = "custom_call @__gpu$xla.gpu.triton"


@pytest.mark.parametrize("batch_kind", list(BATCH_SHAPES))
@pytest.mark.parametrize("config", ENGINE_CONFIGS, ids=config_id)
def test_engine_configs_cross_lower_for_cuda(config, batch_kind):
    dtype, head_dim, block_size, num_heads, num_kv_heads = config
    batch = make_batch(0, BATCH_SHAPES[batch_kind], num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, block_size=block_size, num_blocks=40, dtype=dtype)
    # Every step holds both kernels: which rows decode and which prefill is data, not shape.
    assert lower_for_cuda(batch, batch.k_cache, batch.v_cache, dtype).count(TRITON_CALL) == 2


def test_cache_past_4_gib_cross_lowers_for_cuda():
    """A real GPU-sized cache (42 GB, never allocated): page offsets need 64-bit indexing."""
    batch = make_batch(0, BATCH_SHAPES["mixed"], num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                       num_blocks=40, dtype=jnp.bfloat16)
    big_cache = jax.ShapeDtypeStruct((32, 40_000, 16, 8, 128), jnp.bfloat16)
    assert lower_for_cuda(batch, big_cache, big_cache, jnp.bfloat16).count(TRITON_CALL) == 2


# --- compiled by Triton --------------------------------------------------------------------------

def triton_kernels(traced: jax.stages.Traced) -> list:
    """The traced function's Triton kernels, where this machine can compile them: the `triton` package
    is installed, and jax leaves the Triton IR for XLA to compile."""
    pytest.importorskip("triton")
    try:
        return capture_triton_kernels(traced)
    except TritonIRNotFound as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("capability", [pytest.param(89, marks=FULL), 90])
@pytest.mark.parametrize("config", sampled(ENGINE_CONFIGS, {0, 4}, config_id))
def test_engine_kernels_compile_with_triton(config, capability):
    """What XLA does with each kernel on a GPU: Triton compiles it to a cubin that can launch, reading
    K/V in 16-byte loads and, for 16-bit inputs, multiplying on tensor cores. (sm_80 builds the same
    kernels as sm_89, with more shared memory to spare: `scripts/kernel_resources.py` shows all three.)"""
    dtype, head_dim, block_size, num_heads, num_kv_heads = config
    kernels = {}
    for seqs in BATCH_SHAPES.values():
        batch = make_batch(0, seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           block_size=block_size, num_blocks=40, dtype=dtype)
        kernels.update((k.name, k) for k in triton_kernels(trace_for_cuda(batch, batch.k_cache, batch.v_cache, dtype)))
    assert {name.split("_attention")[0] for name in kernels} == {"paged_decode", "ragged_paged"}
    for kernel in kernels.values():
        resources = compile_kernel(kernel, capability)
        assert resources.fits, (f"{kernel.name} needs {resources.shared_bytes} bytes of shared memory; "
                                f"sm_{capability} allows {MAX_SHARED_BYTES[capability]}")
        assert resources.wide_loads > 0, f"{kernel.name} reads K/V without 16-byte loads"
        if dtype != jnp.float32:  # full-precision float32 matmuls run on FMA units by design
            assert resources.tensor_core_ops > 0, f"{kernel.name} does its 16-bit matmuls without tensor cores"


def test_triton_check_flags_a_tile_too_big_for_the_gpu():
    """The shared-memory check can fail: a 128-row tile over 256-token chunks, three stages deep."""
    batch = make_batch(0, BATCH_SHAPES["prefill"], num_heads=8, num_kv_heads=8, head_dim=128, block_size=16,
                       num_blocks=40, dtype=jnp.bfloat16)

    def attention(q, k_cache, v_cache, md):
        return ragged_paged_attention_kernel(q, k_cache, v_cache, LAYER, md, batch.scale, target_rows=128,
                                             chunk_tokens=256, num_stages=3)

    [kernel] = triton_kernels(jax.jit(attention).trace(batch.q, batch.k_cache, batch.v_cache, batch.md))
    resources = compile_kernel(kernel, 89)
    assert resources.shared_bytes > MAX_SHARED_BYTES[89] and not resources.fits
