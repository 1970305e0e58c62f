"""The quantized KV cache (int8 / float8 e4m3, one scale per token and KV head).

The scheme against torch's own rounding and float8 conversion; the reference attention over a
quantized cache against float attention over torch's dequantization of it; the Pallas kernels
(interpret mode on CPU) against the reference on the kernel tests' awkward batches; CUDA
cross-lowering and Triton builds; and the engine end to end: block budget, preemption by swap
and prefix caching with a quantized cache, no leaked blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_memory_sharing import ENDINGS, STORY, all_blocks_free, greedy, token_lists
from test_pallas_kernels import (
    BATCH_SHAPES,
    INTERPRET,
    TRITON_CALL,
    assert_close,
    awkward_seqs,
    lower_for_cuda,
    make_batch,
    quantized,
    real_tokens,
    run_jitted,
    trace_for_cuda,
    triton_kernels,
)
from tiers import FULL

from jpaged import LLM
from jpaged.config import CacheConfig
from pallas_kernels.backend import pallas_paged_attention
from pallas_kernels.decode_attention import paged_decode_attention_kernel
from pallas_kernels.paged_attention import ragged_paged_attention, write_kv
from pallas_kernels.quantized_kv import bytes_per_token_head, empty_cache, quantize, storage_dtype
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_kernel
from pallas_kernels.triton_compile import compile_kernel

pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")  # exact float32 references on a GPU

KV_DTYPES = ("int8", "fp8_e4m3")
F32, BF16 = jnp.float32, jnp.bfloat16


def torch_quantize(x: np.ndarray, kv_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The scheme written with torch: values (int8, or float8 e4m3 bits as uint8) and scales."""
    t = torch.from_numpy(np.asarray(x, np.float32))
    qmax = 127.0 if kv_dtype == "int8" else 448.0
    amax = t.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax * (1.0 / qmax), torch.ones_like(amax))
    scaled = t / scales[..., None]
    if kv_dtype == "int8":
        values = torch.round(scaled).clamp(-qmax, qmax).to(torch.int8)
    else:
        values = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    return values.numpy(), scales.numpy()


def torch_dequantize(values: np.ndarray, scales: np.ndarray, kv_dtype: str) -> np.ndarray:
    t = torch.from_numpy(np.array(values))
    widened = t.float() if kv_dtype == "int8" else t.view(torch.float8_e4m3fn).float()
    return (widened * torch.from_numpy(np.array(scales))[..., None]).numpy()


def random_vectors(seed: int, shape) -> np.ndarray:
    """Normal vectors at magnitudes from 1e-3 to 1e3, one of them all zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x *= 10.0 ** rng.uniform(-3, 3, shape[:-1])[..., None].astype(np.float32)
    x.reshape(-1, shape[-1])[0] = 0.0
    return x


# --- the scheme ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_quantize_matches_torch(kv_dtype):
    x = random_vectors(0, (40, 3, 64))
    values, scales = quantize(jnp.asarray(x), storage_dtype(kv_dtype, F32))
    expected_values, expected_scales = torch_quantize(x, kv_dtype)
    np.testing.assert_array_equal(np.asarray(scales), expected_scales)
    np.testing.assert_array_equal(np.asarray(values), expected_values)
    restored = torch_dequantize(np.asarray(values), np.asarray(scales), kv_dtype)
    bound = {"int8": 0.5 / 127, "fp8_e4m3": 2.0**-4}[kv_dtype]  # half a step, relative to the largest value
    assert np.all(np.abs(restored - x) <= bound * np.abs(x).max(axis=-1, keepdims=True) + 1e-30)


def test_unknown_kv_cache_dtype_is_named():
    with pytest.raises(ValueError, match="'fp16'"):
        storage_dtype("fp16", F32)
    with pytest.raises(ValueError, match="kv_cache_dtype.*'int4'"):
        LLM("unused", kv_cache_dtype="int4")
    assert CacheConfig(kv_cache_dtype="fp8").kv_cache_dtype == "fp8_e4m3"  # vLLM's name for it


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_bytes_per_block(kv_dtype):
    """A token's K of one head: head_dim values of one byte and a float32 scale."""
    assert bytes_per_token_head(kv_dtype, F32, 64) == 68
    assert bytes_per_token_head("auto", F32, 64) == 256 and bytes_per_token_head("auto", BF16, 64) == 128


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_write_kv_quantizes_only_the_named_slots(kv_dtype):
    shape = (2, 6, 4, 3, 16)
    k_cache, v_cache = (empty_cache(shape, kv_dtype, F32) for _ in "kv")
    k, v = random_vectors(1, (5, 3, 16)), random_vectors(2, (5, 3, 16))
    slots = np.array([3, -1, 9, 22, 0], np.int32)
    k_cache, v_cache = write_kv(k_cache, v_cache, 1, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    for cache, x in ((k_cache, k), (v_cache, v)):
        values, scales = np.asarray(cache.values), np.asarray(cache.scales)
        expected_values, expected_scales = torch_quantize(x, kv_dtype)
        written = slots >= 0
        blocks, offsets = slots[written] // 4, slots[written] % 4
        np.testing.assert_array_equal(values[1, blocks, offsets], expected_values[written])
        np.testing.assert_array_equal(scales[1, blocks, offsets], expected_scales[written])
        untouched = np.ones(shape[:3], bool)
        untouched[1, blocks, offsets] = False
        assert not values[untouched].any() and not scales[untouched].any()


# --- attention over a quantized cache ------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_reference_equals_float_attention_over_dequantized_cache(kv_dtype):
    batch = make_batch(3, awkward_seqs(16, chunk=20), num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                       num_blocks=32)
    quantized_kv = quantized(batch, kv_dtype)
    dequantized = dataclasses.replace(batch, **{
        name: jnp.asarray(torch_dequantize(np.asarray(cache.values), np.asarray(cache.scales), kv_dtype))
        for name, cache in (("k_cache", quantized_kv.k_cache), ("v_cache", quantized_kv.v_cache))})
    real = real_tokens(batch.md)
    out = np.asarray(run_jitted(ragged_paged_attention, quantized_kv))[real]
    np.testing.assert_allclose(out, np.asarray(run_jitted(ragged_paged_attention, dequantized))[real],
                               atol=1e-6, rtol=1e-6)
    exact = np.asarray(run_jitted(ragged_paged_attention, batch))[real]
    error = np.abs(out - exact).mean() / np.abs(exact).mean()
    assert error < {"int8": 0.01, "fp8_e4m3": 0.05}[kv_dtype], error


KERNEL_CASES = [(kv, dtype) for kv in KV_DTYPES for dtype in (F32, BF16)]


def kernel_case_id(case) -> str:
    return f"{case[0]}-{jnp.dtype(case[1]).name}"


def assert_kernel_matches_reference(out, batch, dtype):
    real = real_tokens(batch.md)
    assert out.dtype == batch.q.dtype and np.isfinite(np.asarray(out, np.float32)).all()
    expected = np.asarray(run_jitted(ragged_paged_attention, batch), np.float32)[real]
    assert_close(np.asarray(out, np.float32)[real], expected, dtype)


@pytest.mark.parametrize(("kv_dtype", "dtype"), KERNEL_CASES, ids=map(kernel_case_id, KERNEL_CASES))
def test_ragged_kernel_over_quantized_cache(kv_dtype, dtype):
    batch = quantized(make_batch(7, awkward_seqs(16, chunk=24), num_heads=4, num_kv_heads=2, head_dim=64,
                                       block_size=16, num_blocks=32, dtype=dtype), kv_dtype)
    out = run_jitted(ragged_paged_attention_kernel, batch, interpret=INTERPRET, chunk_tokens=32)
    assert_kernel_matches_reference(out, batch, dtype)


@pytest.mark.parametrize(("kv_dtype", "dtype"), KERNEL_CASES, ids=map(kernel_case_id, KERNEL_CASES))
def test_decode_kernel_over_quantized_cache(kv_dtype, dtype):
    batch = quantized(make_batch(8, [(0, 1), (14, 1), (15, 1), (47, 1), (90, 1)], num_heads=8,
                                       num_kv_heads=2, head_dim=48, block_size=16, num_blocks=24, dtype=dtype),
                            kv_dtype)
    md = batch.md
    out = jax.jit(lambda q, k, v: paged_decode_attention_kernel(
        q, k, v, jnp.int32(1), md.block_tables, jnp.where(md.query_lens == 1, md.context_lens, 0), batch.scale,
        num_splits=2, interpret=INTERPRET))(batch.q[:md.block_tables.shape[0]], batch.k_cache, batch.v_cache)
    rows = np.asarray(md.query_lens) == 1
    expected = run_jitted(ragged_paged_attention, batch)[:md.block_tables.shape[0]]
    assert_close(np.asarray(out, np.float32)[rows], np.asarray(expected, np.float32)[rows], dtype)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_pallas_backend_mixed_batch_over_quantized_cache(kv_dtype):
    batch = quantized(make_batch(9, awkward_seqs(16, chunk=12), num_heads=6, num_kv_heads=3, head_dim=32,
                                       block_size=16, num_blocks=32), kv_dtype)
    assert_kernel_matches_reference(run_jitted(pallas_paged_attention, batch, interpret=INTERPRET), batch, F32)


# --- CUDA --------------------------------------------------------------------------------------

QUANTIZED_CONFIGS = [("int8", BF16, 128, 16, 32, 8), ("fp8_e4m3", BF16, 64, 16, 9, 3), ("int8", F32, 80, 32, 10, 10)]


def config_batch(config, seqs):
    kv_dtype, dtype, head_dim, block_size, num_heads, num_kv_heads = config
    batch = make_batch(0, seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       block_size=block_size, num_blocks=40, dtype=dtype)
    return quantized(batch, kv_dtype)


@pytest.mark.parametrize("config", QUANTIZED_CONFIGS, ids=lambda c: f"{c[0]}-{jnp.dtype(c[1]).name}-d{c[2]}")
def test_quantized_cache_cross_lowers_for_cuda(config):
    batch = config_batch(config, BATCH_SHAPES["mixed"])
    assert lower_for_cuda(batch, batch.k_cache, batch.v_cache, config[1]).count(TRITON_CALL) == 2


@pytest.mark.parametrize("capability", [pytest.param(80, marks=FULL), pytest.param(89, marks=FULL), 90])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_quantized_cache_kernels_compile_with_triton(kv_dtype, capability):
    config = (kv_dtype, BF16, 128, 16, 32, 8)
    batch = config_batch(config, BATCH_SHAPES["mixed"])
    kernels = triton_kernels(trace_for_cuda(batch, batch.k_cache, batch.v_cache, BF16))
    assert len(kernels) == 2
    for kernel in kernels:
        resources = compile_kernel(kernel, capability)
        assert resources.fits and resources.tensor_core_ops > 0, (kernel.name, resources)


# --- the engine ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_a_budget_holds_more_quantized_blocks(stories_path, kv_dtype):
    budget = 0.002  # GiB
    plain = LLM(stories_path, cpu_kv_cache_gib=budget)
    quantized = LLM(stories_path, cpu_kv_cache_gib=budget, kv_cache_dtype=kv_dtype)
    cfg = plain.engine.runner.model_config
    per_block = 2 * cfg.num_layers * cfg.num_kv_heads * 16 * (cfg.head_dim + 4)
    stats = quantized.engine.stats()
    assert stats.num_blocks == stats.num_free_blocks == quantized.engine.runner.num_blocks
    assert stats.num_blocks == int(budget * 2**30 // per_block)
    assert stats.kv_cache_bytes == stats.num_blocks * per_block <= budget * 2**30
    assert stats.num_blocks >= 2.5 * plain.engine.stats().num_blocks  # head_dim 8: 32 / 12 bytes


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_swaps_and_prefix_hits_move_quantized_blocks_whole(stories_path, kv_dtype):
    """Preempted by swapping, or reusing another request's cached prefix, a request generates the
    tokens it generates alone in a roomy cache of the same dtype; every block is free afterwards."""
    prompts = [STORY[: 20 + 9 * i] for i in range(8)] + [STORY + ending for ending in ENDINGS[:3]]
    params = [greedy(30 + 5 * (i % 4)) for i in range(len(prompts))]
    roomy = LLM(stories_path, num_blocks=512, enable_prefix_caching=False, kv_cache_dtype=kv_dtype)
    expected = token_lists(roomy.generate(prompts, params, use_tqdm=False))
    tight = LLM(stories_path, num_blocks=16, preemption_mode="swap", swap_space_gib=0.01, kv_cache_dtype=kv_dtype)
    assert token_lists(tight.generate(prompts, params, use_tqdm=False)) == expected
    stats = tight.engine.stats()
    assert stats.num_swap_outs > 0 and stats.prefix_cache_hit_rate > 0
    assert all_blocks_free(tight)
    assert tight.engine.block_manager.num_free_host_blocks == tight.engine.block_manager.num_host_blocks
