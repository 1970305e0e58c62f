"""N-gram speculative decoding: drafts from prompt lookup, checked against the model's own greedy
choices in one step, give exactly the tokens of plain greedy decoding (HF transformers' `generate`
is the oracle), with fewer steps, and leave no block held."""

from __future__ import annotations

import random

import pytest

from jpaged import LLM, SamplingParams
from jpaged.config import SpeculativeConfig
from jpaged.ngram_proposer import NgramProposer, accepted_tokens
from jpaged.sampling_params import SamplingParams as Params
from jpaged.sequence import Request

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


def test_requests_that_cannot_draft_are_unchanged_beside_drafting_ones(engines):
    """Sampled, penalised and logprob-asking requests take no drafts; their outputs, and the
    greedy ones', equal those of the engine without speculation."""
    plain, speculative = engines
    params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.0, logprobs=2, max_tokens=30, ignore_eos=True)]
    before = speculative.engine.stats().num_draft_tokens
    got = speculative.generate(PROMPTS, params, use_tqdm=False)
    expected = plain.generate(PROMPTS, params, use_tqdm=False)
    assert token_ids(got) == token_ids(expected)
    for mine, theirs in zip(got[3].outputs[0].logprobs, expected[3].outputs[0].logprobs):  # other batch shapes
        assert mine.keys() == theirs.keys()
        assert [v.logprob for v in mine.values()] == pytest.approx([v.logprob for v in theirs.values()], abs=1e-5)
    assert speculative.engine.stats().num_draft_tokens > before
    assert got[0].outputs[0].cumulative_logprob is None  # not computed for a request without logprobs
    assert got[3].outputs[0].cumulative_logprob == pytest.approx(expected[3].outputs[0].cumulative_logprob, abs=1e-4)


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
    completions whose text is plain greedy decoding's, and no block held afterwards."""
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
        metrics = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in
                   httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("jpaged:spec")}
    stats = engine.stats()
    assert 0 < metrics["jpaged:spec_decode_num_accepted_tokens_total"] == stats.num_accepted_draft_tokens
    assert metrics["jpaged:spec_decode_num_draft_tokens_total"] == stats.num_draft_tokens
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
