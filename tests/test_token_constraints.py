"""`allowed_token_ids`, `bad_words` and `truncate_prompt_tokens` against HF transformers: its
`NoBadWordsLogitsProcessor`, `PrefixConstrainedLogitsProcessor` and `SequenceBiasLogitsProcessor` on
random logits and outputs, and its greedy `generate` (with `prefix_allowed_tokens_fn`,
`bad_words_ids`, or the prompt's last tokens) on stories260K."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from jpaged.padding import MAX_BIASED_TOKENS
from jpaged.sampler import apply_logits_processors
from jpaged.sampling_params import SamplingParams, bad_words_token_ids
from jpaged.step_batch import SamplingArrays, banned_token_ids

VOCAB = 61
EOS = 2
PROMPT = "Once upon a time, there was a little girl"


def test_banned_tokens_match_hf_no_bad_words():
    rng = np.random.default_rng(0)
    for _ in range(200):
        words = [rng.integers(0, 6, rng.integers(1, 4)).tolist() for _ in range(rng.integers(1, 4))]
        output = rng.integers(0, 6, rng.integers(0, 8)).tolist()
        ours = set(banned_token_ids(words, output))
        scores = NoBadWordsLogitsProcessor(words)(torch.tensor([output or [7]]), torch.zeros(1, 8))
        assert ours == set(np.flatnonzero(np.isneginf(scores[0].numpy())).tolist()), (words, output)


def test_allowed_and_banned_ids_with_bias_and_min_tokens_match_hf_chain():
    rng = np.random.default_rng(1)
    allowed = sorted(rng.choice(VOCAB, 9, replace=False).tolist())
    params = [
        SamplingParams(allowed_token_ids=allowed, logit_bias={allowed[0]: 3.0, 40: 7.0}),
        SamplingParams(allowed_token_ids=allowed + [EOS], min_tokens=5, logit_bias={EOS: 9.0}),
        SamplingParams(logit_bias={3: -2.5}),  # a row without a restriction in the same batch
        SamplingParams(min_tokens=5),
    ]
    outputs = [[4, 5], [6], [4, 5, 9], []]
    banned = [[allowed[1], 17], [], [8, 9], [10]]
    logits = (rng.standard_normal((len(params), VOCAB)) * 3).astype(np.float32)
    arrays = SamplingArrays.build(params, [1] * 4, [len(o) for o in outputs], 4, prompt_token_ids=[[1]] * 4,
                                  output_token_ids=outputs, eos_token_ids=[EOS], banned_ids=banned,
                                  vocab_size=VOCAB)
    processed = np.asarray(jax.jit(apply_logits_processors)(jnp.asarray(logits), arrays))
    for row, p in enumerate(params):
        ids = torch.tensor([[1] + outputs[row]])
        scores = torch.from_numpy(logits[row].copy())[None]
        scores = MinNewTokensLengthLogitsProcessor(1, p.min_tokens, [EOS])(ids, scores)
        if banned[row]:
            scores = NoBadWordsLogitsProcessor([[t] for t in banned[row]])(ids, scores)
        if p.logit_bias:
            scores = SequenceBiasLogitsProcessor([[[t], v] for t, v in p.logit_bias.items()])(ids, scores)
        if p.allowed_token_ids:
            scores = PrefixConstrainedLogitsProcessor(lambda _, __, a=p.allowed_token_ids: a, 1)(ids, scores)
        expected = scores[0].numpy()
        np.testing.assert_array_equal(np.isneginf(processed[row]), np.isneginf(expected), err_msg=f"row {row}")
        finite = np.isfinite(expected)
        np.testing.assert_allclose(processed[row][finite], expected[finite], rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="module")
def stories(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jpaged import LLM

    hf = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    return LLM(stories_path, num_blocks=64, max_model_len=256), hf, AutoTokenizer.from_pretrained(stories_path)


def hf_greedy(hf, prompt_ids, max_tokens, **kwargs):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def test_constrained_greedy_requests_in_one_batch_match_hf_generate(stories):
    llm, hf, tokenizer = stories
    prompt_ids = tokenizer(PROMPT).input_ids
    allowed = sorted(np.random.default_rng(2).choice(512, 40, replace=False).tolist())
    words = [" she", "named Lily", "park"]
    n = 16
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, allowed_token_ids=allowed),
              SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, bad_words=words),
              SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, truncate_prompt_tokens=5),
              SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)]
    outs = llm.generate([PROMPT] * 4, params, use_tqdm=False)
    bad_ids = bad_words_token_ids(words, llm.get_tokenizer())
    assert [395, 317] in bad_ids  # "named Lily": the plain run's continuation, which the ban must steer from
    assert outs[0].outputs[0].token_ids == hf_greedy(hf, prompt_ids, n, prefix_allowed_tokens_fn=lambda b, s: allowed)
    assert outs[1].outputs[0].token_ids == hf_greedy(hf, prompt_ids, n, bad_words_ids=bad_ids)
    assert outs[2].prompt_token_ids == prompt_ids[-5:]
    assert outs[2].outputs[0].token_ids == hf_greedy(hf, prompt_ids[-5:], n)
    assert outs[3].outputs[0].token_ids == hf_greedy(hf, prompt_ids, n)
    assert outs[1].outputs[0].token_ids != outs[3].outputs[0].token_ids
    assert llm.engine.stats().kv_cache_usage == 0


def test_sampled_outputs_never_hold_a_bad_word_or_a_token_not_allowed(stories):
    llm, _, tokenizer = stories
    allowed = tokenizer(" the a dog cat ran sat", add_special_tokens=False).input_ids
    sampled = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, n=4, seed=5)
    outs = llm.generate([PROMPT, PROMPT], [
        dataclasses.replace(sampled, allowed_token_ids=allowed),
        dataclasses.replace(sampled, bad_words=[" she", " the"])], use_tqdm=False)
    for choice in outs[0].outputs:
        assert set(choice.token_ids) <= set(allowed)
    banned = {ids[0] for ids in bad_words_token_ids([" she", " the"], llm.get_tokenizer())}
    for choice in outs[1].outputs:
        assert not banned & set(choice.token_ids) and "she" not in choice.text.split()


def test_bad_values_are_refused_naming_the_field_and_limit(stories):
    llm, _, _ = stories
    for kwargs, message in [({"allowed_token_ids": []}, "allowed_token_ids"),
                            ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
                            ({"bad_words": ["  "]}, "bad_words"),
                            ({"bad_words": [3]}, "bad_words"),
                            ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                            ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens")]:
        with pytest.raises((ValueError, TypeError), match=message):
            SamplingParams(**kwargs)
    vocab = llm.engine.model_config.vocab_size
    for kwargs, message in [({"allowed_token_ids": [1, vocab]}, f"outside the vocabulary \\[0, {vocab}\\)"),
                            ({"logit_bias": dict.fromkeys(range(500), 1.0),
                              "bad_words": [f"w{i}" for i in range(MAX_BIASED_TOKENS - 499)]}, "more than the limit"),
                            ({"truncate_prompt_tokens": 257}, "exceeds max_model_len 256"),
                            ({"allowed_token_ids": bad_words_token_ids([" she"], llm.get_tokenizer())[0],
                              "bad_words": [" she"]}, "all blocked by bad_words"),
                            ({"allowed_token_ids": [2], "min_tokens": 1},  # only EOS, which min_tokens blocks
                             r"allowed_token_ids \[2\] are all EOS, stop_token_ids or bad_words, which cannot be "
                             "sampled before min_tokens 1"),
                            ({"allowed_token_ids": [300, *bad_words_token_ids([" she"], llm.get_tokenizer())[0]],
                              "stop_token_ids": [300], "bad_words": [" she"], "min_tokens": 2},
                             "are all EOS, stop_token_ids or bad_words")]:
        with pytest.raises(ValueError, match=message):
            llm.generate(PROMPT, SamplingParams(max_tokens=2, **kwargs), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats().kv_cache_usage == 0
