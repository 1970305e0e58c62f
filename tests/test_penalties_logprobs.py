"""Penalties, logit_bias, min_tokens and logprobs of the device sampler against oracles nobody here
wrote: HF transformers' logits processors, numpy formulas of the OpenAI definitions, and torch's
log_softmax / topk."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jpaged.sampler import (
    SamplerOutput,
    apply_logits_processors,
    masked_logits,
    prompt_logprobs,
    sample,
    sample_greedy,
    sample_with_logprobs,
)
from jpaged.sampling_params import SEED_LIMIT, SamplingParams, derive_seed, device_seed
from jpaged.step_batch import PAD_TOKEN_ID, SamplingArrays

VOCAB = 97
EOS = 5
process_jit = jax.jit(apply_logits_processors)
sample_jit = jax.jit(sample, static_argnames="all_greedy")
sample_lp_jit = jax.jit(
    sample_with_logprobs, static_argnames=("all_greedy", "num_logprobs", "logprobs_mode")
)
prompt_logprobs_jit = jax.jit(prompt_logprobs, static_argnames="k")


def random_logits(rng, num_rows, vocab_size=VOCAB, scale=3.0):
    return (rng.standard_normal((num_rows, vocab_size)) * scale).astype(np.float32)


def random_history(rng, num_rows, vocab_size=VOCAB):
    """Random prompts and outputs with repeats (a small id range makes tokens recur)."""
    prompts = [rng.integers(0, vocab_size, rng.integers(1, 30)).tolist() for _ in range(num_rows)]
    outputs = [
        rng.integers(0, vocab_size // 3, rng.integers(0, 40)).tolist() for _ in range(num_rows)
    ]
    return prompts, outputs


def build(params, prompts=None, outputs=None, steps=None, pad_to=None, **kwargs):
    num_rows = len(params)
    if steps is None:
        steps = [len(o) for o in outputs] if outputs is not None else [0] * num_rows
    return SamplingArrays.build(
        params, [1234] * num_rows, steps, pad_to or num_rows,
        prompt_token_ids=prompts, output_token_ids=outputs, **kwargs,
    )


def hf_process(row_logits, params, prompt, output, blocked_ids=()):
    """vLLM's order with HF's processors: min_tokens, logit_bias, repetition penalty; then the
    OpenAI frequency / presence formula in numpy (HF has none)."""
    input_ids = torch.tensor([list(prompt) + list(output)], dtype=torch.long)
    scores = torch.from_numpy(row_logits.copy())[None, :]
    if blocked_ids:
        scores = MinNewTokensLengthLogitsProcessor(
            prompt_length_to_skip=len(prompt), min_new_tokens=params.min_tokens,
            eos_token_id=list(blocked_ids),
        )(input_ids, scores)
    if params.logit_bias:
        bias = [[[token], value] for token, value in params.logit_bias.items()]
        scores = SequenceBiasLogitsProcessor(bias)(input_ids, scores)
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, scores)
    expected = scores[0].numpy().astype(np.float64)
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=len(row_logits))
    expected -= counts * params.frequency_penalty
    expected -= (counts > 0) * params.presence_penalty
    return expected


def assert_close_with_infs(actual, expected, err_msg=""):
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=err_msg)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-5, atol=1e-5,
                               err_msg=err_msg)


PENALTY_ROWS = [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7, temperature=0.0),
    SamplingParams(frequency_penalty=0.5),
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=-0.8, presence_penalty=-2.0),
    SamplingParams(repetition_penalty=2.0, frequency_penalty=2.0, presence_penalty=0.3),
    SamplingParams(),  # an unpenalised row in a penalised batch is left alone
    SamplingParams(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.1),
]


@pytest.mark.parametrize("seed", [0, 1])
def test_penalties_match_hf_and_openai_formula(seed):
    rng = np.random.default_rng(seed)
    prompts, outputs = random_history(rng, len(PENALTY_ROWS))
    outputs[2] = []  # a penalised row with nothing generated yet
    pad_to = len(PENALTY_ROWS) + 2
    logits = random_logits(rng, pad_to)
    arrays = build(PENALTY_ROWS, prompts, outputs, pad_to=pad_to)
    processed = np.asarray(process_jit(jnp.asarray(logits), arrays))
    for row, params in enumerate(PENALTY_ROWS):
        expected = hf_process(logits[row], params, prompts[row], outputs[row])
        np.testing.assert_allclose(processed[row], expected, rtol=1e-5, atol=1e-5,
                                   err_msg=f"row {row}")
    np.testing.assert_array_equal(processed[len(PENALTY_ROWS):], logits[len(PENALTY_ROWS):])


def test_repetition_penalty_counts_the_prompt_but_presence_and_frequency_do_not():
    logits = np.full((1, 8), 2.0, np.float32)
    for params, expected_token_3 in [
        (SamplingParams(repetition_penalty=2.0), 1.0),
        (SamplingParams(presence_penalty=1.0), 2.0),
        (SamplingParams(frequency_penalty=1.0), 2.0),
    ]:
        arrays = build([params], prompts=[[3, 3]], outputs=[[6, 6, 6]])
        processed = np.asarray(process_jit(jnp.asarray(logits), arrays))[0]
        assert processed[3] == expected_token_3, params
        assert processed[0] == 2.0


def test_logit_bias_matches_hf_sequence_bias():
    rng = np.random.default_rng(3)
    params = [
        SamplingParams(logit_bias={1: 5.0, 7: -100.0, 96: 0.25}),
        SamplingParams(temperature=0.0, logit_bias={0: 100}),
        SamplingParams(),
        SamplingParams(logit_bias={str(t): -1.5 for t in range(20, 40)}),  # OpenAI-style keys
    ]
    logits = random_logits(rng, 4)
    processed = np.asarray(process_jit(jnp.asarray(logits), build(params, vocab_size=VOCAB)))
    for row, p in enumerate(params):
        expected = hf_process(logits[row], p, prompt=[0], output=[])
        np.testing.assert_allclose(processed[row], expected, rtol=1e-6, atol=1e-5)


def test_min_tokens_matches_hf_min_new_tokens():
    rng = np.random.default_rng(4)
    params = [
        SamplingParams(min_tokens=4),
        SamplingParams(min_tokens=4, stop_token_ids=[11, 12]),
        SamplingParams(min_tokens=4, stop_token_ids=[11], ignore_eos=True),
        SamplingParams(min_tokens=2, stop_token_ids=[11]),  # already met: nothing blocked
        SamplingParams(),
    ]
    outputs = [[1, 2], [3], [], [4, 4, 4], [1]]
    prompts = [[9, 9]] * len(params)
    eos_ids = [EOS, 6]
    logits = random_logits(rng, len(params))
    arrays = build(params, prompts, outputs, eos_token_ids=eos_ids)
    processed = np.asarray(process_jit(jnp.asarray(logits), arrays))
    for row, p in enumerate(params):
        blocked = list(p.stop_token_ids) + ([] if p.ignore_eos else eos_ids)
        expected = hf_process(logits[row], p, prompts[row], outputs[row], blocked_ids=blocked)
        assert_close_with_infs(processed[row], expected, err_msg=f"row {row}")
    assert np.isneginf(processed[0, [EOS, 6]]).all() and np.isfinite(processed[3]).all()
    assert np.isneginf(processed[2, 11]) and np.isfinite(processed[2, [EOS, 6]]).all()


def test_everything_at_once_matches_hf_chain():
    rng = np.random.default_rng(5)
    params = [
        SamplingParams(min_tokens=10, logit_bias={EOS: 50.0, 3: 2.0}, repetition_penalty=1.5,
                       frequency_penalty=0.4, presence_penalty=0.2, stop_token_ids=[8]),
        SamplingParams(temperature=0.0, logit_bias={2: -3.0}, repetition_penalty=0.8,
                       presence_penalty=-1.0),
        SamplingParams(top_k=5, min_tokens=1),
    ]
    prompts, outputs = random_history(rng, 3)
    outputs[2] = []
    logits = random_logits(rng, 3)
    arrays = build(params, prompts, outputs, eos_token_ids=[EOS])
    processed = np.asarray(process_jit(jnp.asarray(logits), arrays))
    for row, p in enumerate(params):
        active = len(outputs[row]) < p.min_tokens
        blocked = (list(p.stop_token_ids) + [EOS]) if active else []
        expected = hf_process(logits[row], p, prompts[row], outputs[row], blocked_ids=blocked)
        assert_close_with_infs(processed[row], expected, err_msg=f"row {row}")


def test_greedy_with_strong_logit_bias_picks_the_biased_token():
    rng = np.random.default_rng(6)
    logits = random_logits(rng, 3)
    targets = [int(np.argmin(row)) for row in logits]
    params = [SamplingParams(temperature=0.0, logit_bias={t: 100.0}) for t in targets]
    arrays = build(params)
    for all_greedy in (True, False):
        tokens = np.asarray(sample_jit(jnp.asarray(logits), arrays, all_greedy=all_greedy))
        np.testing.assert_array_equal(tokens, targets)
    # A sampled row follows the bias too (the biased token holds nearly all the mass).
    sampled = build([SamplingParams(temperature=1.0, logit_bias={targets[0]: 100.0})])
    assert int(sample_jit(jnp.asarray(logits[:1]), sampled, all_greedy=False)[0]) == targets[0]


def test_greedy_sampler_picks_the_argmax_of_hf_processed_logits_as_the_whole_sampler_does():
    """`sample_greedy` (the engine's sampler for batches of greedy rows that want no logprobs):
    each row's argmax of the logits HF's processors give, the whole sampler's outputs exactly."""
    rng = np.random.default_rng(8)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logit_bias={3: 9.0, 7: -4.0}),
              SamplingParams(temperature=0.0, repetition_penalty=1.8, frequency_penalty=0.7, presence_penalty=0.4),
              SamplingParams(temperature=0.0, min_tokens=50, max_tokens=60, stop_token_ids=[8]),
              SamplingParams(temperature=0.0, repetition_penalty=0.6, logit_bias={EOS: 2.0})]
    prompts, outputs = random_history(rng, len(params))
    logits = random_logits(rng, len(params) + 1)  # and a padding row
    arrays = build(params, prompts, outputs, pad_to=len(params) + 1, eos_token_ids=[EOS])
    greedy = jax.jit(sample_greedy, static_argnums=2)(jnp.asarray(logits), arrays, 4)
    whole = jax.jit(sample_with_logprobs, static_argnums=(2, 3, 4, 5))(
        jnp.asarray(logits), arrays, None, 4, "raw_logprobs", True)
    for row, p in enumerate(params):
        blocked = list(p.stop_token_ids) + [EOS] if len(outputs[row]) < p.min_tokens else []
        assert int(greedy.token_ids[row]) == np.argmax(hf_process(logits[row], p, prompts[row], outputs[row], blocked))
    assert int(greedy.token_ids[-1]) == np.argmax(logits[-1])
    assert jax.tree.structure(greedy) == jax.tree.structure(whole)
    for mine, theirs in zip(greedy, whole):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        np.testing.assert_array_equal(mine, theirs)
    assert not any(np.any(np.asarray(field)) for field in greedy[1:])


def test_min_tokens_blocks_eos_until_reached():
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, EOS] = 30.0  # EOS is by far the likeliest token
    logits[0, 7] = 29.0
    params = [SamplingParams(temperature=0.0, min_tokens=3)]
    for step, expected in [(0, 7), (2, 7), (3, EOS), (5, EOS)]:
        arrays = build(params, steps=[step], eos_token_ids=[EOS])
        assert int(sample_jit(jnp.asarray(logits), arrays, all_greedy=True)[0]) == expected
    sampled = [SamplingParams(temperature=2.0, min_tokens=3)] * 64
    arrays = SamplingArrays.build(sampled, list(range(64)), [1] * 64, 64, eos_token_ids=[EOS])
    tokens = np.asarray(sample_jit(jnp.asarray(np.repeat(logits, 64, 0)), arrays, all_greedy=False))
    assert EOS not in tokens.tolist()
    # An explicit per-row block list replaces eos_token_ids + stop_token_ids.
    arrays = build(params, steps=[0], stop_ids_before_min=[[EOS, 7]])
    assert int(sample_jit(jnp.asarray(logits), arrays, all_greedy=True)[0]) not in (EOS, 7)


def test_penalties_steer_greedy_away_from_repeats():
    logits = np.zeros((1, 10), np.float32)
    logits[0, 4], logits[0, 2] = 1.0, 0.9
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5)]
    for output, expected in [([], 4), ([4], 2)]:
        arrays = build(params, [[1]], [output])
        assert int(sample_jit(jnp.asarray(logits), arrays, all_greedy=True)[0]) == expected


def _has_scatter(fn, *args):
    return "scatter" in str(jax.make_jaxpr(fn)(*args))


def test_penalty_free_batches_build_no_lists_and_trace_no_scatter():
    rng = np.random.default_rng(7)
    logits = jnp.asarray(random_logits(rng, 4))
    plain = [SamplingParams(), SamplingParams(temperature=0.0, min_tokens=2), SamplingParams()]
    # min_tokens already met (steps=2): nothing to block, so no bias arrays either.
    arrays = SamplingArrays.build(plain, [1, 2, 3], [5, 2, 0], 4, eos_token_ids=[EOS])
    optional = ("penalty_ids", "output_counts", "bias_ids", "bias_values")
    for name in optional:
        assert getattr(arrays, name) is None, name
    assert not arrays.has_penalties and not arrays.has_bias
    # Old-style call (no keyword arguments) too.
    old = SamplingArrays.build(plain, [1, 2, 3], [5, 2, 0], 4)
    assert all(getattr(old, name) is None for name in optional)
    for all_greedy in (False, True):
        assert not _has_scatter(functools.partial(sample, all_greedy=all_greedy), logits, arrays)
    np.testing.assert_array_equal(np.asarray(process_jit(logits, arrays)), np.asarray(logits))

    penalised = SamplingArrays.build(
        [SamplingParams(frequency_penalty=0.1)] + plain[1:], [1, 2, 3], [1, 2, 0], 4,
        prompt_token_ids=[[1]] * 3, output_token_ids=[[2], [3, 3], []],
    )
    assert penalised.has_penalties and not penalised.has_bias
    assert penalised.penalty_ids.shape == (4, 8)
    assert _has_scatter(functools.partial(sample, all_greedy=False), logits, penalised)
    biased = build([SamplingParams(logit_bias={1: 1.0})])
    assert biased.has_bias and not biased.has_penalties


def test_build_packs_distinct_ids_with_output_counts():
    params = [SamplingParams(repetition_penalty=1.2), SamplingParams(frequency_penalty=1.0),
              SamplingParams()]
    arrays = build(params, prompts=[[4, 4, 9], [8], [1]], outputs=[[9, 2, 2], [3] * 20, [5]],
                   pad_to=5)
    assert arrays.penalty_ids.dtype == np.int32 and arrays.output_counts.dtype == np.int32
    assert arrays.penalty_ids.shape == (5, 8)  # widest row has 3 distinct ids: bucketed to 8
    row0 = dict(zip(arrays.penalty_ids[0].tolist(), arrays.output_counts[0].tolist()))
    assert row0.pop(PAD_TOKEN_ID) == 0 and row0 == {2: 2, 9: 1, 4: 0}
    # Row 1 has no repetition penalty: its prompt is not listed.
    row1 = dict(zip(arrays.penalty_ids[1].tolist(), arrays.output_counts[1].tolist()))
    assert row1.pop(PAD_TOKEN_ID) == 0 and row1 == {3: 20}
    assert (arrays.penalty_ids[2:] == PAD_TOKEN_ID).all()
    np.testing.assert_allclose(arrays.repetition_penalty, [1.2, 1, 1, 1, 1])
    np.testing.assert_allclose(arrays.frequency_penalty, [0, 1, 0, 0, 0])
    long_outputs = build([SamplingParams(presence_penalty=1.0)], [[0]], [list(range(33))])
    assert long_outputs.penalty_ids.shape == (1, 64)


def test_build_errors_name_what_is_missing():
    rep = [SamplingParams(repetition_penalty=1.2)]
    with pytest.raises(ValueError, match="output_token_ids"):
        SamplingArrays.build([SamplingParams(presence_penalty=1.0)], [0], [0], 1)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        SamplingArrays.build(rep, [0], [0], 1, output_token_ids=[[1]])
    with pytest.raises(ValueError, match="eos_token_ids"):
        SamplingArrays.build([SamplingParams(min_tokens=2)], [0], [1], 1)
    with pytest.raises(ValueError, match="vocab_size"):
        SamplingArrays.build([SamplingParams(logit_bias={VOCAB: 1.0})], [0], [0], 1,
                             vocab_size=VOCAB)
    with pytest.raises(ValueError, match="output_token_ids must have one entry per row"):
        SamplingArrays.build(rep, [0], [0], 1, prompt_token_ids=[[1]], output_token_ids=[[], []])
    # ignore_eos rows under min_tokens block only their stop ids, so need no eos_token_ids.
    arrays = SamplingArrays.build(
        [SamplingParams(min_tokens=2, ignore_eos=True, stop_token_ids=[4])], [0], [0], 1)
    assert arrays.bias_ids[0, 0] == 4 and np.isneginf(arrays.bias_values[0, 0])


def test_masked_logits_applies_processors_before_temperature():
    rng = np.random.default_rng(8)
    params = [SamplingParams(temperature=0.5, repetition_penalty=1.4, logit_bias={0: 3.0})]
    prompts, outputs = random_history(rng, 1)
    logits = random_logits(rng, 1)
    arrays = build(params, prompts, outputs)
    masked = np.asarray(jax.jit(masked_logits)(jnp.asarray(logits), arrays))[0]
    expected = hf_process(logits[0], params[0], prompts[0], outputs[0]) / 0.5
    np.testing.assert_allclose(masked - masked.max(), expected - expected.max(), atol=1e-5)


LOGPROB_ROWS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_k=10),
    SamplingParams(temperature=1.0, repetition_penalty=1.5, presence_penalty=1.0),
    SamplingParams(temperature=0.0, logit_bias={3: 20.0}),
    SamplingParams(temperature=1.2, top_p=0.9, min_tokens=5),
]


@pytest.mark.parametrize("num_logprobs", [0, 20])
def test_raw_logprobs_match_torch_log_softmax(num_logprobs):
    rng = np.random.default_rng(num_logprobs)
    prompts, outputs = random_history(rng, len(LOGPROB_ROWS))
    pad_to = len(LOGPROB_ROWS) + 1
    logits = random_logits(rng, pad_to)
    arrays = build(LOGPROB_ROWS, prompts, outputs, pad_to=pad_to, eos_token_ids=[EOS])
    out = sample_lp_jit(jnp.asarray(logits), arrays, all_greedy=False, num_logprobs=num_logprobs)
    assert isinstance(out, SamplerOutput)
    ids = np.asarray(sample_jit(jnp.asarray(logits), arrays, all_greedy=False))
    np.testing.assert_array_equal(np.asarray(out.token_ids), ids)

    expected = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    rows = torch.arange(pad_to)
    np.testing.assert_allclose(np.asarray(out.logprobs), expected[rows, ids].numpy(), atol=1e-5)
    expected_top, expected_top_ids = torch.topk(expected, num_logprobs, dim=-1)
    assert out.top_ids.shape == out.top_logprobs.shape == (pad_to, num_logprobs)
    assert out.top_ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out.top_ids), expected_top_ids.numpy())
    np.testing.assert_allclose(np.asarray(out.top_logprobs), expected_top.numpy(), atol=1e-5)
    expected_ranks = (expected >= expected[rows, ids][:, None]).sum(-1).numpy()
    np.testing.assert_array_equal(np.asarray(out.ranks), expected_ranks)
    assert int(out.ranks[0]) == 1  # the greedy row without processors takes the top token


def hf_drawn_from(row_logits, params, prompt, output, blocked_ids=()) -> torch.Tensor:
    """The logits a row is drawn from, by HF's processors and warpers in vLLM's order: min_tokens,
    logit_bias and penalties (`hf_process`), then for a sampled row temperature, top-k, top-p and
    min-p (-inf where they remove a token); a greedy row stops after the penalties."""
    scores = torch.from_numpy(hf_process(row_logits, params, prompt, output, blocked_ids))[None, :]
    if params.temperature > 0:
        input_ids = torch.tensor([list(prompt) + list(output)], dtype=torch.long)
        warpers = [TemperatureLogitsWarper(params.temperature)]
        warpers += [TopKLogitsWarper(params.top_k)] if params.top_k > 0 else []
        warpers += [TopPLogitsWarper(params.top_p)] if params.top_p < 1 else []
        warpers += [MinPLogitsWarper(params.min_p)] if params.min_p > 0 else []
        for warper in warpers:
            scores = warper(input_ids, scores)
    return scores[0]


@pytest.mark.parametrize("mode", ["processed_logprobs", "processed_logits", "raw_logits"])
def test_logprobs_modes_match_hf_processors_and_warpers(mode):
    """vLLM's `logprobs_mode`: processed values are those of the distribution each token is drawn
    from (HF's processors and warpers are the oracle), raw logits the model's own."""
    rng = np.random.default_rng(11)
    prompts, outputs = random_history(rng, len(LOGPROB_ROWS))
    logits = random_logits(rng, len(LOGPROB_ROWS))
    arrays = build(LOGPROB_ROWS, prompts, outputs, eos_token_ids=[EOS])
    out = sample_lp_jit(jnp.asarray(logits), arrays, all_greedy=False, num_logprobs=4, logprobs_mode=mode)
    ids = np.asarray(out.token_ids)
    np.testing.assert_array_equal(ids, np.asarray(sample_jit(jnp.asarray(logits), arrays, all_greedy=False)))
    for row, p in enumerate(LOGPROB_ROWS):
        blocked = [EOS] if len(outputs[row]) < p.min_tokens else []
        if mode == "raw_logits":
            expected = torch.from_numpy(logits[row]).double()
        else:
            expected = hf_drawn_from(logits[row], p, prompts[row], outputs[row], blocked_ids=blocked).double()
            expected = torch.log_softmax(expected, dim=-1) if mode == "processed_logprobs" else expected
        assert np.isclose(float(out.logprobs[row]), float(expected[ids[row]]), atol=1e-5), row
        top, top_ids = torch.topk(expected, 4)
        finite = torch.isfinite(top).numpy()
        np.testing.assert_array_equal(np.asarray(out.top_ids[row])[finite], top_ids.numpy()[finite])
        np.testing.assert_allclose(np.asarray(out.top_logprobs[row]), top.numpy(), atol=1e-5)
        assert int(out.ranks[row]) == int((expected >= expected[ids[row]]).sum()), row
    assert ids[3] == 3 and int(out.ranks[3]) == (1 if mode.startswith("processed") else int(
        (logits[3] >= logits[3][3]).sum()))  # the greedy biased row takes the biased token, first once processed


@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs"])
def test_a_row_with_no_token_left_has_logprobs_of_minus_infinity(mode):
    """Every token removed (a grammar at a dead end): -inf logprobs, never NaN."""
    logits = random_logits(np.random.default_rng(5), 2)
    logits[0] = -np.inf
    arrays = build([SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=3)])
    out = sample_lp_jit(jnp.asarray(logits), arrays, all_greedy=False, num_logprobs=2, logprobs_mode=mode)
    assert np.isneginf(float(out.logprobs[0])) and np.isneginf(np.asarray(out.top_logprobs[0])).all()
    assert np.isfinite(float(out.logprobs[1]))


def test_engine_logprobs_mode_gives_the_drawn_distributions_logprobs(stories_path):
    """`LLM(logprobs_mode="processed_logprobs")`: the same seeded tokens as the default engine, and
    each token's logprobs are those of its top-5 distribution at temperature 0.8, renormalised
    from the default engine's raw top-5 logprobs."""
    from jpaged import LLM

    params = SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=12, logprobs=5)
    outs = {mode: LLM(stories_path, num_blocks=32, logprobs_mode=mode).generate("Once upon a time", params,
                                                                              use_tqdm=False)[0].outputs[0]
            for mode in ("raw_logprobs", "processed_logprobs")}
    raw, processed = outs["raw_logprobs"], outs["processed_logprobs"]
    assert raw.token_ids == processed.token_ids
    for token, raw_top, drawn_top in zip(raw.token_ids, raw.logprobs, processed.logprobs):
        scaled = {t: entry.logprob / 0.8 for t, entry in raw_top.items() if entry.rank <= 5}
        norm = np.logaddexp.reduce(list(scaled.values()))
        assert drawn_top[token].logprob == pytest.approx(scaled[token] - norm, abs=1e-4)
        assert np.exp([e.logprob for t, e in drawn_top.items() if e.rank <= 5]).sum() == pytest.approx(1, abs=1e-4)
    logits_engine = LLM(stories_path, num_blocks=32, logprobs_mode="raw_logits")
    with pytest.raises(ValueError, match="best_of 3 ranks samples by their cumulative logprob.*'raw_logits'"):
        logits_engine.generate("Once", SamplingParams(n=1, best_of=3, temperature=1.0), use_tqdm=False)
    from jpaged import BeamSearchParams
    with pytest.raises(ValueError, match="beam search ranks beams by their logprobs.*'raw_logits'"):
        logits_engine.beam_search(["Once"], BeamSearchParams(beam_width=2, max_tokens=4))
    assert logits_engine.engine.stats().num_free_blocks == logits_engine.engine.stats().num_blocks


def test_no_logprobs_requested_returns_ids_only_and_bad_mode_raises():
    rng = np.random.default_rng(12)
    logits = jnp.asarray(random_logits(rng, 2))
    arrays = build([SamplingParams(temperature=0.0)] * 2)
    out = sample_lp_jit(logits, arrays, all_greedy=True, num_logprobs=None)
    assert out.logprobs is None and out.top_ids is None and out.ranks is None
    np.testing.assert_array_equal(np.asarray(out.token_ids), np.argmax(np.asarray(logits), -1))
    with pytest.raises(ValueError, match="logprobs_mode"):
        sample_with_logprobs(logits, arrays, True, 1, logprobs_mode="penalized")
    with pytest.raises(ValueError, match="num_logprobs"):
        sample_with_logprobs(logits, arrays, True, -1)


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_match_torch_gather(k):
    rng = np.random.default_rng(13 + k)
    num_positions = 9
    logits = random_logits(rng, num_positions, scale=4.0)
    next_ids = rng.integers(0, VOCAB, num_positions)
    out = prompt_logprobs_jit(jnp.asarray(logits), jnp.asarray(next_ids), k=k)
    expected = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    gathered = expected.gather(1, torch.from_numpy(next_ids)[:, None])[:, 0]
    token_logprobs, top_ids, top_logprobs, ranks = out
    np.testing.assert_allclose(np.asarray(token_logprobs), gathered.numpy(), atol=1e-5)
    top, top_index = torch.topk(expected, k, dim=-1)
    assert top_ids.shape == (num_positions, k)
    np.testing.assert_array_equal(np.asarray(top_ids), top_index.numpy())
    np.testing.assert_allclose(np.asarray(top_logprobs), top.numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ranks),
                                  (expected >= gathered[:, None]).sum(-1).numpy())


def test_prompt_logprobs_bfloat16_logits():
    rng = np.random.default_rng(14)
    logits = jnp.asarray(random_logits(rng, 4)).astype(jnp.bfloat16)
    out = prompt_logprobs_jit(logits, jnp.array([1, 2, 3, 4]), k=2)
    expected = torch.log_softmax(torch.from_numpy(np.asarray(logits.astype(jnp.float32))), -1)
    np.testing.assert_allclose(np.asarray(out.token_logprobs),
                               expected[torch.arange(4), torch.tensor([1, 2, 3, 4])].numpy(),
                               atol=1e-5)


def test_derive_seed():
    assert derive_seed(77, 0) == 77
    children = [derive_seed(77, i) for i in range(1, 50)]
    assert len(set(children)) == 49 and all(0 <= s < SEED_LIMIT for s in children)
    assert children == [derive_seed(77, i) for i in range(1, 50)]
    assert derive_seed(78, 1) != derive_seed(77, 1)
    assert [device_seed(s) for s in (0, 77, SEED_LIMIT - 1)] == [0, 77, SEED_LIMIT - 1]
    wide = [device_seed(s) for s in (-2, -(2**63), SEED_LIMIT, 2**64 - 3, 2**40 + 77)]
    assert all(0 <= s < SEED_LIMIT for s in wide) and len(set(wide)) == 5
    assert device_seed(-2) == device_seed(2**64 - 2)  # the same 64 bits, as torch's manual_seed takes them


# ---- prompt logprobs inside the scheduled prefill, end to end --------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random HF Llama (the oracle) and its folder."""
    import transformers
    from hf_models import save_random_model

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("llama_prompt_logprobs")
    return save_random_model(folder, config, seed=13), str(folder)


def assert_prompt_logprobs_match(entries, prompt, logprobs, k):
    """`entries` as the engine reports them against `logprobs [len(prompt), vocab]` (row t predicts t + 1)."""
    assert len(entries) == len(prompt) and entries[0] is None
    for position in range(1, len(prompt)):
        entry, row = entries[position], logprobs[position - 1]
        assert set(entry) == {prompt[position], *np.argsort(-row)[:k].tolist()}, position
        for token, value in entry.items():
            assert value.logprob == pytest.approx(row[token], abs=1e-4), (position, token)


def test_prompt_logprobs_request_waits_for_a_busy_cache_and_matches_hf(tiny_llama):
    from hf_models import hf_logits

    from jpaged import LLM

    model, folder = tiny_llama
    rng = np.random.default_rng(3)
    prompt = rng.integers(3, 96, 37).tolist()
    logits = hf_logits(model, prompt)
    expected = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=3)

    alone = LLM(folder, num_blocks=32, block_size=4, dtype="float32").generate(
        {"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert_prompt_logprobs_match(alone.prompt_logprobs, prompt, expected, 3)

    # 14 blocks of 4 tokens and 16 tokens a step: the 37-token prompt is prefilled in chunks, after
    # two fillers that hold most blocks and the same prompt's blocks cached (which it must not read).
    busy = LLM(folder, num_blocks=14, block_size=4, dtype="float32", max_num_batched_tokens=16)
    engine = busy.engine
    engine.add_request("cached", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    filler = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for name in ("filler-0", "filler-1"):
        engine.add_request(name, {"prompt_token_ids": rng.integers(3, 96, 12).tolist()}, filler)
    for _ in range(4):
        engine.step()
    assert round((1 - engine.stats().kv_cache_usage) * 14) < 10  # fewer free blocks than the prompt needs
    engine.add_request("wants-prompt-logprobs", {"prompt_token_ids": prompt}, params)  # queued, not refused
    assert engine.stats().num_waiting == 1
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    out = outputs["wants-prompt-logprobs"]
    assert out.finished and out.outputs[0].token_ids == alone.outputs[0].token_ids
    assert out.metrics.num_cached_prompt_tokens == 0
    assert_prompt_logprobs_match(out.prompt_logprobs, prompt, expected, 3)
    for got, want in zip(out.prompt_logprobs[1:], alone.prompt_logprobs[1:]):
        assert got.keys() == want.keys()
        assert [v.logprob for v in got.values()] == pytest.approx([v.logprob for v in want.values()], abs=1e-5)
        assert [v.rank for v in got.values()] == [v.rank for v in want.values()]


def test_steps_without_prompt_logprobs_build_no_prompt_rows():
    from jpaged.config import ParallelConfig
    from jpaged.padding import StepShapes
    from jpaged.scheduler import ScheduledSequence
    from jpaged.sequence import Request
    from jpaged.step_batch import prepare_step

    def scheduled(prompt_logprobs):
        seq = Request("r", None, list(range(3, 13)), SamplingParams(prompt_logprobs=prompt_logprobs), 0).seqs[0]
        seq.block_table = [0, 1, 2]
        seq.num_computed_tokens = 4
        return ScheduledSequence.of(seq, 6)

    shapes = StepShapes.for_limits(16, 4, 64, 4, 96)
    plain = prepare_step([scheduled(None)], 4, shapes, ParallelConfig(), [2], 96)
    assert plain.batch.prompt_indices is None and plain.prompt_rows is None
    wanted = prepare_step([scheduled(None), scheduled(2)], 4, shapes, ParallelConfig(), [2], 96)
    assert wanted.prompt_rows.owner.tolist() == [1] * 5 and wanted.prompt_rows.position.tolist() == [4, 5, 6, 7, 8]
    assert wanted.batch.prompt_next_ids[:5].tolist() == [8, 9, 10, 11, 12]
    # Padded to the step's 16 tokens (12 scheduled); padding rows are marked -1.
    assert wanted.batch.prompt_indices[5:].tolist() == [-1] * 11


def test_whole_vocabulary_logprobs_match_hf_and_max_logprobs_caps_requests(tiny_llama):
    """`logprobs=-1` / `prompt_logprobs=-1` report every token's logprob (vLLM's), here against HF's
    log-softmax, once the engine allows it (`max_logprobs=-1`); an engine with the default cap of
    20 refuses them, and any count past its cap, naming both."""
    from hf_models import hf_logits

    from jpaged import LLM, BeamSearchParams

    model, folder = tiny_llama
    prompt = np.random.default_rng(8).integers(3, 96, 9).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=-1, prompt_logprobs=-1)
    out = LLM(folder, num_blocks=16, block_size=4, dtype="float32", max_logprobs=-1).generate(
        {"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    generated = out.outputs[0].token_ids
    logits = hf_logits(model, prompt + generated[:-1])
    expected = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    assert_prompt_logprobs_match(out.prompt_logprobs, prompt, expected, 96)
    assert len(out.outputs[0].logprobs) == len(generated)
    for step, (token, entry) in enumerate(zip(generated, out.outputs[0].logprobs)):
        row = expected[len(prompt) - 1 + step]
        assert len(entry) == 96 and token == row.argmax() and entry[token].rank == 1
        assert sorted(entry) == list(range(96))
        assert [entry[t].logprob for t in range(96)] == pytest.approx(row.tolist(), abs=1e-4)

    capped = LLM(folder, num_blocks=16, block_size=4, dtype="float32", max_logprobs=20)
    for asked, named in (({"logprobs": 21}, "logprobs 21 is more than max_logprobs 20"),
                         ({"prompt_logprobs": -1}, r"prompt_logprobs -1 \(the whole vocabulary of 96 tokens\) is more "
                                                   "than max_logprobs 20")):
        with pytest.raises(ValueError, match=named):
            capped.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, **asked), use_tqdm=False)
    with pytest.raises(ValueError, match=r"beam_width 11 needs the top 22 logprobs .* use beam_width <= 10"):
        capped.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=11, max_tokens=2))
    twenty = capped.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=2, logprobs=20),
                             use_tqdm=False)[0].outputs[0]
    assert twenty.token_ids == generated[:2] and all(len(entry) in (20, 21) for entry in twenty.logprobs)
    manager = capped.engine.block_manager
    assert not capped.engine.has_unfinished_requests() and manager.num_free_blocks == manager.num_blocks
