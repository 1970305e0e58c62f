"""Per-request decoding controls, shaped like vLLM's ``SamplingParams``.

A ``SamplingParams`` is built by the user (or the CLI) and validated here, on the host, before
its request enters the engine: a bad value fails at construction with an error naming the field,
the value and the allowed range, so it can never reach the scheduler or the jitted step. The
sampler later packs the numeric fields of every scheduled request into device arrays
(``jpaged.sampler.SamplingArrays``); the stop fields are used by the engine's host-side stop checks.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

SEED_LIMIT = 2**32  # seeds are packed into uint32 device arrays


def _as_float(field: str, value: object) -> float:
    """Return ``value`` as a finite float, or raise naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{field} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    return number


def _as_int(field: str, value: object) -> int:
    """Return ``value`` as an int (bools rejected), or raise naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{field} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _as_bool(field: str, value: object) -> bool:
    """Return ``value`` if it is a bool, or raise naming ``field``."""
    if not isinstance(value, bool):
        raise TypeError(f"{field} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _as_stop_strings(value: object) -> list[str]:
    """Normalise ``stop`` (None, a string or a list of strings) to a list of non-empty strings."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"stop must be a string or a list of strings, got {value!r}")
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"stop must contain only strings, got {item!r} ({type(item).__name__})")
        if not item:
            raise ValueError("stop strings must be non-empty, got ''")
    return list(items)


def _as_token_ids(value: object) -> list[int]:
    """Normalise ``stop_token_ids`` (None or a list of ints) to a list of ints >= 0."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"stop_token_ids must be a list of ints, got {value!r}")
    token_ids = [_as_int("stop_token_ids", item) for item in value]
    for token_id in token_ids:
        if token_id < 0:
            raise ValueError(f"stop_token_ids must be >= 0, got {token_id}")
    return token_ids


@dataclass
class SamplingParams:
    """How to decode one request.

    Attributes:
        temperature: softmax temperature, >= 0; 0 means greedy (argmax).
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: keep only the k most likely tokens; 0 (or -1, normalised to 0) disables it.
        min_p: drop tokens whose probability is below ``min_p`` times the top probability,
            in [0, 1]; 0 disables it.
        seed: per-request random seed in [0, 2**32); None lets the engine draw one.
        max_tokens: most tokens to generate, >= 1.
        stop: strings that end generation; normalised to a list of non-empty strings.
        stop_token_ids: token ids that end generation (besides EOS); normalised to a list.
        ignore_eos: keep generating past the EOS token.
        skip_special_tokens: leave special tokens out of the detokenized text.
        include_stop_str_in_output: keep the matched stop string in the output text.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self._check_sampling_fields()
        self._check_length_and_stop_fields()

    def _check_sampling_fields(self) -> None:
        """Validate and normalise the fields the device-side sampler reads."""
        self.temperature = _as_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        self.top_p = _as_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _as_int("top_k", self.top_k)
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 1, or 0 / -1 to disable it, got {self.top_k}")
        self.min_p = _as_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            self.seed = _as_int("seed", self.seed)
            if not 0 <= self.seed < SEED_LIMIT:
                raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")

    def _check_length_and_stop_fields(self) -> None:
        """Validate and normalise the fields the engine's host-side stop checks read."""
        self.max_tokens = _as_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.stop = _as_stop_strings(self.stop)
        self.stop_token_ids = _as_token_ids(self.stop_token_ids)
        self.ignore_eos = _as_bool("ignore_eos", self.ignore_eos)
        self.skip_special_tokens = _as_bool("skip_special_tokens", self.skip_special_tokens)
        self.include_stop_str_in_output = _as_bool(
            "include_stop_str_in_output", self.include_stop_str_in_output
        )

    @property
    def is_greedy(self) -> bool:
        """True when decoding takes the argmax token (temperature 0)."""
        return self.temperature == 0
