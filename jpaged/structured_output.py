"""Structured outputs: grammars that decide which tokens a request may generate next.

Host side, between the engine and the sampler. When a request with
``SamplingParams.structured_outputs`` is added, `GrammarCompiler` turns its constraint (a JSON
schema, any JSON object, a regular expression, a choice of strings, or a Lark / GBNF grammar) into
a `Grammar` (a structural tag: free text whose tagged segments follow a schema); every sequence of the request holds its own copy. Before a step samples a sequence,
`jpaged/step_batch.py` asks its grammar for the next token bitmask (one bit per vocabulary entry;
with draft tokens, one after each draft too);
the sampler (`jpaged/sampler.py`) sets the logits of every token whose bit is clear to -inf, first
of all, so raw logprobs see the constraint as in vLLM. After the step the engine feeds each
sampled token back (`Grammar.accept`).

The matching itself is llguidance's (the engine behind vLLM's ``guidance`` backend): an Earley
parser over the tokenizer's byte-level vocabulary. Once a grammar is complete it allows only the
EOS tokens, so a constrained request ends as the grammar does.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jpaged.sampling_params import StructuredOutputsParams

def bitmask_width(vocab_size: int) -> int:
    """int32 words of one row's token bitmask: bit ``t % 32`` of word ``t // 32`` is token t."""
    return (vocab_size + 31) // 32


class Grammar:
    """One sequence's place in its grammar (an llguidance ``LLMatcher``). With ``starts_after`` (a
    token id: a reasoning model's end of thinking, see `jpaged.reasoning`), every token is allowed
    until that token has been generated, and the grammar applies from the next one."""

    def __init__(self, matcher, starts_after: int | None = None):
        self._matcher = matcher
        self.starts_after = starts_after

    def copy(self) -> Grammar:
        """An independent grammar in the same state (a request's other samples)."""
        return Grammar(self._matcher.deep_copy(), self.starts_after)

    def fill_bitmasks(self, rows: list[np.ndarray], drafts: list[int]) -> None:
        """Write into ``rows[i]`` (int32 [`bitmask_width`], C-contiguous) the tokens allowed after
        ``drafts[:i]`` (one row more than drafts, which the grammar must allow, see
        `valid_prefix`), and leave the grammar where it was."""
        start = 0  # the rows from `start` on are under the grammar
        if self.starts_after is not None:
            start = drafts.index(self.starts_after) + 1 if self.starts_after in drafts else len(rows)
        for row in rows[:start]:
            row.fill(-1)
        consumed = 0
        for i in range(start, len(rows)):
            if i > start:
                self._matcher.consume_token(drafts[i - 1])
                consumed += 1
            self._matcher.unsafe_compute_mask_ptr(rows[i].ctypes.data, rows[i].nbytes)
        self._matcher.rollback(consumed)

    def valid_prefix(self, drafts: list[int]) -> int:
        """How many of ``drafts``, from the first, the grammar allows in turn (it is not advanced)."""
        start = 0
        if self.starts_after is not None:
            if self.starts_after not in drafts:
                return len(drafts)
            start = drafts.index(self.starts_after) + 1
        return start + self._matcher.validate_tokens(drafts[start:])

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False (the grammar then rejects everything) when it was not
        allowed."""
        if self.starts_after is not None:
            if token_id == self.starts_after:
                self.starts_after = None
            return True
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
        tokenizer, limits = self._llguidance_tokenizer(), llguidance.LLParserLimits(verbose_errors=False)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer, limits=limits)
        if is_error:
            raise ValueError(f"structured_outputs {kind} is not valid: {messages[0]}")
        return Grammar(llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits))

    def _llguidance_tokenizer(self):
        if self._ll_tokenizer is None:
            import llguidance

            self._ll_tokenizer = llguidance.LLTokenizer(_with_text_added_tokens(self._tokenizer),
                                                        n_vocab=self._vocab_size, eos_token=self._eos_token_ids)
        return self._ll_tokenizer


def _with_text_added_tokens(tokenizer) -> str:
    """The tokenizer's JSON for llguidance, its added tokens that are not special (Qwen's `<think>`,
    `<tool_call>`) moved into the model's vocabulary: llguidance takes every added token for a
    special one, which no text matches, so a constraint whose text holds `<think>` would reject the
    very token that writes it. Only tokens of plain ASCII without spaces move (their vocabulary
    entry is their text in byte-level and SentencePiece vocabularies alike), and only into a
    vocabulary that maps tokens to ids."""
    backend = copy.copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    spec = json.loads(backend.to_str())
    vocab = spec.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        textual = [token for token in spec.get("added_tokens", [])
                   if not token.get("special") and token["content"].isascii() and token["content"].isprintable()
                   and " " not in token["content"]]
        for token in textual:
            vocab.setdefault(token["content"], token["id"])
        spec["added_tokens"] = [token for token in spec.get("added_tokens", []) if token not in textual]
    return json.dumps(spec)


def _llguidance_grammar(kind: str, spec, params: StructuredOutputsParams) -> str:
    """llguidance's grammar text for one constraint (vLLM's options: whitespace, extra properties)."""
    import llguidance

    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else _json_schema(spec)
        if params.disable_additional_properties:
            schema = map_schema(schema, _closed)
        options = {"whitespace_flexible": not params.disable_any_whitespace}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":  # one regex, not a grammar rule of many alternatives (the parser caps those at 2,000)
        return llguidance.LLMatcher.grammar_from_regex("|".join(_escaped(choice) for choice in spec))
    if kind == "structural_tag":
        return llguidance.StructTag.to_grammar(_struct_tags(spec))
    return llguidance.grammar_from("grammar", spec)


def _struct_tags(spec: str) -> list:
    """llguidance `StructTag`s of a structural tag's JSON text (vLLM's `structural_tag` layout:
    `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`), each with the trigger its
    `begin` starts with. ValueError naming what is missing or wrong."""
    import llguidance

    try:
        tag = json.loads(spec)
    except json.JSONDecodeError as err:
        raise ValueError(f"it is not JSON: {err}") from None
    if not isinstance(tag, dict):
        raise ValueError(f"it must be a JSON object of 'triggers' and 'structures', got {spec:.200}")
    if unknown := sorted(set(tag) - {"type", "triggers", "structures"}):
        raise ValueError(f"keys {unknown} are not among 'type', 'triggers' and 'structures' (the layout of vLLM's "
                         "structural_tag response format)")
    triggers = tag.get("triggers")
    structures = tag.get("structures")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError(f"'triggers' must be a list of non-empty strings, got {triggers!r:.200}")
    if not isinstance(structures, list) or not structures:
        raise ValueError(f"'structures' must be a non-empty list of {{'begin', 'schema', 'end'}}, got {structures!r:.200}")
    tags = []
    for i, structure in enumerate(structures):
        if not isinstance(structure, dict) or not all(isinstance(structure.get(key), str) for key in ("begin", "end")):
            raise ValueError(f"structures[{i}] must hold 'begin' and 'end' strings, got {structure!r:.200}")
        begin = structure["begin"]
        trigger = next((t for t in triggers if begin.startswith(t)), None)
        if trigger is None:
            raise ValueError(f"structures[{i}] begin {begin!r} starts with none of the triggers {triggers}")
        schema = _json_schema(structure.get("schema", True))
        tags.append(llguidance.StructTag(trigger=trigger, begin=begin, grammar=schema, end=structure["end"]))
    return tags


def _json_schema(spec) -> dict:
    """A schema given as a dict, its JSON text, or a boolean (true: any JSON value) as a dict."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"the schema is not JSON: {err}") from None
    if spec is True:
        return {}
    if not isinstance(spec, dict):
        raise ValueError(f"a schema must be a JSON object or true, got {json.dumps(spec)[:100]}")
    return spec


_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def _escaped(text: str) -> str:
    """``text`` as a regex (Rust ``regex`` syntax) that matches exactly it."""
    return "".join("\\" + char if char in _REGEX_META else char for char in text)


_SUBSCHEMA = ("items", "additionalItems", "additionalProperties", "contains", "not", "if", "then", "else",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def map_schema(schema, fn):
    """A copy of a JSON schema with ``fn`` applied to each (sub)schema object, innermost first.
    Only schema positions are visited (``properties`` values, ``items``, ``anyOf`` members, ``$defs``
    ...), never data such as ``const``, ``enum`` or ``default`` values."""
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(result.get(key), dict):
            result[key] = map_schema(result[key], fn)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(result.get(key), list):
            result[key] = [map_schema(item, fn) for item in result[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(result.get(key), dict):
            result[key] = {name: map_schema(sub, fn) for name, sub in result[key].items()}
    return fn(result)


def _closed(schema: dict) -> dict:
    """An object schema with ``additionalProperties: false`` unless it says otherwise."""
    if schema.get("type") == "object" or "properties" in schema:
        return {"additionalProperties": False, **schema}
    return schema
