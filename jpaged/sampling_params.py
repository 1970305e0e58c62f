"""Per-request decoding controls, shaped like vLLM's ``SamplingParams``.

A ``SamplingParams`` is built by the user (or the CLI) and validated here, on the host, before
its request enters the engine: a bad value fails at construction with an error naming the field,
the value and the allowed range, so it can never reach the scheduler or the jitted step. The
sampler later packs the numeric fields of every scheduled request into device arrays
(``jpaged.step_batch.SamplingArrays``); the stop fields are used by the engine's host-side stop checks.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
from dataclasses import dataclass

SEED_LIMIT = 2**32  # seeds are packed into uint32 device arrays (`device_seed` maps a request's seed there)
SEED_RANGE = (-(2**63), 2**64)  # request seeds: any int64 or uint64, as torch's manual_seed takes
# what a sampled token's logprobs hold (vLLM's `logprobs_mode`): the model's own log-softmax or
# logits ("raw"), or those of the distribution drawn from ("processed": after min_tokens,
# logit_bias, penalties, temperature, top-k, top-p and min-p)
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
MAX_LOGPROBS = 20  # default of the engine's ``max_logprobs``, the most top logprobs per token: vLLM's default
ALL_LOGPROBS = -1  # ``logprobs`` / ``prompt_logprobs`` asking for the whole vocabulary (vLLM's)
PENALTY_LIMIT = 2.0  # presence / frequency penalties lie in [-PENALTY_LIMIT, PENALTY_LIMIT]
LOGIT_BIAS_LIMIT = 100.0  # logit_bias values lie in [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT]
# Temperatures and repetition penalties reach the device as float32 and divide logits there (XLA may multiply by the
# reciprocal): within this range a value and its reciprocal are both normal float32 numbers. Beyond it a value becomes
# inf or 0 (a 0 temperature makes a sampled row greedy), or its reciprocal 0 (-inf logits times 0: NaN, which the
# argmax picks, so masked tokens could be drawn).
FLOAT32_RANGE = (1.1754943508222875e-38, 1 / 1.1754943508222875e-38)


def _check_float32_range(field: str, value: float, must: str, note: str) -> None:
    """Raise ValueError naming ``field`` unless ``value`` lies in ``FLOAT32_RANGE``."""
    if not FLOAT32_RANGE[0] <= value <= FLOAT32_RANGE[1]:
        raise ValueError(f"{field} {must} [{FLOAT32_RANGE[0]:.4g}, {FLOAT32_RANGE[1]:.4g}] "
                         f"(float32 numbers whose reciprocal is one too{note}), got {value}")


def as_float(field: str, value: object) -> float:
    """Return ``value`` as a finite float, or raise naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{field} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    return number


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer (Python's or numpy's), bools excluded."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_int(field: str, value: object) -> int:
    """Return ``value`` as an int (bools rejected), or raise naming ``field``."""
    if not is_integer(value):
        raise TypeError(f"{field} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def logprob_cap(max_logprobs: int, vocab_size: int) -> int:
    """The engine's ``max_logprobs`` as a count: ``ALL_LOGPROBS`` is the vocabulary's size."""
    return vocab_size if max_logprobs == ALL_LOGPROBS else max_logprobs


def _as_logprob_count(field: str, value: object) -> int | None:
    """Return ``value`` as None, ``ALL_LOGPROBS`` or an int >= 0, or raise naming ``field`` (the
    engine checks the count against its ``max_logprobs``)."""
    if value is None:
        return None
    number = as_int(field, value)
    if number < ALL_LOGPROBS:
        raise ValueError(f"{field} must be None, {ALL_LOGPROBS} (the whole vocabulary) or >= 0, got {number}")
    return number


def _as_logit_bias(value: object) -> dict[int, float] | None:
    """Normalise ``logit_bias`` to None or a dict of token id (>= 0) -> bias in [-100, 100].

    Keys may be ints or decimal strings (the OpenAI API sends JSON objects, whose keys are
    strings); an empty dict becomes None. The vocabulary bound is checked by the engine.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"logit_bias must be a dict of token id -> bias, got {value!r}")
    bias: dict[int, float] = {}
    for key, item in value.items():
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        if not is_integer(key):
            raise TypeError(f"logit_bias keys must be int token ids, got {key!r}")
        if key < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0, got {key}")
        number = as_float(f"logit_bias[{key}]", item)
        if not -LOGIT_BIAS_LIMIT <= number <= LOGIT_BIAS_LIMIT:
            raise ValueError(
                f"logit_bias values must be in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}], "
                f"got {item!r} for token {key}"
            )
        bias[int(key)] = number
    return bias or None


def unicode_text(field: str, text: str) -> str:
    """`text`, or ValueError naming `field` where it holds a lone UTF-16 surrogate (not Unicode
    text, so no tokenizer takes it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{field} holds {text[err.start:err.end]!r} at character {err.start}, a lone UTF-16 "
                         "surrogate, which is not Unicode text") from None
    return text


def as_bool(field: str, value: object) -> bool:
    """Return ``value`` if it is a bool, or raise naming ``field``."""
    if not isinstance(value, bool):
        raise TypeError(f"{field} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _as_strings(field: str, value: object) -> list[str]:
    """Normalise ``stop`` or ``bad_words`` (None, a string or a list of strings) to a list of
    non-empty strings."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{field} must be a string or a list of strings, got {value!r}")
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{field} must contain only strings, got {item!r} ({type(item).__name__})")
        if not item:
            raise ValueError(f"{field} strings must be non-empty, got ''")
        unicode_text(field, item)
    return list(items)


def _as_token_ids(field: str, value: object) -> list[int]:
    """Normalise ``stop_token_ids`` or ``allowed_token_ids`` (None or a list of ints) to a list
    of ints >= 0."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{field} must be a list of ints, got {value!r}")
    token_ids = [as_int(field, item) for item in value]
    for token_id in token_ids:
        if token_id < 0:
            raise ValueError(f"{field} must be >= 0, got {token_id}")
    return token_ids


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def constraints_set(fields: dict) -> list[str]:
    """The structured-output kinds that `fields` (a `StructuredOutputsParams`' fields, or a request's
    dict of them) set: neither None nor False."""
    return [kind for kind in STRUCTURED_KINDS if fields.get(kind) not in (None, False)]


@dataclass
class StructuredOutputsParams:
    """A constraint on what a request generates, shaped like vLLM's ``StructuredOutputsParams``:
    exactly one of the six kinds (see ``jpaged.structured_output``).

    Attributes:
        json: a JSON schema (a dict, its JSON text, or True for any value): the output is one JSON value it
            accepts.
        regex: a regular expression (Rust ``regex`` syntax) the whole output matches.
        choice: a list of strings: the output is exactly one of them.
        grammar: a context-free grammar in Lark or GBNF (llama.cpp's) syntax.
        json_object: True: the output is any JSON object (OpenAI's ``json_object`` format).
        structural_tag: free text in which tagged segments are constrained (vLLM's, for tool
            calls amid text): the JSON text (or a dict) of ``{"structures": [{"begin", "schema",
            "end"}, ...], "triggers": [...]}``. Once the output holds a trigger, the rest of the
            segment must be one structure's ``begin``, a JSON value its ``schema`` accepts, then its
            ``end``; each ``begin`` starts with one of the triggers.
        disable_any_whitespace: JSON without white space between tokens (by default any white space
            JSON allows may appear, which small models can fill without end).
        disable_additional_properties: JSON objects hold only the properties their schema lists
            (``additionalProperties: false`` wherever the schema does not say otherwise).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        given = constraints_set(vars(self))
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(STRUCTURED_KINDS)}, "
                             f"got {given or 'none'}")
        if self.json is True:  # JSON Schema's `true`: any JSON value
            self.json = "true"
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise TypeError(f"structured_outputs json must be a schema (a dict, its JSON text, or True), got {self.json!r}")
        if isinstance(self.structural_tag, dict):
            self.structural_tag = json.dumps(self.structural_tag)
        for field in ("regex", "grammar", "structural_tag"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs {field} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)):
                raise TypeError(f"structured_outputs choice must be a list of strings, got {self.choice!r}")
            self.choice = _as_strings("structured_outputs choice", self.choice)
            if not self.choice:
                raise ValueError("structured_outputs choice must hold at least one string, got []")
        if self.json_object is not None:
            as_bool("structured_outputs json_object", self.json_object)
        as_bool("structured_outputs disable_any_whitespace", self.disable_any_whitespace)
        as_bool("structured_outputs disable_additional_properties", self.disable_additional_properties)

    @property
    def constraint(self) -> tuple[str, object]:
        """(kind, value) of the one constraint set."""
        (kind,) = constraints_set(vars(self))
        return kind, getattr(self, kind)


@dataclass
class SamplingParams:
    """How to decode one request.

    Attributes:
        temperature: softmax temperature; 0 means greedy (argmax), else in [1.2e-38, 8.5e37]
            (``FLOAT32_RANGE``).
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: keep only the k most likely tokens; 0 (or -1, normalised to 0) disables it.
        min_p: drop tokens whose probability is below ``min_p`` times the top probability,
            in [0, 1]; 0 disables it.
        seed: per-request random seed, any int64 or uint64 (as vLLM takes); None (or -1, as in
            vLLM) lets the engine draw one. Seeds in [0, 2**32) are drawn from as they are, others
            after a hash into that range.
        max_tokens: most tokens to generate, >= 1; None: as many as ``max_model_len`` leaves
            after the prompt (the engine sets it when the request is added).
        stop: strings that end generation; normalised to a list of non-empty strings.
        stop_token_ids: token ids that end generation (besides EOS); normalised to a list.
        ignore_eos: keep generating past the EOS token.
        skip_special_tokens: leave special tokens out of the detokenized text.
        detokenize: build the output text; False leaves it "" (token ids only, less host work per
            token) and cannot go with stop strings, which are found in the text.
        include_stop_str_in_output: keep the matched stop string, or the text of the stop token
            or EOS that ended the sequence, in the output text (see ``jpaged.detokenizer``).
        n: number of output sequences returned for the request, >= 1.
        best_of: number of sequences generated, of which the ``n`` with the highest cumulative
            logprob are returned; >= n. None means ``n`` (normalised to it). Greedy decoding
            (temperature 0) needs ``n == best_of == 1``: its sequences would all be identical.
        presence_penalty: subtracted from the logit of every token that occurs in the generated
            output (OpenAI / vLLM semantics; the prompt does not count), in [-2, 2]; 0 disables.
        frequency_penalty: subtracted once per occurrence of a token in the generated output,
            in [-2, 2]; 0 disables.
        repetition_penalty: HF / CTRL penalty over tokens in the prompt or the output: a positive
            logit is divided by it, a negative one multiplied; in ``FLOAT32_RANGE``, 1 disables.
        logprobs: None, or how many top logprobs to report per generated token, >= 0, or -1 for
            the whole vocabulary; the engine refuses more than its ``max_logprobs`` (default 20).
            The sampled token's logprob is reported whenever this is not None (0 reports only it).
        prompt_logprobs: None, or how many top logprobs to report per prompt token, as ``logprobs``.
        min_tokens: EOS and ``stop_token_ids`` cannot be sampled before this many tokens have been
            generated; in [0, max_tokens]. (Stop strings are not blocked, as in vLLM.)
        logit_bias: token id -> bias added to that token's logit before sampling, in [-100, 100];
            None (or an empty dict, normalised to None) disables. Keys must be >= 0; the engine
            checks them against the vocabulary.
        allowed_token_ids: None, or the only token ids that may be sampled (normalised to a
            sorted list of distinct ids; at most 1,024, ``jpaged.padding.MAX_BIASED_TOKENS``).
        bad_words: words that must not be generated (a string or a list; vLLM's semantics): each
            is tokenized as it reads at the start of a text and after a space, and a word's last
            token is blocked whenever the output ends with the tokens before it (a one-token
            word is blocked always).
        truncate_prompt_tokens: None, or keep only the prompt's last k tokens (left truncation,
            k >= 1); -1 keeps the last ``max_model_len``.
        structured_outputs: None, or a `StructuredOutputsParams` (or a dict of its fields) that
            constrains the output to a JSON schema, a regex, a choice or a grammar.

    Penalties, ``logit_bias``, ``allowed_token_ids``, ``bad_words`` and ``min_tokens`` apply to
    greedy rows as well (before argmax).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: str | list[str] | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._check_sampling_fields()
        self._check_length_and_stop_fields()
        self._check_penalty_fields()
        self._check_output_fields()

    def _check_sampling_fields(self) -> None:
        """Validate and normalise the fields the device-side sampler reads."""
        self.temperature = as_float("temperature", self.temperature)
        if self.temperature != 0:
            _check_float32_range("temperature", self.temperature, "must be 0 (greedy) or in", "")
        self.top_p = as_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = as_int("top_k", self.top_k)
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 1, or 0 / -1 to disable it, got {self.top_k}")
        self.min_p = as_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            self.seed = as_int("seed", self.seed)
            if self.seed == -1:  # vLLM's "no seed"
                self.seed = None
        if self.seed is not None:
            if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
                raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")

    def _check_length_and_stop_fields(self) -> None:
        """Validate and normalise the fields the engine's host-side stop checks read."""
        if self.max_tokens is not None:
            self.max_tokens = as_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 (or None: up to max_model_len), got {self.max_tokens}")
        self.stop = _as_strings("stop", self.stop)
        self.stop_token_ids = _as_token_ids("stop_token_ids", self.stop_token_ids)
        if self.truncate_prompt_tokens is not None:
            self.truncate_prompt_tokens = as_int("truncate_prompt_tokens", self.truncate_prompt_tokens)
            if self.truncate_prompt_tokens == 0 or self.truncate_prompt_tokens < -1:
                raise ValueError(f"truncate_prompt_tokens must be >= 1, or -1 for max_model_len, "
                                 f"got {self.truncate_prompt_tokens}")
        self.ignore_eos = as_bool("ignore_eos", self.ignore_eos)
        self.skip_special_tokens = as_bool("skip_special_tokens", self.skip_special_tokens)
        self.include_stop_str_in_output = as_bool(
            "include_stop_str_in_output", self.include_stop_str_in_output
        )
        self.detokenize = as_bool("detokenize", self.detokenize)
        if self.stop and not self.detokenize:
            raise ValueError(f"stop strings {self.stop[:3]} are found in the output text: they need detokenize=True")

    def _check_penalty_fields(self) -> None:
        """Validate and normalise the logits processors' fields (penalties, bias, min_tokens)."""
        for field in ("presence_penalty", "frequency_penalty"):
            value = as_float(field, getattr(self, field))
            if not -PENALTY_LIMIT <= value <= PENALTY_LIMIT:
                raise ValueError(f"{field} must be in [-2, 2], got {value}")
            setattr(self, field, value)
        self.repetition_penalty = as_float("repetition_penalty", self.repetition_penalty)
        _check_float32_range("repetition_penalty", self.repetition_penalty, "must be in", "; 1 disables it")
        self.min_tokens = as_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens):
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        self.logit_bias = _as_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = sorted(set(_as_token_ids("allowed_token_ids", self.allowed_token_ids)))
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must hold at least one token id, got []")
        self.bad_words = _as_strings("bad_words", self.bad_words)
        blank = [word for word in self.bad_words if not word.strip()]
        if blank:
            raise ValueError(f"bad_words must hold more than white space, got {blank[0]!r}")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise TypeError(f"structured_outputs must be a StructuredOutputsParams or a dict of its fields, "
                            f"got {self.structured_outputs!r}")

    def _check_output_fields(self) -> None:
        """Validate ``n``, ``best_of`` and the logprob counts, and their combinations."""
        self.n = as_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.best_of is None:
            self.best_of = self.n
        self.best_of = as_int("best_of", self.best_of)
        if self.best_of < self.n:
            raise ValueError(f"best_of must be >= n (n={self.n}), got {self.best_of}")
        if self.is_greedy and self.n > 1:
            raise ValueError(
                f"n must be 1 when using greedy sampling (temperature=0): its {self.n} sequences "
                f"would be identical; got {self.n}"
            )
        if self.is_greedy and self.best_of > 1:
            raise ValueError(
                f"best_of must be 1 when using greedy sampling (temperature=0), got {self.best_of}"
            )
        self.logprobs = _as_logprob_count("logprobs", self.logprobs)
        self.prompt_logprobs = _as_logprob_count("prompt_logprobs", self.prompt_logprobs)

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's method), to change without touching these params."""
        return copy.deepcopy(self)

    @property
    def num_samples(self) -> int:
        """Sequences a request with these params runs: `best_of`, else `n`."""
        return max(self.n, self.best_of or self.n)

    @property
    def computes_logprobs(self) -> bool:
        """Whether its sampled tokens' logprobs are computed: asked for, or to rank `best_of`
        samples by their sums."""
        return self.logprobs is not None or self.num_samples > self.n

    @property
    def is_greedy(self) -> bool:
        """True when decoding takes the argmax token (temperature 0)."""
        return self.temperature == 0

    @property
    def uses_repetition_penalty(self) -> bool:
        """True when the repetition penalty is on (it needs the prompt's tokens)."""
        return self.repetition_penalty != 1.0

    @property
    def changes_logits(self) -> bool:
        """True when ``logit_bias``, ``allowed_token_ids``, ``bad_words`` or ``structured_outputs``
        reshape the logits."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words or self.structured_outputs)

    @property
    def uses_penalties(self) -> bool:
        """True when any of the repetition, frequency or presence penalties is on."""
        return (
            self.uses_repetition_penalty
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


def truncated_prompt(token_ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """The prompt's last `keep` tokens (`truncate_prompt_tokens`; -1: the last `max_model_len`;
    None: all). ValueError for a `keep` of 0, below -1 or above `max_model_len`."""
    if keep is None:
        return token_ids
    if keep == 0 or keep < -1:
        raise ValueError(f"truncate_prompt_tokens must be >= 1, or -1 for max_model_len, got {keep}")
    if keep > max_model_len:
        raise ValueError(f"truncate_prompt_tokens {keep} exceeds max_model_len {max_model_len}")
    return token_ids[-(max_model_len if keep == -1 else keep):]


def bad_words_token_ids(bad_words: list[str], tokenizer) -> list[list[int]]:
    """Each bad word as the token sequences it can take in an output (vLLM's rule): as it reads at
    the start of a text, and after a space where that tokenizes differently in its first token
    only (same length). `tokenizer` has `encode(text, add_special_tokens=False)`."""
    sequences = []
    for word in bad_words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        sequences.append(alone)
        if spaced[0] != alone[0] and len(spaced) == len(alone):
            sequences.append(spaced)
    return sequences


def _splitmix64(z: int) -> int:
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def device_seed(seed: int) -> int:
    """A request's seed (in `SEED_RANGE`) as the uint32 the device draws from: seeds in
    [0, 2**32) as they are, others (a negative seed taken as its 64 bits, as torch's
    `manual_seed` takes it) mixed by splitmix64 into that range."""
    if 0 <= seed < SEED_LIMIT:
        return seed
    return _splitmix64(seed & ((1 << 64) - 1)) % SEED_LIMIT


def derive_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th sequence of a request whose seed is ``seed``, in [0, 2**32).

    Index 0 keeps ``seed`` itself (so ``n == 1`` requests draw exactly as before); siblings of a
    parallel-sampling request (``n`` / ``best_of`` > 1) get distinct, reproducible seeds mixed by
    splitmix64, so they do not all draw the same tokens.
    """
    if index == 0:
        return int(seed)
    return _splitmix64((int(seed) * 0x100000001 + index * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)) % SEED_LIMIT


GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
"""HF generation-config keys that set sampling defaults, and the `SamplingParams` field each sets."""


def generation_defaults(generation_config: dict) -> dict:
    """The sampling defaults a model's HF `generation_config.json` recommends, as `SamplingParams`
    fields: its temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens (as
    max_tokens), where set (vLLM's `generation_config="auto"`; `do_sample` is not read, as in
    vLLM). ValueError, naming the file, for a value `SamplingParams` refuses."""
    defaults = {field: generation_config[key] for key, field in GENERATION_CONFIG_FIELDS.items()
                if generation_config.get(key) is not None}
    try:
        SamplingParams(**defaults)
    except (ValueError, TypeError) as err:
        raise ValueError(f"generation_config.json: {err}") from err
    return defaults


@dataclass(frozen=True)
class BeamSearchParams:
    """What `LLM.beam_search` searches for (vLLM's `BeamSearchParams`): the `beam_width` best
    continuations of at most `max_tokens` tokens, ranked by cumulative logprob / length **
    `length_penalty`. `temperature` (>= 0) is taken as vLLM takes it and, as there, leaves the
    result unchanged: beams are ranked on the model's raw logprobs. ValueError naming a bad value."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self):
        as_int("beam_width", self.beam_width)
        as_int("max_tokens", self.max_tokens)
        as_float("length_penalty", self.length_penalty)
        as_bool("ignore_eos", self.ignore_eos)
        if as_float("temperature", self.temperature) < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
