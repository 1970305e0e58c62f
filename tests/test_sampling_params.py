"""SamplingParams validation: every bad value fails with an error naming the field."""

import pytest

from jpaged.sampling_params import SamplingParams

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
    ("seed", -1),
    ("seed", 2**32),
    ("seed", 1.0),
    ("seed", "42"),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 8.0),
    ("max_tokens", None),
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
        ("temperature", -1.0, ">= 0"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -5, ">= 1"),
        ("min_p", 2.0, "[0, 1]"),
        ("seed", -1, "[0, 2**32)"),
        ("max_tokens", 0, ">= 1"),
        ("stop_token_ids", [-4], ">= 0"),
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
