"""SamplingParams validation: every bad value fails with an error naming the field."""

import pytest

from jpaged.sampling_params import SamplingParams, generation_defaults

INVALID_VALUES = [
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", "0.7"),
    ("temperature", None),
    ("temperature", True),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.5),
    ("top_p", float("nan")),
    ("top_p", "1"),
    ("top_k", -2),
    ("top_k", 2.5),
    ("top_k", "5"),
    ("top_k", True),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("min_p", float("nan")),
    ("min_p", [0.1]),
    ("seed", -(2**63) - 1),
    ("seed", 2**64),
    ("seed", 1.0),
    ("seed", "42"),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 8.0),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop", 7),
    ("stop_token_ids", [1, -1]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", 5),
    ("stop_token_ids", ["2"]),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("skip_special_tokens", None),
    ("include_stop_str_in_output", 0),
    ("n", 0),
    ("n", -1),
    ("n", 2.0),
    ("n", None),
    ("best_of", 0),
    ("best_of", 1.5),
    ("presence_penalty", 2.01),
    ("presence_penalty", -2.5),
    ("presence_penalty", float("nan")),
    ("presence_penalty", "0.1"),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.01),
    ("frequency_penalty", None),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", float("inf")),
    ("repetition_penalty", "1.2"),
    ("logprobs", -2),
    ("logprobs", 1.0),
    ("logprobs", True),
    ("prompt_logprobs", -3),
    ("prompt_logprobs", "3"),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > max_tokens (16)
    ("min_tokens", 1.0),
    ("min_tokens", None),
    ("logit_bias", {1: 100.5}),
    ("logit_bias", {1: -101}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"-3": 1.0}),
    ("logit_bias", {"x": 1.0}),
    ("logit_bias", {1.0: 1.0}),
    ("logit_bias", {True: 1.0}),
    ("logit_bias", {1: float("nan")}),
    ("logit_bias", {1: "2"}),
    ("logit_bias", [(1, 2.0)]),
]


@pytest.mark.parametrize(("field", "value"), INVALID_VALUES)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises((ValueError, TypeError)) as raised:
        SamplingParams(**{field: value})
    message = str(raised.value)
    assert message.startswith(field), message


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("temperature", -1.0, "0 (greedy) or in [1.175e-38, 8.507e+37]"),
        ("temperature", 1e38, "0 (greedy) or in [1.175e-38, 8.507e+37]"),  # a 0 reciprocal on the device
        ("temperature", 1e-300, "0 (greedy) or in [1.175e-38, 8.507e+37]"),  # float32 0: greedy where n > 1 is allowed
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -5, ">= 1"),
        ("min_p", 2.0, "[0, 1]"),
        ("seed", 2**64, "[-2**63, 2**64)"),
        ("max_tokens", 0, ">= 1"),
        ("stop_token_ids", [-4], ">= 0"),
        ("n", 0, ">= 1"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("frequency_penalty", -3.0, "[-2, 2]"),
        ("repetition_penalty", 0.0, "[1.175e-38, 8.507e+37]"),
        ("repetition_penalty", 1e39, "[1.175e-38, 8.507e+37]"),
        ("logprobs", -2, "-1 (the whole vocabulary) or >= 0"),
        ("prompt_logprobs", -5, "-1 (the whole vocabulary) or >= 0"),
        ("min_tokens", 17, "[0, max_tokens=16]"),
        ("min_tokens", -2, "[0, max_tokens=16]"),
    ],
)
def test_range_error_states_value_and_range(field, value, allowed):
    with pytest.raises(ValueError) as raised:
        SamplingParams(**{field: value})
    message = str(raised.value)
    assert allowed in message and str(value).strip("[]") in message, message


def test_defaults():
    params = SamplingParams()
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0
    assert params.min_p == 0.0 and params.seed is None and params.max_tokens == 16
    assert params.stop == [] and params.stop_token_ids == []
    assert not params.ignore_eos and params.skip_special_tokens
    assert not params.include_stop_str_in_output and not params.is_greedy
    assert params.n == 1 and params.best_of == 1
    assert params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
    assert params.repetition_penalty == 1.0 and not params.uses_penalties
    assert params.logprobs is None and params.prompt_logprobs is None
    assert params.min_tokens == 0 and params.logit_bias is None


def test_normalisations():
    params = SamplingParams(
        temperature=0, top_p=1, top_k=-1, stop="x", stop_token_ids=(3, 0), seed=2**32 - 1
    )
    assert params.top_k == 0
    assert params.stop == ["x"]
    assert params.stop_token_ids == [3, 0]
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert params.is_greedy
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_boundary_values_are_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=1, min_p=0.0, seed=0, max_tokens=1)
    SamplingParams(temperature=1e-3, top_p=1e-6, top_k=10**6, min_p=1.0)
    SamplingParams(temperature=1.2e-38, repetition_penalty=8.5e37)
    SamplingParams(temperature=8.5e37, repetition_penalty=1.2e-38)


def test_best_of_must_cover_n():
    assert SamplingParams(n=3).best_of == 3  # None means n
    assert SamplingParams(n=2, best_of=5).best_of == 5
    with pytest.raises(ValueError) as raised:
        SamplingParams(n=3, best_of=2)
    message = str(raised.value)
    assert message.startswith("best_of") and ">= n (n=3)" in message and "2" in message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"n": 2}, "n"), ({"best_of": 2}, "best_of"), ({"n": 2, "best_of": 4}, "n")],
)
def test_greedy_allows_only_one_sequence(kwargs, field):
    with pytest.raises(ValueError) as raised:
        SamplingParams(temperature=0.0, **kwargs)
    message = str(raised.value)
    assert message.startswith(field) and "greedy" in message, message
    SamplingParams(temperature=0.5, **kwargs)  # fine when sampling


def test_logit_bias_range_message_and_normalisation():
    with pytest.raises(ValueError) as raised:
        SamplingParams(logit_bias={7: 150.0})
    message = str(raised.value)
    assert "[-100, 100]" in message and "150" in message and "7" in message
    params = SamplingParams(logit_bias={"12": 100, 3: -100.0, 0: 0.5})
    assert params.logit_bias == {12: 100.0, 3: -100.0, 0: 0.5}
    assert all(type(k) is int and type(v) is float for k, v in params.logit_bias.items())
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_new_fields_accept_their_boundaries():
    params = SamplingParams(
        n=4, best_of=4, presence_penalty=-2, frequency_penalty=2, repetition_penalty=1e-3,
        logprobs=0, prompt_logprobs=20, min_tokens=16, max_tokens=16,
    )
    assert isinstance(params.presence_penalty, float) and params.uses_penalties
    assert params.uses_repetition_penalty
    SamplingParams(logprobs=20, prompt_logprobs=0, min_tokens=0, repetition_penalty=100.0)
    assert not SamplingParams(presence_penalty=0.0).uses_penalties
    assert SamplingParams(frequency_penalty=0.1).uses_penalties
    assert not SamplingParams(frequency_penalty=0.1).uses_repetition_penalty


def test_generation_defaults_take_the_sampling_keys_of_an_hf_generation_config():
    config = {"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": True, "temperature": 0.6, "top_p": 0.9,
              "top_k": 20, "min_p": None, "repetition_penalty": 1.05, "max_new_tokens": 256, "max_length": 4096}
    assert generation_defaults(config) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                           "repetition_penalty": 1.05, "max_tokens": 256}
    assert generation_defaults({"bos_token_id": 1, "max_length": 512}) == {}
    with pytest.raises(ValueError, match=r"generation_config.json: top_p must be in \(0, 1\], got 1.5"):
        generation_defaults({"top_p": 1.5})
