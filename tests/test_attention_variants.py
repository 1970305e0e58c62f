"""Sliding-window attention and soft-capped scores in every attention path: the jnp reference
against jax's own `jax.nn.dot_product_attention` with `local_window_size` (and, for soft caps, a
dense numpy softmax), then the Pallas kernels (interpret mode on CPU) and the CPU kernel against
the reference, on the awkward ragged batches of the kernel tests, with windows shorter than a
block, of one block, spanning several and longer than any context; images whose tokens see each
other (Gemma 3's bidirectional attention inside an image) against jax's own attention with an
explicit mask; and windowed models against HF.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_kernels import (
    BF16,
    F32,
    INTERPRET,
    LAYER,
    assert_matches_reference,
    attention_program,
    awkward_seqs,
    make_batch,
    quantized,
    run_jitted,
)

from pallas_kernels.backend import pallas_paged_attention
from pallas_kernels.decode_attention import paged_decode_attention_kernel
from pallas_kernels.paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_kernel

WINDOWS = (1, 3, 16, 21, 45, 1000)


def laid_out_rows(batch):
    """Each real row's queries, keys and values over its whole context laid out in order, padded
    to the longest context: `(rows, queries, keys, values)`, rows as (row, new tokens, context,
    first token)."""
    md = batch.md
    rows = [(row, *(int(x[row]) for x in (md.query_lens, md.context_lens, md.query_start)))
            for row in range(md.block_tables.shape[0])]
    rows = [r for r in rows if r[1] > 0]
    longest = max(ctx for _, _, ctx, _ in rows)
    queries = np.zeros((len(rows), longest, *batch.q.shape[1:]), np.float32)
    keys = np.zeros((len(rows), longest, *batch.k_cache.shape[3:]), np.float32)
    values = np.zeros_like(keys)
    k_cache, v_cache, q = (np.asarray(a, np.float32) for a in (batch.k_cache[LAYER], batch.v_cache[LAYER], batch.q))
    for i, (row, n, ctx, start) in enumerate(rows):
        blocks = np.asarray(md.block_tables[row])
        keys[i, :ctx] = k_cache[blocks].reshape(-1, *keys.shape[2:])[:ctx]
        values[i, :ctx] = v_cache[blocks].reshape(-1, *keys.shape[2:])[:ctx]
        queries[i, ctx - n:ctx] = q[start:start + n]  # at the context's last n positions
    return rows, queries, keys, values


def flat_tokens(batch, rows, attended) -> np.ndarray:
    """The laid-out rows' results `attended [rows, longest, heads, head_dim]` back at their flat
    tokens: float32 `[T, heads, head_dim]`."""
    out = np.zeros(batch.q.shape, np.float32)
    for i, (_, n, ctx, start) in enumerate(rows):
        out[start:start + n] = np.asarray(attended)[i, ctx - n:ctx]
    return out


def jax_windowed_oracle(batch, window: int) -> np.ndarray:
    """Each row's queries over its whole context, by one call of `jax.nn.dot_product_attention`
    over every row (keys past a row's context masked by `key_value_seq_lengths`) with a causal mask
    and `local_window_size=(window - 1, 0)`; float32 `[T, heads, head_dim]`."""
    rows, queries, keys, values = laid_out_rows(batch)
    attended = jax.nn.dot_product_attention(
        queries, keys, values, scale=batch.scale, is_causal=True, local_window_size=(window - 1, 0),
        key_value_seq_lengths=jnp.asarray([ctx for _, _, ctx, _ in rows], jnp.int32), implementation="xla")
    return flat_tokens(batch, rows, attended)


def dense_softcap_oracle(batch, window: int, softcap: float | None, sinks=None) -> np.ndarray:
    """Each row's queries over its context in float64 numpy: scores q . k * scale, capped at
    `softcap` (where given), masked causally and to the window, softmax (with each head's sink
    logit in the denominator, where `sinks [heads]` are given, as HF's gpt-oss appends it as one
    more score and drops its probability), times the values."""
    md, group = batch.md, batch.q.shape[1] // batch.k_cache.shape[3]
    out = np.zeros(batch.q.shape, np.float64)
    for row in range(md.block_tables.shape[0]):
        n, ctx, start = (int(x[row]) for x in (md.query_lens, md.context_lens, md.query_start))
        if n == 0:
            continue
        blocks = np.asarray(md.block_tables[row])
        keys = np.asarray(batch.k_cache[LAYER], np.float64)[blocks].reshape(-1, *batch.k_cache.shape[3:])[:ctx]
        values = np.asarray(batch.v_cache[LAYER], np.float64)[blocks].reshape(-1, *batch.v_cache.shape[3:])[:ctx]
        keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
        queries = np.asarray(batch.q[start:start + n], np.float64)
        scores = np.einsum("qhd,khd->hqk", queries, keys) * batch.scale
        if softcap is not None:
            scores = softcap * np.tanh(scores / softcap)
        query_pos, key_pos = np.arange(ctx - n, ctx)[:, None], np.arange(ctx)[None, :]
        scores = np.where((key_pos <= query_pos) & (key_pos > query_pos - window), scores, -np.inf)
        if sinks is not None:  # one more column per head: its sink, which has no value
            column = np.broadcast_to(np.asarray(sinks, np.float64)[:, None, None], (*scores.shape[:2], 1))
            scores = np.concatenate([scores, column], axis=-1)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = (probs / probs.sum(axis=-1, keepdims=True))[..., :ctx]
        out[start:start + n] = np.einsum("hqk,khd->qhd", probs, values)
    return out


def real_rows(batch) -> np.ndarray:
    mask = np.zeros(batch.q.shape[0], bool)
    for start, n in zip(np.asarray(batch.md.query_start), np.asarray(batch.md.query_lens)):
        mask[start:start + n] = True
    return mask


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_reference_matches_jax_dot_product_attention(window, block_size):
    batch = make_batch(window + block_size, awkward_seqs(block_size, chunk=37), num_heads=6, num_kv_heads=2,
                       head_dim=32, block_size=block_size, num_blocks=200)
    out = np.asarray(run_jitted(ragged_paged_attention, batch, window))
    real = real_rows(batch)
    np.testing.assert_allclose(out[real], jax_windowed_oracle(batch, window)[real], atol=2e-5, rtol=2e-5)


def test_window_zero_or_beyond_every_context_is_full_attention():
    batch = make_batch(7, awkward_seqs(16, chunk=37), num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                       num_blocks=64)
    full = np.asarray(run_jitted(ragged_paged_attention, batch))
    for window in (0, 10_000):
        np.testing.assert_array_equal(np.asarray(run_jitted(ragged_paged_attention, batch, window)), full)


def test_reference_windowed_token_independent_of_its_batch():
    """A decode token's attention is the same bits alone and beside rows with longer contexts
    (whose windows start later, so the loop over chunks starts elsewhere)."""
    alone = make_batch(3, [(70, 1)], num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, num_blocks=100)
    crowded = make_batch(3, [(70, 1), (300, 1), (250, 40)], num_heads=4, num_kv_heads=2, head_dim=32,
                         block_size=8, num_blocks=100)
    # The same query and keys for the shared row: copy them over.
    crowded.q = crowded.q.at[0].set(alone.q[0])
    blocks_alone, blocks_crowded = alone.md.block_tables[0, :9], crowded.md.block_tables[0, :9]
    crowded.k_cache = crowded.k_cache.at[LAYER, blocks_crowded].set(alone.k_cache[LAYER, blocks_alone])
    crowded.v_cache = crowded.v_cache.at[LAYER, blocks_crowded].set(alone.v_cache[LAYER, blocks_alone])
    a = np.asarray(run_jitted(ragged_paged_attention, alone, 20))[0]
    b = np.asarray(run_jitted(ragged_paged_attention, crowded, 20))[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("window", (1, 21, 45))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_ragged_kernel_with_window(window, dtype):
    batch = make_batch(window, awkward_seqs(16, chunk=24), num_heads=4, num_kv_heads=2, head_dim=64,
                       block_size=16, num_blocks=32, dtype=dtype)
    out = run_jitted(ragged_paged_attention_kernel, batch, window, interpret=INTERPRET, chunk_tokens=32)
    assert_matches_reference(out, batch, dtype, window=window)


@pytest.mark.parametrize("window", (3, 40))
def test_decode_kernel_and_backend_with_window(window):
    seqs = [(0, 1), (15, 1), (60, 1), (130, 1), (33, 20)]
    batch = make_batch(window + 1, seqs, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, num_blocks=40)
    rows = slice(0, 4)
    queries = batch.q[batch.md.query_start[rows]]
    decode = jax.jit(lambda q, k, v, bt, cl, w: paged_decode_attention_kernel(
        q, k, v, jnp.int32(LAYER), bt, cl, batch.scale, w, num_splits=3, chunk_tokens=16, interpret=INTERPRET))
    out = decode(queries, batch.k_cache, batch.v_cache, batch.md.block_tables[rows], batch.md.context_lens[rows],
                 jnp.int32(window))
    expected = np.asarray(run_jitted(ragged_paged_attention, batch, window))[np.asarray(batch.md.query_start[rows])]
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)
    whole = run_jitted(pallas_paged_attention, batch, window, interpret=INTERPRET)
    assert_matches_reference(whole, batch, F32, window=window)


# (block_size, heads, kv_heads, head_dim): blocks smaller and larger than the kernel's 16 lanes,
# head_dims on its vector path and off it.
CPU_SHAPES = [(16, 9, 3, 64), (8, 8, 2, 64), (4, 4, 2, 8), (32, 8, 1, 128)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")
@pytest.mark.parametrize("window", (1, 5, 16, 37, 1000))
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "bs{}-h{}-kv{}-d{}".format(*s))
def test_cpu_kernel_with_window(shape, window, cpu_kernels_built):
    from pallas_kernels.cpu_paged_attention import cpu_ragged_paged_attention

    block_size, heads, kv_heads, head_dim = shape
    batch = make_batch(window, awkward_seqs(block_size, chunk=37), num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=head_dim, block_size=block_size, num_blocks=160)
    step = attention_program(cpu_ragged_paged_attention, batch.scale, None, ())
    assert "jpaged_attention_" in step.lower(*batch.args(), jnp.int32(window), None).as_text()
    assert_matches_reference(run_jitted(cpu_ragged_paged_attention, batch, window), batch, F32, window=window)
    # An int8 cache: the kernel against the reference over the same quantized cache.
    int8 = quantized(batch, "int8")
    kernel = run_jitted(cpu_ragged_paged_attention, int8, window)
    expected = run_jitted(ragged_paged_attention, int8, window)
    real = real_rows(batch)
    np.testing.assert_allclose(np.asarray(kernel)[real], np.asarray(expected)[real], atol=2e-5, rtol=2e-5)


# --- whole models against HF transformers ---------------------------------------------------------

WINDOWED_MODELS = {
    # Every layer windowed (Mistral's rule), GQA 4:1; block size 4, so windows span blocks.
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=6)),
    # The Qwen rule: layers from max_window_layers on, here the second of two.
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                  sliding_window=5, max_window_layers=1)),
}


@pytest.fixture(scope="module", params=list(WINDOWED_MODELS))
def windowed_model(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from hf_models import save_random_model

    config_class, overrides = WINDOWED_MODELS[request.param]
    config = getattr(transformers, config_class)(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **overrides)
    folder = tmp_path_factory.mktemp(f"windowed_{request.param}")
    return request.param, save_random_model(folder, config, seed=7), str(folder)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_windowed_models_match_hf(windowed_model, backend):
    """Prompt logprobs and greedy tokens far past the window, whole and in prefill chunks of 8 (a
    chunk's queries then reach back into earlier chunks' windows), equal HF's."""
    from hf_models import hf_greedy, hf_logits

    from jpaged import LLM, SamplingParams

    name, model, folder = windowed_model
    windows = {"mistral": (6, 6), "qwen2": (0, 5)}[name]
    rng = np.random.default_rng(3)
    prompt = rng.integers(3, 256, 29).tolist()
    expected = hf_logits(model, prompt)
    expected = expected - np.logaddexp.reduce(expected, axis=-1, keepdims=True)
    continuation = hf_greedy(model, prompt, 24)
    for chunk in (128, 8):
        llm = LLM(folder, dtype="float32", num_blocks=64, block_size=4, max_model_len=128, attention_backend=backend,
                  max_num_batched_tokens=chunk, enable_prefix_caching=False)
        assert llm.engine.model_config.sliding_windows == windows
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=5)
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == continuation
        for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
            tokens = list(entry)
            np.testing.assert_allclose([entry[t].logprob for t in tokens], expected[position - 1][tokens],
                                       atol=1e-4, rtol=1e-4)


def test_blocks_behind_every_window_are_released_and_tokens_stay_hf_greedy(windowed_model):
    """Four 29-token prompts, 24 tokens each, on a 24-block cache of 4-token blocks: kept whole
    they need 56 blocks, and the model with a full-attention layer (Qwen2 here) is preempted. With
    every layer windowed (Mistral) each sequence keeps only the blocks its next token's window
    reaches, so all four run without a preemption. Both give HF's greedy tokens, and every block
    is free again at the end."""
    from hf_models import hf_greedy

    from jpaged import LLM, SamplingParams

    name, model, folder = windowed_model
    llm = LLM(folder, dtype="float32", num_blocks=24, block_size=4, max_model_len=64, enable_prefix_caching=False)
    engine = llm.engine
    assert engine.model_config.kv_window == (6 if name == "mistral" else None)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 256, 29).tolist() for _ in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == hf_greedy(model, prompt, 24)
    stats = engine.stats()
    assert (stats.num_preemptions == 0) == (name == "mistral")
    assert stats.num_free_blocks == stats.num_blocks == 24
    engine.block_manager.check_invariants()


def test_a_windowed_model_serves_sequences_longer_than_its_cache(windowed_model):
    """A 24-block cache (96 tokens) and steps of at most 8 tokens: a Mistral sequence never holds
    more than its window's and its next chunk's 5 blocks, so max_model_len stays at 128 and a
    29-token prompt continues for 90 tokens as HF's greedy does. A shorter request run twice
    takes its window's blocks from the prefix cache the second time, same tokens. Qwen2's full-attention
    layer needs every block, so its max_model_len is lowered to what the cache holds."""
    from hf_models import hf_greedy

    from jpaged import LLM, SamplingParams

    name, model, folder = windowed_model
    llm = LLM(folder, dtype="float32", num_blocks=24, block_size=4, max_model_len=128, max_num_batched_tokens=8)
    if name != "mistral":
        assert llm.engine.max_model_len == 96
        return
    assert llm.engine.max_model_len == 128
    rng = np.random.default_rng(12)
    prompt = rng.integers(3, 256, 29).tolist()
    long = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True),
                        use_tqdm=False)[0]
    assert list(long.outputs[0].token_ids) == hf_greedy(model, prompt, 90)
    prompt = rng.integers(3, 256, 29).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    first, again = (llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0] for _ in range(2))
    assert list(first.outputs[0].token_ids) == list(again.outputs[0].token_ids) == hf_greedy(model, prompt, 20)
    assert first.metrics.num_cached_prompt_tokens == 0 < again.metrics.num_cached_prompt_tokens
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks == 24
    llm.engine.block_manager.check_invariants()


# --- soft-capped scores (Gemma 2) -----------------------------------------------------------------

@pytest.mark.parametrize(("window", "softcap"), [(1000, 1.5), (7, 0.8)])
def test_reference_softcap_matches_dense_oracle(window, softcap):
    batch = make_batch(11, awkward_seqs(8, chunk=30), num_heads=6, num_kv_heads=2, head_dim=32, block_size=8,
                       num_blocks=120)
    out = np.asarray(run_jitted(ragged_paged_attention, batch, window, softcap))
    real = real_rows(batch)
    np.testing.assert_allclose(out[real], dense_softcap_oracle(batch, window, softcap)[real], atol=2e-5, rtol=2e-5)
    uncapped = np.asarray(run_jitted(ragged_paged_attention, batch, window))
    assert np.abs(uncapped - out)[real].max() > 0.05  # the cap bends these scores


@pytest.mark.parametrize("window", (0, 21))
def test_kernels_with_softcap(window, cpu_kernels_built):
    batch = make_batch(window + 5, awkward_seqs(16, chunk=24), num_heads=4, num_kv_heads=2, head_dim=64,
                       block_size=16, num_blocks=32)
    assert_matches_reference(run_jitted(pallas_paged_attention, batch, window, 1.5, interpret=INTERPRET), batch, F32,
                             window=window, softcap=1.5)
    if jax.default_backend() == "cpu":
        from pallas_kernels.cpu_paged_attention import cpu_ragged_paged_attention

        assert_matches_reference(run_jitted(cpu_ragged_paged_attention, batch, window, 1.5), batch, F32,
                                 window=window, softcap=1.5)


# --- attention sinks (gpt-oss) ---------------------------------------------------------------------

def _sinks(num_heads: int, seed: int) -> jax.Array:
    """Sink logits spread over the scores' range, so that some heads give them most weight."""
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, 2.0, num_heads), jnp.float32)


@pytest.mark.parametrize("window", (1000, 7))
def test_reference_sinks_match_dense_oracle(window):
    batch = make_batch(13, awkward_seqs(8, chunk=30), num_heads=6, num_kv_heads=2, head_dim=32, block_size=8,
                       num_blocks=120)
    sinks = _sinks(6, window)
    out = np.asarray(run_jitted(ragged_paged_attention, batch, window, sinks=sinks))
    real = real_rows(batch)
    np.testing.assert_allclose(out[real], dense_softcap_oracle(batch, window, None, sinks)[real], atol=2e-5, rtol=2e-5)
    without = np.asarray(run_jitted(ragged_paged_attention, batch, window))
    assert np.abs(without - out)[real].max() > 0.05  # the sinks take weight from the keys


@pytest.mark.parametrize("window", (0, 21))
def test_kernels_with_sinks(window, cpu_kernels_built):
    """The Pallas kernels (ragged, flash-decoding with its splits, the backend's mix of both) and
    the CPU kernel against the reference, with sinks, beside a window and a soft cap."""
    batch = make_batch(window + 7, awkward_seqs(16, chunk=24), num_heads=4, num_kv_heads=2, head_dim=64,
                       block_size=16, num_blocks=32)
    sinks = _sinks(4, window + 1)
    expected = np.asarray(run_jitted(ragged_paged_attention, batch, window, 1.5, sinks=sinks))
    real = real_rows(batch)
    outputs = [run_jitted(pallas_paged_attention, batch, window, 1.5, sinks=sinks, interpret=INTERPRET),
               run_jitted(ragged_paged_attention_kernel, batch, window, 1.5, sinks=sinks, interpret=INTERPRET)]
    if jax.default_backend() == "cpu":
        from pallas_kernels.cpu_paged_attention import cpu_ragged_paged_attention

        outputs.append(run_jitted(cpu_ragged_paged_attention, batch, window, 1.5, sinks=sinks))
    for out in outputs:
        np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=2e-5, rtol=2e-5)
    md = batch.md
    decodes = np.asarray(md.query_lens) == 1
    q, args = batch.q[:md.block_tables.shape[0]], batch.args()
    context = jnp.where(jnp.asarray(decodes), md.context_lens, 0)
    for splits in (1, 3):
        split = paged_decode_attention_kernel(q, args[1], args[2], LAYER, md.block_tables, context, batch.scale,
                                              jnp.int32(window), 1.5, sinks, num_splits=splits, interpret=INTERPRET)
        np.testing.assert_allclose(np.asarray(split)[decodes], expected[:len(decodes)][decodes], atol=2e-5, rtol=2e-5)


def test_windowed_softcapped_kernels_cross_lower_and_compile_for_cuda():
    """Gemma 2's and 3's shape (bfloat16, head_dim 256, every other layer windowed, capped scores,
    images whose tokens see each other) through the model's layer scan with the Pallas backend:
    lowered for CUDA, both kernels; compiled by Triton for sm_90 where the `triton` package is
    installed."""
    from test_pallas_kernels import TRITON_CALL, layer_scan, triton_kernels

    from jpaged.model_runner import matmul_precision
    from pallas_kernels.backend import select_attention
    from pallas_kernels.triton_compile import compile_kernel

    batch, _ = with_image_spans(make_batch(0, [(5, 1), (70, 1), (0, 21), (16, 3)], num_heads=8, num_kv_heads=4,
                                           head_dim=256, block_size=16, num_blocks=40, dtype=BF16), 0)
    attend = select_attention("pallas", 256, platform="cuda")
    windows = jnp.asarray([6, 0], jnp.int32)

    def attention(q, k_cache, v_cache, layer, md, scale):
        return attend(q, k_cache, v_cache, layer, md, scale, window=windows[layer], softcap=50.0)

    new_kv = jnp.zeros((batch.q.shape[0], 4, 256), BF16)
    with matmul_precision(BF16):
        traced = jax.jit(layer_scan(attention), static_argnums=6).trace(
            batch.q, new_kv, new_kv, batch.k_cache, batch.v_cache, batch.md, batch.scale)
    assert traced.lower(lowering_platforms=("cuda",)).as_text().count(TRITON_CALL) == 2
    for kernel in triton_kernels(traced):
        assert compile_kernel(kernel, 90).fits


def test_windowed_layers_keep_their_windows_in_pipeline_stages(windowed_model):
    """Under pipeline parallelism each stage's layers take their own windows (Qwen2's: only the
    second stage's layer is windowed), on two emulated devices in a fresh process."""
    import os
    import subprocess
    import sys

    from hf_models import hf_greedy

    name, model, folder = windowed_model
    prompt = np.random.default_rng(5).integers(3, 256, 29).tolist()
    script = ("import sys; from jpaged import LLM, SamplingParams\n"
              f"llm = LLM({folder!r}, dtype='float32', num_blocks=64, block_size=4, max_model_len=128, "
              "pipeline_parallel_size=2)\n"
              f"out = llm.generate({{'prompt_token_ids': {prompt}}}, SamplingParams(temperature=0.0, max_tokens=16, "
              "ignore_eos=True), use_tqdm=False)[0]\n"
              "print('TOKENS', list(out.outputs[0].token_ids))\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    tokens = next(line for line in run.stdout.splitlines() if line.startswith("TOKENS"))
    assert tokens == f"TOKENS {hf_greedy(model, prompt, 16)}"


# --- images read bidirectionally (Gemma 3) -----------------------------------------------------------

def with_image_spans(batch, seed: int):
    """The batch with `key_ends`: in every prefill row of 3 or more new tokens, a random run of its
    new tokens (an image; from the row's first new token in some rows, as after a prefix-cache hit
    inside an image) whose tokens see the whole run; every other token sees up to itself. Also
    each token's key end, `[T]` int32 (0 for padding)."""
    rng, md = np.random.default_rng(seed), batch.md
    ends = np.zeros(batch.q.shape[0], np.int32)
    for start, n, ctx in zip(*(np.asarray(x) for x in (md.query_start, md.query_lens, md.context_lens))):
        first_pos = ctx - n
        ends[start:start + n] = first_pos + 1 + np.arange(n)
        if n >= 3:
            a = int(rng.integers(0, n - 2))
            b = int(rng.integers(a + 2, n + 1))
            ends[start + a:start + b] = first_pos + b
    return dataclasses.replace(batch, md=dataclasses.replace(md, key_ends=jnp.asarray(ends))), ends


def jax_image_oracle(batch, ends: np.ndarray, window: int) -> np.ndarray:
    """Each row's queries over its whole context by one call of `jax.nn.dot_product_attention`
    with an explicit mask: key k visible to the query at position p when k < its key end and
    k > p - window; float32 `[T, heads, head_dim]`."""
    rows, queries, keys, values = laid_out_rows(batch)
    mask = np.zeros((len(rows), 1, keys.shape[1], keys.shape[1]), bool)
    key_pos = np.arange(keys.shape[1])
    for i, (_, n, ctx, start) in enumerate(rows):
        for p, end in zip(range(ctx - n, ctx), ends[start:start + n]):
            mask[i, 0, p] = (key_pos < end) & (key_pos > p - window)
    attended = jax.nn.dot_product_attention(queries, keys, values, scale=batch.scale, mask=jnp.asarray(mask),
                                            implementation="xla")
    return flat_tokens(batch, rows, attended)


@pytest.mark.parametrize("window", (1000, 5))
def test_reference_with_images_matches_jax_dot_product_attention(window):
    causal = make_batch(window + 3, awkward_seqs(8, chunk=37), num_heads=6, num_kv_heads=2, head_dim=32,
                        block_size=8, num_blocks=120)
    batch, ends = with_image_spans(causal, window)
    out = np.asarray(run_jitted(ragged_paged_attention, batch, window))
    real = real_rows(batch)
    np.testing.assert_allclose(out[real], jax_image_oracle(batch, ends, window)[real], atol=2e-5, rtol=2e-5)
    moved = np.abs(out - np.asarray(run_jitted(ragged_paged_attention, causal, window))).max(axis=(1, 2))
    assert moved[real].max() > 0.05  # the images' tokens read their later tokens


@pytest.mark.parametrize("window", (0, 6))
def test_kernels_with_images(window, request):
    """The ragged Pallas kernel, the Pallas backend (decode kernel and ragged kernel) and the CPU
    kernel against the reference, with images read bidirectionally, beside a window, over float32
    and int8 caches."""
    causal = make_batch(window + 9, awkward_seqs(16, chunk=40), num_heads=4, num_kv_heads=2, head_dim=64,
                        block_size=16, num_blocks=40)
    batch, _ = with_image_spans(causal, window + 1)
    real = real_rows(batch)
    for cache in (batch, quantized(batch, "int8")):
        expected = np.asarray(run_jitted(ragged_paged_attention, cache, window))
        outputs = [run_jitted(pallas_paged_attention, cache, window, interpret=INTERPRET),
                   run_jitted(ragged_paged_attention_kernel, cache, window, interpret=INTERPRET, chunk_tokens=32)]
        if jax.default_backend() == "cpu":  # the C++ kernel (built here only: the GPU check runs this test too)
            from pallas_kernels.cpu_paged_attention import cpu_ragged_paged_attention

            request.getfixturevalue("cpu_kernels_built")
            outputs.append(run_jitted(cpu_ragged_paged_attention, cache, window))
        for out in outputs:
            np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=2e-5, rtol=2e-5)
