"""The Mosaic GPU decode kernel against the jnp reference: cross-lowered for CUDA on any machine,
run by jax's GPU interpreter on a CPU, compiled on a Hopper (sm_90+) GPU; and the backend's
Mosaic decode path lowered inside the model's layer scan.

Batches are decode rows as the backend hands them over: fresh random queries and caches,
shuffled block tables wider than needed, context lengths 0 (a padding row, zeros out), 1,
block_size, block_size + 1 and a few chunks long.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.backend import choose_decode_kernel, pallas_paged_attention
from pallas_kernels.mosaic_decode_attention import mosaic_paged_decode_attention, plgpu, runs_here
from pallas_kernels.paged_attention import AttentionMetadata, ragged_paged_attention, write_kv

if plgpu is None:
    pytest.skip("this jax has no jax.experimental.pallas.mosaic_gpu", allow_module_level=True)

try:  # private in jax 0.10.2 and 0.11: the tests only
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:
    InterpretGPUParams = None

NUM_LAYERS, LAYER = 2, 1
MOSAIC_CALL = "custom_call @mosaic_gpu_v2"
TRITON_CALL = "custom_call @__gpu$xla.gpu.triton"
ON_HOPPER = runs_here()
F16, BF16 = jnp.float16, jnp.bfloat16
TOLERANCE = 2e-2  # 16-bit outputs, and probabilities rounded to 16 bits before the second matmul


@dataclass
class DecodeBatch:
    q: jax.Array  # [B, heads, head_dim]
    k_cache: jax.Array  # [layers, blocks, block_size, kv_heads, head_dim]
    v_cache: jax.Array
    block_tables: jax.Array  # [B, max_blocks]
    context_lens: jax.Array  # [B]
    scale: float

    def metadata(self) -> AttentionMetadata:
        """The same rows as the reference's decode rows: row i's token at flat index i."""
        rows = self.q.shape[0]
        return AttentionMetadata(
            slot_mapping=jnp.full(rows, -1, jnp.int32), block_tables=self.block_tables,
            context_lens=self.context_lens, query_start=jnp.arange(rows, dtype=jnp.int32),
            query_lens=(self.context_lens > 0).astype(jnp.int32))


def make_decode_batch(seed: int, contexts: list[int], *, group: int, num_kv_heads: int = 2, head_dim: int,
                      block_size: int, dtype) -> DecodeBatch:
    rng = np.random.default_rng(seed)
    blocks_per_seq = [-(-c // block_size) for c in contexts]
    max_blocks = max(blocks_per_seq) + 1  # one spare column: the kernel must not read past the context
    num_blocks = sum(blocks_per_seq) + 3
    free = rng.permutation(num_blocks)
    block_tables = np.zeros((len(contexts), max_blocks), np.int32)
    for row, count in enumerate(blocks_per_seq):
        block_tables[row, :count], free = free[:count], free[count:]
    cache_shape = (NUM_LAYERS, num_blocks, block_size, num_kv_heads, head_dim)
    q, k, v = (rng.standard_normal(shape) for shape in
               ((len(contexts), group * num_kv_heads, head_dim), cache_shape, cache_shape))
    return DecodeBatch(*(jnp.asarray(a, dtype) for a in (q, k, v)), jnp.asarray(block_tables),
                       jnp.asarray(contexts, jnp.int32), head_dim**-0.5)


def contexts_for(block_size: int) -> list[int]:
    return [0, 1, block_size, block_size + 1, 3 * max(64, block_size) + 5]


def run_mosaic(batch: DecodeBatch, interpret=None, **kwargs):
    fn = functools.partial(mosaic_paged_decode_attention, layer=jnp.int32(LAYER), scale=batch.scale,
                           interpret=interpret, **kwargs)
    return jax.jit(lambda q, k, v, bt, cl: fn(q, k, v, block_tables=bt, context_lens=cl))(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens)


def assert_matches_reference(out, batch: DecodeBatch):
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    expected = jax.jit(ragged_paged_attention, static_argnums=5)(
        batch.q, batch.k_cache, batch.v_cache, jnp.int32(LAYER), batch.metadata(), batch.scale)
    out, expected = np.asarray(out, np.float32), np.asarray(expected, np.float32)
    has_context = np.asarray(batch.context_lens) > 0
    np.testing.assert_allclose(out[has_context], expected[has_context], atol=TOLERANCE, rtol=TOLERANCE)
    assert not out[~has_context].any(), "rows with no context must be zeros"


# (GQA group, block_size, head_dim, dtype): GQA 1/4/8, pages smaller than, equal to and larger
# than the 64-token chunk, both WGMMA-friendly head widths, both 16-bit float types.
CASES = [(1, 16, 64, BF16), (4, 16, 128, BF16), (8, 32, 64, F16), (4, 64, 64, F16), (2, 128, 128, BF16)]


def case_id(case) -> str:
    group, block_size, head_dim, dtype = case
    return f"g{group}-b{block_size}-d{head_dim}-{jnp.dtype(dtype).name}"


@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
def test_kernel_cross_lowers_for_cuda(case):
    group, block_size, head_dim, dtype = case
    batch = make_decode_batch(0, contexts_for(block_size), group=group, head_dim=head_dim,
                              block_size=block_size, dtype=dtype)
    attention = functools.partial(mosaic_paged_decode_attention, layer=jnp.int32(LAYER), scale=batch.scale)
    traced = jax.jit(attention).trace(batch.q, batch.k_cache, batch.v_cache, block_tables=batch.block_tables,
                                      context_lens=batch.context_lens)
    assert traced.lower(lowering_platforms=("cuda",)).as_text().count(MOSAIC_CALL) == 1


@pytest.mark.skipif(InterpretGPUParams is None or jax.default_backend() != "cpu",
                    reason="jax's GPU interpreter runs on a CPU backend")
@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
def test_interpreted_kernel_matches_reference(case):
    group, block_size, head_dim, dtype = case
    batch = make_decode_batch(group + block_size, contexts_for(block_size), group=group, head_dim=head_dim,
                              block_size=block_size, dtype=dtype)
    assert_matches_reference(run_mosaic(batch, InterpretGPUParams()), batch)


@pytest.mark.skipif(not ON_HOPPER, reason="needs a CUDA GPU of compute capability 9.0 or newer")
@pytest.mark.parametrize("chunk_tokens", [None, 128, 256])
@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
def test_compiled_kernel_matches_reference(case, chunk_tokens):
    group, block_size, head_dim, dtype = case
    contexts = [*contexts_for(block_size), 2, 63, 64, 65, 257, 1000]
    batch = make_decode_batch(7 * group + block_size, contexts, group=group, head_dim=head_dim,
                              block_size=block_size, dtype=dtype)
    assert_matches_reference(run_mosaic(batch, chunk_tokens=chunk_tokens), batch)


@pytest.mark.parametrize(("dtype", "head_dim", "block_size", "message"), [
    (jnp.float32, 64, 16, "dtype float32"),
    (BF16, 80, 16, "head_dim 80"),
    (BF16, 64, 4, "block_size 4"),
])
def test_unsupported_shapes_are_refused(dtype, head_dim, block_size, message):
    batch = make_decode_batch(0, [5], group=2, head_dim=head_dim, block_size=block_size, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        run_mosaic(batch)


# --- the backend's Mosaic decode path ------------------------------------------------------------

def lower_layer_scan(attention, q, k_cache, v_cache, md: AttentionMetadata, scale: float) -> str:
    """The model's use, per layer write then attend inside `lax.scan`, lowered for CUDA."""
    def step(q, k_cache, v_cache, md):
        new_kv = jnp.zeros((q.shape[0], *k_cache.shape[3:]), k_cache.dtype)

        def layer_step(carry, _):
            k_cache, v_cache, layer = carry
            k_cache, v_cache = write_kv(k_cache, v_cache, layer, new_kv, new_kv, md.slot_mapping)
            return (k_cache, v_cache, layer + 1), attention(q, k_cache, v_cache, layer, md, scale)

        return jax.lax.scan(layer_step, (k_cache, v_cache, jnp.int32(0)), None, length=k_cache.shape[0])[1]

    return jax.jit(step).trace(q, k_cache, v_cache, md).lower(lowering_platforms=("cuda",)).as_text()


# Beside the decode kernel, every step holds the Triton ragged kernel for its prefill rows.
@pytest.mark.parametrize(("dtype", "head_dim", "kernel_calls"), [
    (BF16, 128, {MOSAIC_CALL: 1, TRITON_CALL: 1}),
    (jnp.float32, 64, {MOSAIC_CALL: 0, TRITON_CALL: 2}),  # falls back to the Triton decode kernel
])
def test_backend_mosaic_decode_path_cross_lowers(dtype, head_dim, kernel_calls):
    batch = make_decode_batch(0, contexts_for(16), group=4, head_dim=head_dim, block_size=16, dtype=dtype)
    attention = functools.partial(pallas_paged_attention, decode_kernel="mosaic")
    text = lower_layer_scan(attention, batch.q, batch.k_cache, batch.v_cache, batch.metadata(), batch.scale)
    assert {call: text.count(call) for call in kernel_calls} == kernel_calls


def test_decode_kernel_choice():
    """Mosaic only where asked for, until a GPU run has measured it."""
    assert choose_decode_kernel("cuda", "triton") == "triton"
    assert choose_decode_kernel("cuda", "mosaic") == "mosaic"
    assert choose_decode_kernel("cpu", "auto") == "triton"
    assert choose_decode_kernel("cuda", "auto") == "triton"
