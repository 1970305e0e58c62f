"""The device sampler against oracles: numpy argmax, HF transformers' logits warpers, and the
softmax distribution it should draw from."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jpaged.sampler import first_argmax, masked_logits, sample, to_uniform
from jpaged.sampling_params import SamplingParams
from jpaged.step_batch import SamplingArrays

sample_jit = jax.jit(sample, static_argnames="all_greedy")
masked_logits_jit = jax.jit(masked_logits)


def random_logits(rng, num_rows, vocab_size, scale=3.0):
    return (rng.standard_normal((num_rows, vocab_size)) * scale).astype(np.float32)


def build(params, seeds=None, steps=None, pad_to=None):
    seeds = seeds if seeds is not None else [1234] * len(params)
    steps = steps if steps is not None else [0] * len(params)
    return SamplingArrays.build(params, seeds, steps, pad_to or len(params))


def hf_masked_logits(row_logits, params):
    """Apply HF's warpers, in HF's order, to one row; -inf where a token is removed."""
    scores = torch.from_numpy(row_logits)[None, :]
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warper in warpers:
        scores = warper(None, scores)
    return scores[0].numpy()


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_first_argmax_is_jax_argmax(dtype):
    """Ties (first index wins), rows with NaN (the first NaN, as jnp.argmax), infinities, all -inf."""
    rng = np.random.default_rng(7)
    logits = rng.integers(-3, 4, (40, 333)).astype(np.float32)  # many ties
    logits[1, [5, 200]] = np.nan
    logits[2, :] = -np.inf
    logits[3, [9, 30]] = np.inf
    logits[4, [17]] = np.inf
    logits[4, [40]] = np.nan
    logits[5, :] = np.nan
    logits[6, -1] = 50.0
    x = jnp.asarray(logits).astype(dtype)
    expected = np.asarray(jnp.argmax(x, axis=-1))
    got = np.asarray(jax.jit(first_argmax)(x))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got[:7], [np.argmax(logits[0]), 5, 0, 9, 40, 0, 332])
    np.testing.assert_array_equal(np.asarray(first_argmax(x[6])), 332)  # one row


@pytest.mark.parametrize(("num_rows", "vocab_size"), [(1, 1), (1, 7), (3, 128), (16, 1000)])
def test_greedy_matches_numpy_argmax(num_rows, vocab_size):
    rng = np.random.default_rng(num_rows * 1000 + vocab_size)
    logits = random_logits(rng, num_rows, vocab_size)
    arrays = build([SamplingParams(temperature=0.0)] * num_rows)
    expected = np.argmax(logits, axis=-1)
    for all_greedy in (True, False):
        tokens = sample_jit(jnp.asarray(logits), arrays, all_greedy=all_greedy)
        assert tokens.dtype == jnp.int32 and tokens.shape == (num_rows,)
        np.testing.assert_array_equal(np.asarray(tokens), expected)


def test_greedy_ties_take_lowest_index():
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    arrays = build([SamplingParams(temperature=0.0)] * 2)
    for all_greedy in (True, False):
        tokens = sample_jit(jnp.asarray(logits), arrays, all_greedy=all_greedy)
        np.testing.assert_array_equal(np.asarray(tokens), np.argmax(logits, axis=-1))


def test_greedy_bfloat16_logits():
    rng = np.random.default_rng(7)
    logits = jnp.asarray(random_logits(rng, 4, 300)).astype(jnp.bfloat16)
    tokens = sample_jit(logits, build([SamplingParams(temperature=0.0)] * 4), all_greedy=False)
    expected = np.argmax(np.asarray(logits.astype(jnp.float32)), axis=-1)
    np.testing.assert_array_equal(np.asarray(tokens), expected)


MIXED_ROWS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=0.5, min_p=0.05),
    SamplingParams(temperature=0.9, top_k=50, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.1),
    SamplingParams(temperature=0.0, top_k=3, top_p=0.5),
    SamplingParams(temperature=2.0, top_p=0.3, min_p=0.02),
    SamplingParams(temperature=0.2, top_k=1),
    SamplingParams(temperature=1.0, top_k=2000),
    SamplingParams(temperature=0.8, top_p=1e-4),
    SamplingParams(temperature=1.1, min_p=1.0),
]


@pytest.mark.parametrize("vocab_size", [64, 1000])
def test_masks_match_hf_warpers(vocab_size):
    rng = np.random.default_rng(vocab_size)
    logits = random_logits(rng, len(MIXED_ROWS), vocab_size)
    pad_to = len(MIXED_ROWS) + 3
    padded_logits = np.concatenate([logits, random_logits(rng, 3, vocab_size)])
    arrays = build(MIXED_ROWS, pad_to=pad_to)
    masked = np.asarray(masked_logits_jit(jnp.asarray(padded_logits), arrays))
    assert masked.shape == (pad_to, vocab_size) and masked.dtype == np.float32

    for row, params in enumerate(MIXED_ROWS):
        finite = np.isfinite(masked[row])
        if params.is_greedy:
            np.testing.assert_array_equal(np.flatnonzero(finite), [np.argmax(logits[row])])
            continue
        expected = hf_masked_logits(logits[row], params)
        np.testing.assert_array_equal(finite, np.isfinite(expected), err_msg=f"row {row}")
        # masked_logits subtracts each row's max before dividing: equal up to a per-row shift.
        ours = masked[row][finite] - masked[row].max()
        theirs = expected[finite] - expected.max()
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0, err_msg=f"row {row}")
    for row in range(len(MIXED_ROWS), pad_to):  # padding rows are greedy
        kept = np.flatnonzero(np.isfinite(masked[row]))
        np.testing.assert_array_equal(kept, [np.argmax(padded_logits[row])])


@pytest.mark.parametrize("num_filtered", [1, 6, 20, 64])
def test_filtered_rows_anywhere_in_a_batch_match_hf_warpers(num_filtered):
    """A 64-row batch with 1, 6, 20 or all rows filtered, at random rows; the other rows greedy or
    plain temperature, which keep their argmax or everything."""
    rng = np.random.default_rng(num_filtered)
    vocab_size = 4099
    logits = random_logits(rng, 64, vocab_size)
    logits[::5, rng.integers(0, vocab_size, 40)] = -np.inf  # tokens a grammar or bad_words removed
    filtered_rows = set(rng.choice(64, num_filtered, replace=False).tolist())
    filters = [p for p in MIXED_ROWS if not p.is_greedy and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0)]
    params = [filters[row % len(filters)] if row in filtered_rows else SamplingParams(temperature=float(row % 2))
              for row in range(64)]
    masked = np.asarray(masked_logits_jit(jnp.asarray(logits), build(params)))
    for row, p in enumerate(params):
        expected = (np.where(np.arange(vocab_size) == np.argmax(logits[row]), 0.0, -np.inf) if p.is_greedy
                    else hf_masked_logits(logits[row], p))
        np.testing.assert_array_equal(np.isfinite(masked[row]), np.isfinite(expected), err_msg=f"row {row}: {p}")


def test_ties_keep_the_whole_group_at_the_cutoff_as_hf_top_k_and_min_p():
    """Integer logits (every value shared by many tokens): top-k keeps every token tied with the
    k-th largest and min-p every token at its bound, as HF's warpers do."""
    rng = np.random.default_rng(17)
    logits = rng.integers(-6, 7, (6, 500)).astype(np.float32)
    params = [SamplingParams(top_k=1), SamplingParams(top_k=37), SamplingParams(top_k=499),
              SamplingParams(min_p=float(np.exp(-3.0))), SamplingParams(temperature=0.5, top_k=60, min_p=0.2),
              SamplingParams(top_k=500)]
    masked = np.asarray(masked_logits_jit(jnp.asarray(logits), build(params)))
    for row, p in enumerate(params):
        expected = hf_masked_logits(logits[row], p)
        np.testing.assert_array_equal(np.isfinite(masked[row]), np.isfinite(expected), err_msg=f"row {row}: {p}")


def test_sampled_tokens_stay_inside_the_mask():
    rng = np.random.default_rng(11)
    logits = jnp.asarray(random_logits(rng, len(MIXED_ROWS), 200))
    masked = np.asarray(masked_logits_jit(logits, build(MIXED_ROWS)))
    rows = np.arange(len(MIXED_ROWS))
    greedy_rows = [i for i, p in enumerate(MIXED_ROWS) if p.is_greedy]
    for step in range(20):
        arrays = build(MIXED_ROWS, seeds=list(rows), steps=[step] * len(rows))
        tokens = np.asarray(sample_jit(logits, arrays, all_greedy=False))
        assert np.all(np.isfinite(masked[rows, tokens]))
        greedy_expected = np.argmax(np.asarray(logits)[greedy_rows], axis=-1)
        np.testing.assert_array_equal(tokens[greedy_rows], greedy_expected)


def test_uniforms_stay_strictly_inside_zero_one():
    extremes = np.asarray(to_uniform(jnp.asarray([0, 1, 2**31, 2**32 - 2, 2**32 - 1], jnp.uint32)))
    assert extremes.dtype == np.float32 and np.all(extremes > 0) and np.all(extremes < 1)
    assert np.all(np.isfinite(-np.log(-np.log(extremes))))


def test_top_k_one_always_draws_the_top_token_of_a_large_vocabulary():
    """4,096 draws over 49,152 tokens: a noise that could reach +inf (a uniform of 1.0, about one
    token in 2**24) would pick a masked token in some of them."""
    rng = np.random.default_rng(5)
    logits = jnp.asarray(random_logits(rng, 64, 49152))
    params = [SamplingParams(temperature=1.0, top_k=1)] * 64
    for step in range(64):
        tokens = np.asarray(sample_jit(logits, build(params, seeds=list(range(64)), steps=[step] * 64),
                                       all_greedy=False))
        np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=-1))


def test_tiny_temperature_is_finite_and_picks_the_top_token():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(random_logits(rng, 2, 50))
    tiny = 1e-30
    arrays = build([SamplingParams(temperature=tiny), SamplingParams(temperature=tiny, top_p=0.5)])
    tokens = sample_jit(logits, arrays, all_greedy=False)
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), axis=-1))


@pytest.mark.parametrize("temperature", [1.2e-38, 1e-3, 1e4, 8.5e37])
def test_masked_tokens_stay_masked_at_extreme_temperatures(temperature):
    """Tokens outside `allowed_token_ids` are -inf before the temperature divides; at the largest
    temperature SamplingParams accepts, they must not turn into NaN (which the argmax would pick)."""
    rng = np.random.default_rng(23)
    logits = jnp.asarray(random_logits(rng, 4, 300))
    allowed = [11, 12, 13]
    params = [SamplingParams(temperature=temperature, allowed_token_ids=allowed, top_p=top_p)
              for top_p in (1.0, 0.9, 0.5, 1.0)]
    arrays = SamplingArrays.build(params, [1, 2, 3, 4], [0] * 4, 4, vocab_size=300)
    masked = np.asarray(masked_logits_jit(logits, arrays))
    assert not np.isnan(masked).any()
    assert set(np.flatnonzero(np.isfinite(masked).any(axis=0))) <= set(allowed)
    for step in range(8):
        arrays = SamplingArrays.build(params, [1, 2, 3, 4], [step] * 4, 4, vocab_size=300)
        assert set(np.asarray(sample_jit(logits, arrays, all_greedy=False)).tolist()) <= set(allowed)


@functools.partial(jax.jit, static_argnames="num_draws")
def draw_many(row_logits, arrays_row, num_draws):
    """Sample one row at steps 0..num_draws-1 (a batch of num_draws copies of the row)."""
    batch_logits = jnp.broadcast_to(row_logits, (num_draws, row_logits.shape[-1]))
    batch = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_draws,)), arrays_row)
    batch = dataclasses.replace(batch, step=jnp.arange(num_draws, dtype=jnp.int32))
    return sample(batch_logits, batch, all_greedy=False)


def test_empirical_distribution_matches_masked_softmax():
    vocab_size, num_draws = 8, 20_000
    rng = np.random.default_rng(2024)
    logits = random_logits(rng, 1, vocab_size, scale=1.0)
    arrays = build([SamplingParams(temperature=0.7, top_k=5)], seeds=[99])
    expected = np.asarray(jax.nn.softmax(masked_logits_jit(jnp.asarray(logits), arrays)[0]))
    assert np.count_nonzero(expected) == 5

    arrays_row = jax.tree.map(lambda a: a[0], arrays)
    tokens = np.asarray(draw_many(jnp.asarray(logits[0]), arrays_row, num_draws))
    frequencies = np.bincount(tokens, minlength=vocab_size) / num_draws
    assert np.all(frequencies[expected == 0] == 0)
    assert np.max(np.abs(frequencies - expected)) < 0.02, (frequencies, expected)


def test_draws_over_many_blocks_follow_the_softmax():
    """A vocabulary of several draw blocks and a part of one (3,000 tokens), the last tokens and
    one whole block masked out, top-p cutting a long tail: 40,000 draws land on each token (and on
    the tail's blocks together) within binomial noise of the masked softmax, never on a masked
    token."""
    vocab_size, num_draws = 3000, 40_000
    rng = np.random.default_rng(77)
    logits = random_logits(rng, 1, vocab_size, scale=1.0)
    logits[0, :40] += 4.0  # a head of likely tokens before a long tail
    logits[0, 512:768] = logits[0, -7:] = -np.inf
    arrays = build([SamplingParams(temperature=0.9, top_p=0.98)], seeds=[5])
    expected = np.asarray(jax.nn.softmax(masked_logits_jit(jnp.asarray(logits), arrays)[0]), np.float64)
    tokens = np.asarray(draw_many(jnp.asarray(logits[0]), jax.tree.map(lambda a: a[0], arrays), num_draws))
    counts = np.bincount(tokens, minlength=vocab_size)
    assert counts[expected == 0].sum() == 0
    head = np.argsort(expected)[::-1][:30]
    groups = [[t] for t in head] + [np.setdiff1d(np.arange(i, min(i + 256, vocab_size)), head) for i in range(0, vocab_size, 256)]
    for group in groups:
        p = expected[group].sum()
        z = (counts[group].sum() - num_draws * p) / np.sqrt(num_draws * p * (1 - p) + 1e-12)
        assert abs(z) < 5, (group[:3], counts[group].sum(), num_draws * p)


def test_seeded_draw_independent_of_batch_position():
    rng = np.random.default_rng(5)
    vocab_size = 300
    target_logits = random_logits(rng, 1, vocab_size, scale=1.0)
    target = SamplingParams(temperature=1.5, top_p=0.95, seed=777)
    reference = None
    for num_rows, position in [(1, 0), (4, 3), (8, 2), (8, 5)]:
        others = [SamplingParams(temperature=float(t)) for t in rng.uniform(0, 2, num_rows - 1)]
        params = others[:position] + [target] + others[position:]
        seeds = [int(s) for s in rng.integers(0, 2**32, num_rows)]
        seeds[position] = 777
        steps = [int(s) for s in rng.integers(0, 100, num_rows)]
        steps[position] = 42
        logits = random_logits(rng, num_rows, vocab_size)
        logits[position] = target_logits[0]
        arrays = build(params, seeds, steps, pad_to=num_rows + 2)
        logits = np.concatenate([logits, random_logits(rng, 2, vocab_size)])
        token = int(sample_jit(jnp.asarray(logits), arrays, all_greedy=False)[position])
        reference = token if reference is None else reference
        assert token == reference


def test_steps_change_the_draw_and_seeds_repeat_it():
    rng = np.random.default_rng(9)
    logits = random_logits(rng, 1, 1000, scale=0.5)  # near-uniform: repeats would be suspicious
    arrays_row = jax.tree.map(lambda a: a[0], build([SamplingParams(temperature=1.0)], seeds=[31]))
    first_run = np.asarray(draw_many(jnp.asarray(logits[0]), arrays_row, 64))
    second_run = np.asarray(draw_many(jnp.asarray(logits[0]), arrays_row, 64))
    np.testing.assert_array_equal(first_run, second_run)
    assert len(set(first_run.tolist())) > 40

    other_seed = jax.tree.map(lambda a: a[0], build([SamplingParams(temperature=1.0)], seeds=[32]))
    assert np.any(np.asarray(draw_many(jnp.asarray(logits[0]), other_seed, 64)) != first_run)


def test_build_pads_with_greedy_rows_and_checks_lengths():
    params = SamplingParams(temperature=0.5, top_k=-1, top_p=0.9, min_p=0.1)
    arrays = SamplingArrays.build([params], [2**32 - 1], [7], pad_to=4)
    assert arrays.temperature.dtype == np.float32 and arrays.top_k.dtype == np.int32
    assert arrays.seed.dtype == np.uint32 and arrays.step.dtype == np.int32
    np.testing.assert_allclose(arrays.temperature, [0.5, 0, 0, 0])
    np.testing.assert_array_equal(arrays.top_k, [0, 0, 0, 0])
    np.testing.assert_allclose(arrays.top_p, [0.9, 1, 1, 1])
    np.testing.assert_array_equal(arrays.seed, [2**32 - 1, 0, 0, 0])
    np.testing.assert_array_equal(arrays.step, [7, 0, 0, 0])
    with pytest.raises(ValueError, match="pad_to"):
        SamplingArrays.build([SamplingParams()] * 3, [0] * 3, [0] * 3, pad_to=2)
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingArrays.build([SamplingParams()] * 2, [0], [0, 0], pad_to=2)
    with pytest.raises(ValueError, match="seeds"):
        SamplingArrays.build([SamplingParams()], [-1], [0], pad_to=2)
