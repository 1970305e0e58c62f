"""N-gram speculative decoding: drafts from prompt lookup, checked against the model's own
choices in one step, give exactly the tokens of decoding without drafts (greedy: HF transformers'
`generate` is the oracle; sampled with a seed: the engine without drafts), with fewer steps, and
leave no block held."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from jpaged import LLM, BeamSearchParams, SamplingParams
from jpaged.config import SpeculativeConfig
from jpaged.ngram_proposer import NgramProposer, accepted_tokens
from jpaged.sampling_params import SamplingParams as Params
from jpaged.sampling_params import StructuredOutputsParams
from jpaged.sequence import Request
from jpaged.structured_output import GrammarCompiler, bitmask_width

EOS_ID = 2
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PROMPTS = ["Once upon a time, there was a little girl named Lily.", "The dog ran to the park. The dog",
           "Tom and Sue", "One day, a big cat saw a bird"]


def latest_match(tokens: list[int], min_n: int, max_n: int, count: int) -> list[int]:
    """The drafts by definition: the tokens after the latest earlier occurrence of the longest
    suffix of `tokens` of min_n..max_n tokens (a plain scan)."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[-n:]:
                return tokens[start + n:start + n + count]
    return []


def test_proposer_finds_the_latest_longest_match():
    rng = random.Random(7)
    for _ in range(200):
        min_n, k = rng.randint(1, 3), rng.randint(1, 5)
        max_n = rng.randint(min_n, 5)
        proposer = NgramProposer(SpeculativeConfig("ngram", k, prompt_lookup_min=min_n, prompt_lookup_max=max_n))
        seq = Request("r", None, [rng.randrange(4) for _ in range(rng.randint(1, 30))], Params(temperature=0), 0).seqs[0]
        for _ in range(30):
            limit = rng.randint(0, 6)
            tokens = seq.token_ids(0, seq.num_tokens)
            expected = latest_match(tokens, min_n, max_n, min(k, limit)) if min(k, limit) > 0 else []
            assert proposer.propose(seq, limit) == expected
            seq.output_token_ids += [rng.randrange(4) for _ in range(rng.randint(1, 3))]


def test_accepted_tokens_stop_at_the_first_disagreement():
    assert accepted_tokens([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accepted_tokens([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accepted_tokens([5, 6, 7], [1, 6, 7, 8]) == [1]


@pytest.mark.parametrize("bad, message", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "must be 'ngram', got 'eagle'"),
    ({"method": "ngram"}, r"needs \['num_speculative_tokens'\]"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "needs num_speculative_tokens >= 1, got 0"),
    ({"method": "ngram", "num_speculative_tokens": -2}, "needs num_speculative_tokens >= 1, got -2"),
    ({"num_speculative_tokens": 2}, r"needs \['method'\]"),
    ({"method": "ngram", "num_speculative_tokens": 2.5}, "num_speculative_tokens must be an integer, got 2.5"),
    ({"method": "ngram", "num_speculative_tokens": True}, "must be an integer, got True"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": "4"}, "prompt_lookup_max must be an"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "1 <= min <= max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, r"keys \['model'\] are not among"),
    ("ngram", "must be a dict"),
])
def test_bad_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict(bad)


@pytest.fixture(scope="module")
def engines(stories_path):
    settings = dict(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64)
    plain = LLM(stories_path, **settings)
    speculative = LLM(stories_path, **settings, speculative_config=SPECULATIVE, compile_warmup=True)
    return plain, speculative


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_greedy_tokens_match_hf_with_fewer_steps(engines, stories_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hf_models import hf_greedy

    plain, speculative = engines
    programs = speculative.engine.stats().num_compilations
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    got = token_ids(speculative.generate(PROMPTS, params, use_tqdm=False))
    stats = speculative.engine.stats()
    assert stats.num_accepted_draft_tokens >= 20 and stats.num_draft_tokens >= stats.num_accepted_draft_tokens
    assert stats.num_compilations == programs  # drafts run in the warmed-up step programs
    model = transformers.AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    tokenizer = speculative.get_tokenizer()
    assert got == [hf_greedy(model, tokenizer.encode(p), 60) for p in PROMPTS]
    assert got == token_ids(plain.generate(PROMPTS, params, use_tqdm=False))
    assert speculative.engine.block_manager.num_free_blocks == speculative.engine.block_manager.num_blocks


def test_stops_inside_accepted_drafts_end_where_plain_decoding_ends(engines):
    plain, speculative = engines
    first = token_ids(plain.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False))
    stop_ids = [tokens[25] for tokens in first[:2]]
    stop_text = plain.get_tokenizer().decode(first[3][20:23])
    cases = [SamplingParams(temperature=0.0, max_tokens=37), SamplingParams(temperature=0.0, max_tokens=40,
             stop_token_ids=stop_ids), SamplingParams(temperature=0.0, max_tokens=40, stop=[stop_text]),
             SamplingParams(temperature=0.0, max_tokens=40, min_tokens=30)]
    for params in cases:
        expected = plain.generate(PROMPTS, params, use_tqdm=False)
        got = speculative.generate(PROMPTS, params, use_tqdm=False)
        assert [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in got] == \
               [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in expected]


def outputs_of(results) -> list[list[tuple]]:
    return [[(o.token_ids, o.text, o.finish_reason) for o in r.outputs] for r in results]


def test_seeded_sampled_requests_draft_and_give_the_tokens_of_plain_decoding(engines):
    """Sampled requests draft too: a draft is kept when the sequence's own seeded draw at its
    position equals it, so each token, its logprobs and the samples of `n` / `best_of` equal those
    of the engine without drafts; some drafts are kept and some rejected."""
    plain, speculative = engines
    cases = [SamplingParams(temperature=0.4, top_p=0.9, top_k=20, seed=1, max_tokens=50, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=1.0, min_p=0.05, seed=2, max_tokens=50, ignore_eos=True),
             SamplingParams(temperature=0.5, seed=3, repetition_penalty=1.1, presence_penalty=0.2,
                            frequency_penalty=0.1, min_tokens=45, max_tokens=50),
             SamplingParams(temperature=0.5, seed=4, bad_words=["the"], logit_bias={5: 2.0}, max_tokens=50,
                            ignore_eos=True)]
    for params in cases:
        before = speculative.engine.stats()
        got = speculative.generate(PROMPTS, params, use_tqdm=False)
        after = speculative.engine.stats()
        expected = plain.generate(PROMPTS, params, use_tqdm=False)
        assert outputs_of(got) == outputs_of(expected)
        drafts = after.num_draft_tokens - before.num_draft_tokens
        accepted = after.num_accepted_draft_tokens - before.num_accepted_draft_tokens
        assert 0 < accepted < drafts
    for mine, theirs in zip(got, expected):
        assert mine.outputs[0].cumulative_logprob is None
    got, expected = (engine.generate(PROMPTS, cases[0], use_tqdm=False) for engine in (speculative, plain))
    for mine, theirs in zip(got, expected):  # other batch shapes: float32 rounding
        assert mine.outputs[0].cumulative_logprob == pytest.approx(theirs.outputs[0].cumulative_logprob, abs=1e-3)
        for a, b in zip(mine.outputs[0].logprobs, theirs.outputs[0].logprobs):
            assert a.keys() == b.keys()
            assert [v.rank for v in a.values()] == [v.rank for v in b.values()]
            assert [v.logprob for v in a.values()] == pytest.approx([v.logprob for v in b.values()], abs=1e-4)
    samples = SamplingParams(temperature=0.4, n=2, best_of=3, seed=5, max_tokens=40, ignore_eos=True)
    before = speculative.engine.stats().num_accepted_draft_tokens
    got = speculative.generate(PROMPTS[1:3], samples, use_tqdm=False)
    assert outputs_of(got) == outputs_of(plain.generate(PROMPTS[1:3], samples, use_tqdm=False))
    assert speculative.engine.stats().num_accepted_draft_tokens > before
    assert speculative.engine.block_manager.num_free_blocks == speculative.engine.block_manager.num_blocks


CONSTRAINED = [StructuredOutputsParams(regex=r"(The dog (ran|sat) to the park\. ){2,3}"),
               StructuredOutputsParams(json={"type": "array", "items": {"enum": ["dog", "cat"]}, "maxItems": 5},
                                       disable_any_whitespace=True)]


def test_constrained_requests_draft_within_their_grammar(engines):
    """Requests under structured outputs draft only what their grammar allows and check each draft
    under the grammar's mask after the drafts before it: greedy and seeded sampled outputs equal
    the engine's without drafts, beside unconstrained requests, and obey the constraint."""
    plain, speculative = engines
    params = [SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=CONSTRAINED[0]),
              SamplingParams(temperature=0.7, seed=8, max_tokens=60, structured_outputs=CONSTRAINED[1]),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=9, max_tokens=60, structured_outputs=CONSTRAINED[0], logprobs=1)]
    before = speculative.engine.stats()
    got = speculative.generate(PROMPTS, params, use_tqdm=False)
    assert outputs_of(got) == outputs_of(plain.generate(PROMPTS, params, use_tqdm=False))
    assert re.fullmatch(r"(The dog (ran|sat) to the park\. ){2,3}", got[0].outputs[0].text)
    assert set(json.loads(got[1].outputs[0].text)) <= {"dog", "cat"}
    drafts = speculative.engine.stats().num_draft_tokens
    speculative.generate(PROMPTS[0], params[0], use_tqdm=False)
    after = speculative.engine.stats()
    assert after.num_accepted_draft_tokens > before.num_accepted_draft_tokens and after.num_draft_tokens > drafts
    assert speculative.engine.block_manager.num_free_blocks == speculative.engine.block_manager.num_blocks


def stepwise_bitmasks(compiler, constraint, tokens: list[int], starts_after: int | None) -> list[np.ndarray]:
    """The oracle: a fresh grammar advanced token by token, its mask read before each token."""
    grammar = compiler.compile(constraint)
    grammar.starts_after = starts_after
    rows = []
    for token in tokens + [None]:
        row = np.zeros(bitmask_width(512), np.int32)
        grammar.fill_bitmasks([row], [])
        rows.append(row)
        if token is not None:
            assert grammar.accept(token)
    return rows


@pytest.mark.parametrize("thinks", [False, True])
def test_grammar_bitmasks_after_drafts_leave_the_grammar_where_it_was(engines, thinks):
    """`Grammar.fill_bitmasks` over drafts equals a grammar stepped token by token, also where the
    grammar starts after a reasoning model's end-of-thinking token among the drafts;
    `valid_prefix` stops at the first token the grammar forbids; neither moves the grammar."""
    plain, _ = engines
    tokenizer = plain.get_tokenizer()
    compiler = GrammarCompiler(tokenizer, 512, [EOS_ID])
    tokens = list(plain.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=60,
                                                            structured_outputs=CONSTRAINED[0]),
                                 use_tqdm=False)[0].outputs[0].token_ids)[:-1]  # a text the grammar holds, EOS left out
    marker = next(t for t in range(3, 512) if t not in tokens)
    allowed_at_7 = stepwise_bitmasks(compiler, CONSTRAINED[0], tokens[:7], None)[7]
    bad = next(t for t in range(3, 512) if not (allowed_at_7[t // 32] >> (t % 32)) & 1 and t != marker)
    thinking = [5, 9, marker] if thinks else []
    grammar = compiler.compile(CONSTRAINED[0])
    grammar.starts_after = marker if thinks else None
    drafts = thinking + tokens
    for count in range(len(drafts) + 1):
        rows = [np.zeros(bitmask_width(512), np.int32) for _ in range(count + 1)]
        grammar.fill_bitmasks(rows, drafts[:count])
        expected = stepwise_bitmasks(compiler, CONSTRAINED[0], drafts[:count], grammar.starts_after)
        assert all(np.array_equal(a, b) for a, b in zip(rows, expected))
    assert grammar.valid_prefix(drafts) == len(drafts)
    assert grammar.valid_prefix(thinking + tokens[:7] + [bad] + tokens[7:]) == len(thinking) + 7
    assert grammar.starts_after == (marker if thinks else None)
    row = np.zeros(bitmask_width(512), np.int32)
    grammar.fill_bitmasks([row], [])
    assert np.array_equal(row, stepwise_bitmasks(compiler, CONSTRAINED[0], [], grammar.starts_after)[0])


def test_beam_search_takes_no_drafts(engines):
    """A beam search's rounds take one token a beam: with speculation on, its beams draft nothing
    and its hypotheses (tokens and scores) are those of the engine without it."""
    plain, speculative = engines
    params = BeamSearchParams(beam_width=3, max_tokens=20)
    before = speculative.engine.stats().num_draft_tokens
    got = speculative.beam_search(["The cat sat on the mat. The cat"], params)[0].sequences
    expected = plain.beam_search(["The cat sat on the mat. The cat"], params)[0].sequences
    assert [(s.tokens, s.text) for s in got] == [(s.tokens, s.text) for s in expected]
    assert [s.cum_logprob for s in got] == pytest.approx([s.cum_logprob for s in expected], abs=1e-4)
    assert speculative.engine.stats().num_draft_tokens == before
    assert speculative.engine.block_manager.num_free_blocks == speculative.engine.block_manager.num_blocks


def test_preemption_and_abort_with_drafts_free_every_block(stories_path):
    """A cache too small for every request at once: sequences with drafts are preempted and
    recomputed, one is aborted mid-way; tokens equal plain decoding's and no block stays held."""
    small = dict(num_blocks=12, block_size=8, max_num_seqs=4)
    plain = LLM(stories_path, **small)
    speculative = LLM(stories_path, **small, speculative_config=SPECULATIVE)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = token_ids(plain.generate(PROMPTS, params, use_tqdm=False))
    assert token_ids(speculative.generate(PROMPTS, params, use_tqdm=False)) == expected
    engine = speculative.engine
    assert engine.stats().num_preemptions > 0 and engine.stats().num_accepted_draft_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"a{i}", prompt, params)
    for _ in range(6):
        engine.step()
    engine.abort_request("a1")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.check_invariants()


def test_one_sequence_at_a_time_still_drafts(engines, stories_path):
    """`max_num_seqs=1`: the step's spare logits rows for drafts come on top of the sequences'."""
    plain, _ = engines
    single = LLM(stories_path, num_blocks=64, max_num_seqs=1, max_num_batched_tokens=64,
                 speculative_config=SPECULATIVE)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    assert token_ids(single.generate(PROMPTS[:2], params, use_tqdm=False)) == \
        token_ids(plain.generate(PROMPTS[:2], params, use_tqdm=False))
    assert single.engine.stats().num_accepted_draft_tokens > 0


def test_pipeline_parallelism_is_refused():
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 must be 1"):
        LLM("unused", pipeline_parallel_size=2, speculative_config={"method": "ngram", "num_speculative_tokens": 2})


def test_server_streams_the_tokens_of_plain_decoding(engines, stories_path):
    """`jpaged serve --speculative-config ...` as the official `openai` client sees it: streamed
    completions whose text is that of decoding without drafts (greedy, and sampled with a seed),
    and no block held afterwards."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from server_thread import serving

    from jpaged.server.launch import create_app

    plain, _ = engines
    expected = [o.outputs[0].text for o in plain.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=48),
                                                          use_tqdm=False)]
    engine = LLM(stories_path, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64,
                 speculative_config=SPECULATIVE).engine
    with serving(create_app(engine, served_model_name="stories")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        for prompt, text in zip(PROMPTS, expected):
            chunks = client.completions.create(model="stories", prompt=prompt, max_tokens=48, temperature=0,
                                               stream=True)
            assert "".join(c.choices[0].text for c in chunks) == text
        sampled = plain.generate(PROMPTS[1], SamplingParams(temperature=0.7, seed=11, max_tokens=48), use_tqdm=False)
        chunks = client.completions.create(model="stories", prompt=PROMPTS[1], max_tokens=48, temperature=0.7,
                                           seed=11, stream=True)
        assert "".join(c.choices[0].text for c in chunks) == sampled[0].outputs[0].text
        metrics = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in
                   httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("jpaged:spec")}
    stats = engine.stats()
    assert 0 < metrics["jpaged:spec_decode_num_accepted_tokens_total"] == stats.num_accepted_draft_tokens
    assert metrics["jpaged:spec_decode_num_draft_tokens_total"] == stats.num_draft_tokens
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
