"""The incremental detokenizer: streamed text is always a prefix of the final text, and the final
text is the tokenizer's own decode cut as vLLM's stop semantics say (stop strings, stop token ids,
EOS, min_tokens, max_tokens), on real tokenizers and through `engine.step()`."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jpaged import LLM, SamplingParams
from jpaged.detokenizer import PROMPT_CONTEXT, IncrementalDetokenizer

DOG = "Once upon a time, there was a dog named"
GOLDEN_DOG = " Max. Max loved to play with his toys and run around. One day, Max saw a big box in the gr"
STORIES_DOT, STORIES_EOS = 426, 2
SPLIT_TEXTS = ["café 😊🍰 café 😊🍰 café 😊🍰", "日本語で答えます。こんにちは、元気ですか？"]


@pytest.fixture(scope="module")
def stories_tokenizer(stories_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_path)


@pytest.fixture(scope="module")
def smollm_tokenizer(model_path):
    from jpaged.loader.gguf_cache import open_cached

    return open_cached(model_path)[1]()


def stream(tokenizer, prompt, tokens, params, stop_token_ids=()):
    """Feed `tokens` as the engine does; return (texts shown after each token, final text,
    tokens taken, stop string or token that ended it)."""
    detokenizer, shown, reason = IncrementalDetokenizer(tokenizer, prompt, params), [], None
    for token in tokens:
        if token in stop_token_ids:
            detokenizer.finish(stop_token=token)
            reason = token
        elif (stop := detokenizer.add(token)) is not None:
            reason = stop
        if detokenizer.finished:
            break
        shown.append(detokenizer.text)
    else:
        reason = detokenizer.finish()
    return shown, detokenizer.text, detokenizer.num_tokens, reason


def decoded(tokenizer, prompt, tokens, skip_special_tokens=True):
    """The non-incremental text of `tokens`, decoded after the prompt's last tokens."""
    context = prompt[-PROMPT_CONTEXT:]
    whole = tokenizer.decode(context + tokens, skip_special_tokens=skip_special_tokens)
    return whole[len(tokenizer.decode(context, skip_special_tokens=skip_special_tokens)):]


def first_stop(text, stops):
    """The stop string that completes first in `text` (ties: the first listed) and its start."""
    found = [(text.find(s) + len(s), i, s) for i, s in enumerate(stops) if s in text]
    return (min(found)[2], text.find(min(found)[2])) if found else None


def oracle(tokenizer, prompt, tokens, params):
    """vLLM's final text (min_tokens 0): the decode of the tokens before the first stop token id,
    cut at the first stop string; else with the stop token's text under include_stop_str_in_output."""
    stop_at = next((i for i, t in enumerate(tokens) if t in params.stop_token_ids), None)
    kept = tokens if stop_at is None else tokens[:stop_at]
    text = decoded(tokenizer, prompt, kept, params.skip_special_tokens)
    match = first_stop(text, params.stop)
    if match is not None:
        stop, start = match
        return text[: start + len(stop)] if params.include_stop_str_in_output else text[:start]
    if stop_at is not None and params.include_stop_str_in_output:
        return decoded(tokenizer, prompt, tokens[: stop_at + 1], params.skip_special_tokens)
    return text


def assert_streams_prefixes(shown, final):
    for text in shown:
        assert final.startswith(text), (text, final)
        assert "\ufffd" not in text or "\ufffd" in final


def test_stop_string_tail_is_never_shown(stories_tokenizer):
    prompt = stories_tokenizer.encode(DOG)
    tokens = stories_tokenizer.encode(DOG + GOLDEN_DOG)[len(prompt):]
    shown, final, _, reason = stream(stories_tokenizer, prompt, tokens, SamplingParams(stop=["toys and run"]))
    assert (final, reason) == (" Max. Max loved to play with his ", "toys and run")
    assert_streams_prefixes(shown, final)
    assert shown[-1] == final  # " his to", " his toys and r" ... were held back, never shown


def test_split_characters_are_held_back(stories_tokenizer, smollm_tokenizer):
    for tokenizer in (stories_tokenizer, smollm_tokenizer):
        prompt = tokenizer.encode("Say it:")
        for text in SPLIT_TEXTS:
            tokens = tokenizer.encode(text, add_special_tokens=False)
            assert any("\ufffd" in tokenizer.decode(tokens[:k]) for k in range(len(tokens)))  # characters split
            shown, final, _, _ = stream(tokenizer, prompt, tokens, SamplingParams(max_tokens=len(tokens)))
            assert final == decoded(tokenizer, prompt, tokens) and final.strip() == text
            assert_streams_prefixes(shown, final)
            assert all("\ufffd" not in s for s in shown)


def test_a_trailing_split_character_is_released_on_finish(smollm_tokenizer):
    tokens = smollm_tokenizer.encode("ok 😊", add_special_tokens=False)[:-1]
    shown, final, _, _ = stream(smollm_tokenizer, [], tokens, SamplingParams())
    assert shown[-1] == "ok" and final == smollm_tokenizer.decode(tokens) and final.endswith("\ufffd")
    # the U+FFFD stands for bytes the output never completed: no stop string matches it (a length cut stays one)
    for stop in ("\ufffd", "k \ufffd"):
        assert stream(smollm_tokenizer, [], tokens, SamplingParams(stop=[stop]))[1:] == (final, len(tokens), None)
    assert stream(smollm_tokenizer, [], tokens, SamplingParams(stop=["k "]))[1:] == ("o", len(tokens), "k ")


@pytest.mark.parametrize(("include", "expected"), [(False, " Max"), (True, " Max.")])
def test_stop_token_text_only_with_include_stop_str_in_output(stories_tokenizer, include, expected):
    prompt = stories_tokenizer.encode(DOG)
    tokens = stories_tokenizer.encode(DOG + GOLDEN_DOG)[len(prompt):]
    params = SamplingParams(stop_token_ids=[STORIES_DOT], include_stop_str_in_output=include)
    shown, final, taken, reason = stream(stories_tokenizer, prompt, tokens, params, {STORIES_DOT})
    assert (final, taken, reason) == (expected, tokens.index(STORIES_DOT) + 1, STORIES_DOT)
    assert_streams_prefixes(shown, final)


@pytest.mark.parametrize(("include", "expected"), [(False, ""), (True, "</s>")])
def test_eos_text_only_with_include_stop_str_in_output(stories_tokenizer, include, expected):
    params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include)
    _, final, _, _ = stream(stories_tokenizer, [1], [STORIES_EOS], params, {STORIES_EOS})
    assert final == expected


def test_the_stop_string_completed_first_wins(stories_tokenizer):
    prompt = stories_tokenizer.encode(DOG)
    tokens = stories_tokenizer.encode(DOG + " Max loved")[len(prompt):]
    for include, expected in ((False, " Max l"), (True, " Max lov")):
        params = SamplingParams(stop=["loved", "ov"], include_stop_str_in_output=include)
        _, final, _, reason = stream(stories_tokenizer, prompt, tokens, params)
        assert (final, reason) == (expected, "ov")


def test_min_tokens_skips_stop_strings_in_its_text_only(stories_tokenizer):
    prompt = stories_tokenizer.encode(DOG)
    tokens = stories_tokenizer.encode(DOG + GOLDEN_DOG)[len(prompt):]
    params = SamplingParams(stop=["Max"], min_tokens=3)  # " Max" ends at token 3: the next "Max" stops
    shown, final, _, reason = stream(stories_tokenizer, prompt, tokens, params)
    assert (final, reason) == (" Max. ", "Max")
    assert_streams_prefixes(shown, final)
    spanning = SamplingParams(stop=["ax."], min_tokens=3)  # starts in the first 3 tokens' text, ends after
    assert stream(stories_tokenizer, prompt, tokens, spanning)[1] == " M"


def test_a_held_stop_prefix_is_released_at_max_tokens(stories_tokenizer):
    prompt = stories_tokenizer.encode(DOG)
    tokens = stories_tokenizer.encode(DOG + " Max. Max loved to")[len(prompt):]
    shown, final, _, reason = stream(stories_tokenizer, prompt, tokens, SamplingParams(stop=["toys"]))
    assert (shown[-1], final, reason) == (" Max. Max loved ", " Max. Max loved to", None)


SPECIAL = st.sampled_from([0, 1, 2])


def token_lists(vocab_size, text_ids):
    return st.lists(st.one_of(st.integers(0, vocab_size - 1), st.sampled_from(text_ids), SPECIAL), max_size=24)


def check_property(tokenizer, prompt, tokens, data):
    """Random stops (pieces of the text) and stop ids (some of the tokens): stream against the oracle."""
    whole = decoded(tokenizer, prompt, tokens)
    pieces = st.integers(0, max(0, len(whole) - 1)).flatmap(lambda i: st.integers(1, 6).map(
        lambda n: whole[i : i + n]))
    stops = data.draw(st.lists(st.one_of(pieces, st.text(min_size=1, max_size=3)).filter(
        lambda s: s and "\ufffd" not in s), max_size=3))
    stop_ids = data.draw(st.lists(st.sampled_from(tokens), max_size=2)) if tokens else []
    params = SamplingParams(stop=stops, stop_token_ids=stop_ids, max_tokens=max(1, len(tokens)),
                            include_stop_str_in_output=data.draw(st.booleans()),
                            skip_special_tokens=data.draw(st.booleans()))
    shown, final, _, _ = stream(tokenizer, prompt, tokens, params, set(stop_ids))
    assert final == oracle(tokenizer, prompt, tokens, params)
    assert_streams_prefixes(shown, final)


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(data=st.data())
def test_random_streams_match_the_oracle_stories(stories_tokenizer, data):
    text_ids = stories_tokenizer.encode(DOG + GOLDEN_DOG + " café 😊", add_special_tokens=False)
    tokens = data.draw(token_lists(len(stories_tokenizer), text_ids))
    check_property(stories_tokenizer, stories_tokenizer.encode(DOG), tokens, data)


@PROPERTY
@given(data=st.data())
def test_random_streams_match_the_oracle_smollm(smollm_tokenizer, data):
    text_ids = smollm_tokenizer.encode(" ".join(SPLIT_TEXTS) + GOLDEN_DOG, add_special_tokens=False)
    tokens = data.draw(token_lists(len(smollm_tokenizer), text_ids))
    check_property(smollm_tokenizer, smollm_tokenizer.encode("Say it:"), tokens, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text("ab c\u00e9", max_size=14), stops=st.lists(st.text("ab c\u00e9", min_size=1, max_size=7),
                                                           min_size=1, max_size=4))
def test_held_back_text_is_the_longest_tail_that_may_start_a_stop_string(stories_tokenizer, text, stops):
    """By definition: the longest tail of the text that is a proper prefix of some stop string."""
    detokenizer = IncrementalDetokenizer(stories_tokenizer, [], SamplingParams(stop=stops))
    detokenizer._text = text  # the text taken in so far, none of it searched yet
    held = max((n for n in range(1, len(text) + 1) for stop in stops if len(stop) > n and stop.startswith(text[-n:])),
               default=0)
    assert detokenizer.text == text[: len(text) - held]


@pytest.fixture(scope="module")
def llm(stories_path):
    return LLM(stories_path, num_blocks=64)


def engine_stream(llm, requests):
    """Step the engine over `{request_id: (prompt, params)}`; texts shown and final output per id."""
    engine = llm.engine
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    shown, final = {}, {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            for completion in output.outputs:
                shown.setdefault((output.request_id, completion.index), []).append(completion.text)
            if output.finished:
                final[output.request_id] = output
    return shown, final


def test_engine_streams_prefixes_of_the_final_text(llm, stories_tokenizer):
    greedy = dict(temperature=0.0, max_tokens=40)
    requests = {
        "stop": (DOG, SamplingParams(stop=["toys and run"], **greedy)),
        "dot": (DOG, SamplingParams(stop_token_ids=[STORIES_DOT], **greedy)),
        "eos": (DOG, SamplingParams(logit_bias={STORIES_EOS: 100.0}, skip_special_tokens=False, **greedy)),
        "min": (DOG, SamplingParams(stop=["Max"], min_tokens=3, **greedy)),
        "length": (DOG, SamplingParams(stop=["toys"], temperature=0.0, max_tokens=14)),
        "sampled": (DOG, SamplingParams(n=2, temperature=1.0, seed=3, stop=[" the", "."], max_tokens=30)),
    }
    shown, final = engine_stream(llm, requests)
    texts = {request_id: output.outputs[0].text for request_id, output in final.items()}
    assert texts["stop"] == " Max. Max loved to play with his "
    assert texts["dot"] == " Max" and final["dot"].outputs[0].stop_reason == STORIES_DOT
    assert texts["eos"] == "" and final["eos"].outputs[0].finish_reason == "stop"
    assert texts["min"] == " Max. "
    assert texts["length"] == " Max. Max loved to play with his to"
    assert final["length"].outputs[0].finish_reason == "length"
    prompt = stories_tokenizer.encode(DOG)
    for (request_id, index), texts_shown in shown.items():
        completion = final[request_id].outputs[index]
        assert_streams_prefixes(texts_shown, completion.text)
        tokens = completion.token_ids
        if request_id not in ("eos", "min"):  # the oracle knows neither EOS nor min_tokens
            assert completion.text == oracle(stories_tokenizer, prompt, tokens, requests[request_id][1])


def test_abort_releases_the_held_text(llm):
    engine = llm.engine
    engine.add_request("abort", DOG, SamplingParams(temperature=0.0, max_tokens=40, stop=["toys"]))
    seq, shown = engine.get_sequence("abort"), []
    while len(seq.output_token_ids) < 14:  # "... with his" and " to", which may begin "toys"
        shown += [output.outputs[0].text for output in engine.step()]
    engine.abort_request("abort")
    assert shown[-1] == " Max. Max loved to play with his "
    assert (engine.text(seq), seq.finish_reason) == (" Max. Max loved to play with his to", "abort")
