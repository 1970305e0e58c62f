"""Structured outputs: grammars that decide which tokens a request may generate next.

Host side, between the engine and the sampler. When a request with
``SamplingParams.structured_outputs`` is added, `GrammarCompiler` turns its constraint (a JSON
schema, any JSON object, a regular expression, a choice of strings, or a Lark / GBNF grammar) into
a `Grammar`; every sequence of the request holds its own copy. Before a step samples a sequence,
`jpaged/step_batch.py` asks its grammar for the next token bitmask (one bit per vocabulary entry);
the sampler (`jpaged/sampler.py`) sets the logits of every token whose bit is clear to -inf, first
of all, so raw logprobs see the constraint as in vLLM. After the step the engine feeds each
sampled token back (`Grammar.accept`).

The matching itself is llguidance's (the engine behind vLLM's ``guidance`` backend): an Earley
parser over the tokenizer's byte-level vocabulary. Once a grammar is complete it allows only the
EOS tokens, so a constrained request ends as the grammar does.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jpaged.sampling_params import StructuredOutputsParams

logger = logging.getLogger("jpaged")


def bitmask_width(vocab_size: int) -> int:
    """int32 words of one row's token bitmask: bit ``t % 32`` of word ``t // 32`` is token t."""
    return (vocab_size + 31) // 32


class Grammar:
    """One sequence's place in its grammar (an llguidance ``LLMatcher``)."""

    def __init__(self, matcher):
        self._matcher = matcher

    def copy(self) -> Grammar:
        """An independent grammar in the same state (a request's other samples)."""
        return Grammar(self._matcher.deep_copy())

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Write the tokens allowed next into ``row`` (int32 [`bitmask_width`], C-contiguous)."""
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False (the grammar then rejects everything) when it was not
        allowed."""
        return self._matcher.consume_token(token_id)

    @property
    def error(self) -> str:
        """Why the grammar stopped accepting tokens ('' while it has not)."""
        return self._matcher.get_error()


class GrammarCompiler:
    """Compiles `StructuredOutputsParams` into `Grammar`s for one tokenizer.

    Args:
        tokenizer: a transformers fast tokenizer (``PreTrainedTokenizerFast``).
        vocab_size: the model's vocabulary (the logits' width, which may exceed the tokenizer's).
        eos_token_ids: the tokens that end a sequence; a complete grammar allows only these.

    The tokenizer's byte-level view takes about a second to build for a 50k vocabulary, so it is
    built on the first constrained request and kept.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer = None

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """A `Grammar` at its start. ValueError naming the constraint when it does not compile."""
        import llguidance

        kind, spec = params.constraint
        try:
            grammar = _llguidance_grammar(kind, spec, params)
        except ValueError as err:
            raise ValueError(f"structured_outputs {kind} is not valid: {err}") from err
        tokenizer = self._llguidance_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ValueError(f"structured_outputs {kind} is not valid: {messages[0]}")
        return Grammar(llguidance.LLMatcher(tokenizer, grammar, log_level=0))

    def _llguidance_tokenizer(self):
        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_size,
                                                              eos_token=self._eos_token_ids)
        return self._ll_tokenizer


def _llguidance_grammar(kind: str, spec, params: StructuredOutputsParams) -> str:
    """llguidance's grammar text for one constraint (vLLM's options: whitespace, extra properties)."""
    import llguidance

    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else spec
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise ValueError(f"the schema is not JSON: {err}") from None
        if params.disable_additional_properties:
            schema = _without_additional_properties(schema)
        options = {"whitespace_flexible": not params.disable_any_whitespace}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(spec))
    return llguidance.grammar_from("grammar", spec)


def _without_additional_properties(schema):
    """``schema`` with ``additionalProperties: false`` on every object that does not set it."""
    if isinstance(schema, list):
        return [_without_additional_properties(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _without_additional_properties(value) for key, value in schema.items()}
    if result.get("type") == "object" or "properties" in result:
        result.setdefault("additionalProperties", False)
    return result
