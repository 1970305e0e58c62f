"""Tool-call parsers for `tool_choice: "auto"`: a model's own tool-call syntax in its reply, turned
into OpenAI's `tool_calls`.

Under "auto" the model writes what it likes; a model trained for tools marks a call in a syntax of
its family, and the server finds the calls in the finished text (`jpaged serve
--enable-auto-tool-choice --tool-call-parser NAME`, vLLM's flags and parser names):

- `hermes` (Hermes 2 Pro, Qwen 2.5 and 3, and many others): each call a JSON object
  `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>` (the last may be
  left open at the end of the reply); the text before the first `<tool_call>` is the reply's
  content, and text between and after the calls is dropped (as vLLM finds every marked call).
- `llama3_json` (Llama 3.1 / 3.2 with JSON tool calling): the whole reply is one JSON object
  `{"name": ..., "parameters": {...}}` (or several, separated by `;`), optionally after
  `<|python_tag|>`; no content.
- `mistral` (Mistral 7B v0.3, Mixtral, Mistral Small / Large, Ministral): the content, then the
  `[TOOL_CALLS]` token and either a JSON array of `{"name": ..., "arguments": {...}}` (the older
  tokenizers; text after it is dropped) or, once per call, `[TOOL_CALLS]name[ARGS]{...}` (tokenizer v11 and later; also
  `name{...}` and `name[CALL_ID]id[ARGS]{...}`). The markers are special tokens, so replies under
  "auto" keep special tokens in their text (`skip_special_tokens` false), and call ids (under any
  tool choice) are 9 letters and digits, the form Mistral's chat templates accept when the calls
  come back.
- `pythonic` (Llama 3.2 and 4 with their Python-style tool calling, ToolACE and others): the
  whole reply is a Python list of calls with keyword arguments, `[get_weather(city="Paris"),
  get_time()]`, optionally between `<|python_start|>` and `<|python_end|>`; each argument a Python
  literal that JSON can hold (strings, numbers, booleans, None, and lists and dicts of them),
  read with Python's own `ast.literal_eval`, never evaluated; no content.
- `granite` (IBM Granite 3.x): the whole reply is `<|tool_call|>` (`<tool_call>` in Granite 3.0)
  and a JSON array of `{"name": ..., "arguments": {...}}`; no content.
- `phi4_mini_json` (Phi-4-mini): the content, then `functools` and a JSON array of calls (text
  after the array is dropped).
- `qwen3_coder` (Qwen3-Coder, and Qwen3 models prompted in its style): the content, then per call
  `<tool_call>`, `<function=NAME>`, one `<parameter=KEY>` VALUE `</parameter>` per argument,
  `</function>` and `</tool_call>` (the last tags may be missing at the end of the reply). A
  value is text (one newline after its opening tag and one before its closing tag are
  framing); it is read by the type the request's tool schema gives that parameter, as vLLM
  reads it: text for strings (and for parameters the schema does not name), `int` for integers,
  a number for numbers (an integer where the text has no point or exponent), `true` / `false`
  for booleans, JSON (else a Python literal, else the text) for objects, arrays and the rest;
  `null` is null.

A reply whose marked calls are not all JSON objects with a non-empty name and object arguments
(`arguments`, or `parameters`, either as an object or as JSON text of one), or for `pythonic` not
a list of calls with literal keyword arguments, is plain content, as in vLLM; so is one whose
arguments hold NaN or Infinity (not JSON), or that is too deep or long for Python's JSON and AST
readers. Arguments come back written by `json.dumps`, whatever the model's spacing. Names are not
checked against the request's tools, nor is `parallel_tool_calls`: the reply is what the model
wrote. While a reply streams, `held_from` says where the text may start a call: content is sent
up to there, and the rest waits for the finished text.

Plain Python: no jax.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
import string
from dataclasses import dataclass


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


class ToolParser:
    """One model family's tool-call syntax."""

    name = ""
    keeps_special_tokens = False  # whether the syntax's markers are special tokens the reply must keep

    def parse(self, text: str, tools: list[dict] | None = None) -> tuple[str | None, list[ParsedCall]]:
        """The content and the calls of a finished reply; `(text, [])` when it makes no call, or
        when its calls cannot be read (malformed, or too deep or long for Python's JSON and AST
        readers). `tools`: the request's function definitions (OpenAI's `{"type": "function",
        "function": {...}}`), for syntaxes whose argument values are read by their schema."""
        try:
            return self._parse(text, tools or [])
        except (ValueError, SyntaxError, RecursionError, MemoryError):  # json's errors are ValueErrors
            return text, []

    def _parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[ParsedCall]]:
        raise NotImplementedError

    def held_from(self, text: str) -> int:
        """Where, in a reply still being written, a tool call may have begun (len(text) if nowhere):
        text before it can be streamed as content."""
        raise NotImplementedError

    def call_id(self) -> str | None:
        """A new call's id in the form the family's chat templates take back; None: the server's own."""
        return None


def _call(value) -> ParsedCall | None:
    """A call from one decoded JSON value: `{"name": <a non-empty string>, "arguments" (or
    "parameters"): <an object, or JSON text of one>}`, its arguments written again by `json.dumps`;
    None for anything else. ValueError for arguments that are not JSON (NaN, Infinity)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value["arguments"] if "arguments" in value else value.get("parameters", {})
    if isinstance(arguments, str):  # some models write the arguments as JSON text already
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False, allow_nan=False))


def _partial_marker_start(text: str, marker: str) -> int:
    """Where `text` ends with a proper prefix of `marker` (len(text) if it does not)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return len(text) - size
    return len(text)


class _MarkedToolParser(ToolParser):
    """A syntax whose calls follow a marker, `START`: the text before the first one is content."""

    START = ""

    def _parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[ParsedCall]]:
        start = text.find(self.START)
        calls = self._calls(text[start + len(self.START):].lstrip()) if start >= 0 else []
        if not calls or None in calls:
            return text, []
        return text[:start] or None, calls

    def _calls(self, rest: str) -> list[ParsedCall | None]:
        """The calls in `rest`, the text after the first marker; none, or a None among them, when
        the reply does not hold calls in this syntax."""
        raise NotImplementedError

    def held_from(self, text: str) -> int:
        start = text.find(self.START)
        return start if start >= 0 else _partial_marker_start(text, self.START)


class HermesToolParser(_MarkedToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def _calls(self, rest: str) -> list[ParsedCall | None]:
        decoder, calls = json.JSONDecoder(), []
        while True:  # each call's JSON, then its end tag (the last may lack it); text between calls is dropped
            value, end = decoder.raw_decode(rest)
            call, rest = _call(value), rest[end:].lstrip()
            if call is None or rest and not rest.startswith(self.END):
                return [None]
            calls.append(call)
            following = rest.find(self.START)
            if following < 0:
                return calls
            rest = rest[following + len(self.START):].lstrip()


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    def _parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[ParsedCall]]:
        rest = text.strip().removeprefix(self.PYTHON_TAG).lstrip()
        if not rest.startswith("{"):
            return text, []
        decoder, calls = json.JSONDecoder(), []
        while rest:
            value, end = decoder.raw_decode(rest)
            call = _call(value)
            if call is None:
                return text, []
            calls.append(call)
            rest = rest[end:].lstrip()
            if rest and not rest.startswith(";"):
                return text, []
            rest = rest[1:].lstrip()
        return None, calls

    def held_from(self, text: str) -> int:
        body = text.lstrip()
        return 0 if body.startswith(("{", self.PYTHON_TAG)) or self.PYTHON_TAG.startswith(body) else len(text)


class MistralToolParser(_MarkedToolParser):
    name = "mistral"
    keeps_special_tokens = True
    START = "[TOOL_CALLS]"
    ARGS, CALL_ID = "[ARGS]", "[CALL_ID]"

    def _calls(self, rest: str) -> list[ParsedCall | None]:
        decoder = json.JSONDecoder()
        if rest.startswith(("[", "{")):  # the older syntax: one JSON array of calls (text after it is dropped)
            value = decoder.raw_decode(rest)[0]
            return [_call(item) for item in value] if isinstance(value, list) else [_call(value)]
        calls = []
        while rest:  # v11: name[ARGS]{...}, name{...} or name[CALL_ID]id[ARGS]{...}, each after the marker
            brace = rest.find("{")
            value, end = decoder.raw_decode(rest, brace) if brace > 0 else (None, 0)
            name = self._name(rest[:brace])
            calls.append(_call({"name": name, "arguments": value}) if name and value is not None else None)
            rest = rest[end:].lstrip()
            if not rest.startswith(self.START) and rest or None in calls:
                return [None]
            rest = rest.removeprefix(self.START).lstrip()
        return calls

    def call_id(self) -> str:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def _name(self, head: str) -> str | None:
        """The function name of a v11 call's head (`name`, `name[ARGS]`, `name[CALL_ID]id[ARGS]`)."""
        name, marker, call_id = head.partition(self.CALL_ID)
        name = name.removesuffix(self.ARGS).strip() if not marker else name.strip()
        if marker and not call_id.endswith(self.ARGS):
            return None
        return name if name and not any(c.isspace() or c in "[]{}" for c in name) else None


class PythonicToolParser(ToolParser):
    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"

    def _parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip().removeprefix(self.START).removesuffix(self.END).strip()
        if not (body.startswith("[") and body.endswith("]")):
            return text, []
        tree = ast.parse(body, mode="eval").body
        calls = [_pythonic_call(node) for node in tree.elts] if isinstance(tree, ast.List) else []
        if not calls or None in calls:
            return text, []
        return None, calls

    def held_from(self, text: str) -> int:
        body = text.lstrip()
        return 0 if body.startswith(("[", self.START)) or self.START.startswith(body) else len(text)


def _pythonic_call(node: ast.expr) -> ParsedCall | None:
    """A call from `name(keyword=<literal>, ...)`; None for anything else (positional or `**`
    arguments, a keyword given twice, a dotted or computed name, a value that is not a literal
    JSON can hold)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
        return None
    names = [keyword.arg for keyword in node.keywords]
    if None in names or len(set(names)) < len(names):  # ast.parse lets a repeated keyword through
        return None
    try:
        arguments = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
        return ParsedCall(node.func.id, json.dumps(arguments, ensure_ascii=False, allow_nan=False))
    except (ValueError, TypeError, SyntaxError, RecursionError):  # not a literal, or one JSON cannot hold
        return None


class GraniteToolParser(ToolParser):
    name = "granite"
    MARKERS = ("<|tool_call|>", "<tool_call>")  # Granite 3.1 and later, then 3.0

    def _parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip()
        body = next((body[len(m):].lstrip() for m in self.MARKERS if body.startswith(m)), body)
        if not body.startswith("["):
            return text, []
        value = json.loads(body)
        calls = [_call(item) for item in value] if isinstance(value, list) else []
        if not calls or None in calls:
            return text, []
        return None, calls

    def held_from(self, text: str) -> int:
        body = text.lstrip()
        starts = body.startswith(("[", *self.MARKERS)) or any(m.startswith(body) for m in self.MARKERS)
        return 0 if starts else len(text)


class Phi4MiniJsonToolParser(_MarkedToolParser):
    name = "phi4_mini_json"
    START = "functools"

    def _calls(self, rest: str) -> list[ParsedCall | None]:
        if not rest.startswith("["):
            return [None]
        value = json.JSONDecoder().raw_decode(rest)[0]  # text after the array is dropped
        return [_call(item) for item in value] if isinstance(value, list) else [None]


class Qwen3CoderToolParser(ToolParser):
    name = "qwen3_coder"
    START, FUNCTION = "<tool_call>", "<function="
    FUNCTIONS = re.compile(r"<function=([^>\n]*)>(.*?)(?:</function>|$)", re.DOTALL)
    PARAMETERS = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)

    def _parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[ParsedCall]]:
        start = self._start(text)
        if start == len(text):
            return text, []
        calls, properties_of = [], _properties(tools)
        for match in self.FUNCTIONS.finditer(text, start):
            name = match.group(1).strip()
            if not name:
                return text, []
            properties = properties_of.get(name, {})
            arguments = {key.strip(): _typed(_unframed(value), properties.get(key.strip()))
                         for key, value in self.PARAMETERS.findall(match.group(2))}
            calls.append(ParsedCall(name, json.dumps(arguments, ensure_ascii=False, allow_nan=False)))
        if not calls:
            return text, []
        return text[:start] or None, calls

    def _start(self, text: str) -> int:
        """Where the first call begins: its `<tool_call>`, or a `<function=` written without one."""
        found = [i for i in (text.find(self.START), text.find(self.FUNCTION)) if i >= 0]
        return min(found, default=len(text))

    def held_from(self, text: str) -> int:
        start = self._start(text)
        if start < len(text):
            return start
        return min(_partial_marker_start(text, self.START), _partial_marker_start(text, self.FUNCTION))


def _properties(tools: list) -> dict[str, dict]:
    """Each tool's parameter schemas by name (`{function name: {parameter: schema}}`), from the
    request's tools as they come: entries, schemas or properties that are not objects are skipped
    (their values are then read as text)."""
    found = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        parameters = function.get("parameters") if isinstance(function, dict) else None
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if isinstance(properties, dict):
            found[function.get("name")] = properties
    return found


def _unframed(value: str) -> str:
    """A parameter's text without the newline after its opening tag and the one before its closing tag."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


_INTEGER = re.compile(r"\s*[+-]?\d+\s*")
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*|\s*[+-]?(nan|inf|infinity)\s*", re.IGNORECASE)


def _number(value: str, kind: type):
    """`value` read as a `kind` number (digits as JSON writes them, and for floats NaN and
    infinities, which the caller refuses), or the text itself where it is not one."""
    return kind(value) if (_INTEGER if kind is int else _NUMBER).fullmatch(value) else value


def _typed(value: str, schema: dict | None):
    """A `qwen3_coder` parameter's text as the JSON value its schema's type says (see the module
    docstring); ValueError for a number JSON cannot hold."""
    if not isinstance(schema, dict):  # no schema, or one that says nothing of a type (JSON Schema's `true`)
        return value
    kind = str(schema.get("type", "string")).lower()
    if kind in ("string", "str", "text", "varchar", "char", "enum"):
        return value
    if value.lower() == "null":
        return None
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        return _number(value, int)
    if kind.startswith(("num", "float", "double")):
        number = _number(value, float)
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"{value!r} is not a JSON number")
        return _number(value, int) if isinstance(number, float) and not any(c in value for c in ".eE") else number
    if kind.startswith("bool"):
        return value.strip().lower() == "true"
    try:
        return json.loads(value)
    except ValueError:
        try:
            parsed = ast.literal_eval(value)
            json.dumps(parsed, allow_nan=False)
            return parsed
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return value


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser,
                                       GraniteToolParser, Phi4MiniJsonToolParser, Qwen3CoderToolParser)}


def tool_parser(name: str) -> ToolParser:
    """The parser named `name`; ValueError naming the known ones otherwise."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()
