"""Function calling in chat completions: OpenAI's `tools` and `tool_choice`, through structured outputs.

The request's tools reach the chat template (`tools=`, as HF templates take them), so a model
trained for tools sees their definitions. What the reply may be follows `tool_choice`:

- `"none"`, or no tools: a plain reply.
- `"required"`: the output is constrained to a JSON array of calls, each exactly
  `{"name": <a tool's name>, "parameters": <its arguments>}` (the shape vLLM uses), and the reply
  carries them as `tool_calls` (arguments as JSON text) with finish reason "tool_calls";
  `parallel_tool_calls: false` makes it exactly one call.
- `{"type": "function", "function": {"name": ...}}`: the output is that function's arguments,
  constrained to its parameters' schema; one tool call, finish reason "stop" (as OpenAI's forced
  calls).
- `"auto"` (OpenAI's default when tools are sent): the model writes what it likes, and the server
  finds the calls in its reply with the tool-call parser of the model's family
  (`tool_parsers`, chosen with `jpaged serve --enable-auto-tool-choice --tool-call-parser NAME`);
  the text before them is the content, and finish reason "tool_calls" when there are calls.
  Without a parser this is a 400 that says which choices work.

Plain Python: no jax.
"""

from __future__ import annotations

import json

from jpaged.server.errors import bad_request
from jpaged.server.protocol import ChatCompletionRequest, FunctionCall, TokenizeRequest, ToolCall
from jpaged.server.tool_parsers import TOOL_PARSERS, ToolParser
from jpaged.structured_output import map_schema

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_schema(request: ChatCompletionRequest, parser: ToolParser | None) -> dict | None:
    """The JSON schema the reply must follow under the request's `tool_choice`, or None for a free
    reply (no tools, "none", or "auto" read by `parser`). 400 naming `tool_choice` for "auto"
    without a parser, a named function that is not among the tools, or a choice without tools."""
    choice, tools = request.tool_choice, request.tools or []
    if choice is None and not tools or choice == "none":
        return None
    if not tools:
        raise bad_request(f"tool_choice {choice!r} needs tools", param="tool_choice")
    names = [tool.function.name for tool in tools]
    if len(set(names)) < len(names):
        raise bad_request(f"tools must have distinct names, got {names}", param="tools")
    if choice is None or choice == "auto":
        if parser is None:
            raise bad_request('tool_choice "auto" (the default when tools are sent) needs a parser of the model\'s '
                              'tool-call syntax: start the server with --enable-auto-tool-choice --tool-call-parser '
                              f'({", ".join(TOOL_PARSERS)}), or send tool_choice "required", "none" or '
                              '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        return None
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                                   "parameters": {"$ref": f"#/$defs/tool_{i}"}},
                  "required": ["name", "parameters"], "additionalProperties": False} for i, tool in enumerate(tools)]
        parameters = {f"tool_{i}": _moved(tool.function.parameters or NO_PARAMETERS, f"#/$defs/tool_{i}")
                      for i, tool in enumerate(tools)}
        limit = {} if request.parallel_tool_calls else {"maxItems": 1}
        return {"type": "array", "minItems": 1, **limit, "items": {"anyOf": calls}, "$defs": parameters}
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    chosen = [tool for tool in tools if tool.function.name == name]
    if choice.get("type") != "function" or not chosen:
        raise bad_request(f"tool_choice {choice!r} names no function among the tools "
                          f"({', '.join(tool.function.name for tool in tools)})", param="tool_choice")
    return chosen[0].function.parameters or NO_PARAMETERS


def _moved(schema: dict, place: str) -> dict:
    """A tool's parameters schema to be placed at `place` (a JSON pointer) in a larger schema: its
    local `$ref`s ("#/$defs/Location", "#") rewritten to point inside it there."""
    def relocate(sub: dict) -> dict:
        ref = sub.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            return {**sub, "$ref": place + ref[1:]}
        return sub

    return map_schema(schema, relocate)


def forces_tool_calls(request: ChatCompletionRequest) -> bool:
    """Whether the reply is tool calls: a required or named `tool_choice` (one `tool_schema` has
    accepted; it alone builds the schema)."""
    return request.tool_choice == "required" or isinstance(request.tool_choice, dict)


def parses_tool_calls(request: ChatCompletionRequest) -> bool:
    """Whether the reply may hold calls in the model's own syntax: tools under "auto" (explicit or
    by default), which `tool_schema` accepts only where the server has a parser."""
    return bool(request.tools) and request.tool_choice in (None, "auto")


def names_one_call(request: ChatCompletionRequest) -> bool:
    """Whether the reply is the arguments of one named function (`tool_choice` names it), so
    that they can be streamed as they are generated."""
    return isinstance(request.tool_choice, dict)


def reply(request: ChatCompletionRequest, text: str, parser: ToolParser | None) -> tuple[str | None, list[ToolCall]]:
    """The content and the tool calls of a finished reply. Under a required or named
    `tool_choice`, no content and the calls, or the text as content and no calls where it is not
    complete JSON (cut by `max_tokens`); under "auto", what `parser` finds. A named function's
    arguments are the reply's text as it is (vLLM's); other calls' are written by `json.dumps`."""
    if parses_tool_calls(request) and parser is not None:
        content, calls = parser.parse(text, [tool.model_dump() for tool in request.tools or ()])
        return content, [_tool_call(call.name, call.arguments, parser) for call in calls]
    if not forces_tool_calls(request):
        return text, []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text, []
    if request.tool_choice == "required":
        return None, [_tool_call(call["name"], _json(call["parameters"]), parser) for call in value]
    return None, [_tool_call(request.tool_choice["function"]["name"], text, parser)]


def _tool_call(name: str, arguments: str, parser: ToolParser | None) -> ToolCall:
    """A call with an id in the form `parser`'s model family takes back, or the server's own."""
    call_id = parser.call_id() if parser is not None else None
    return ToolCall(function=FunctionCall(name=name, arguments=arguments), **({"id": call_id} if call_id else {}))


def named_call(request: ChatCompletionRequest, parser: ToolParser | None) -> ToolCall:
    """The call a named `tool_choice` makes, with its id and no arguments yet (a stream's first)."""
    return _tool_call(request.tool_choice["function"]["name"], "", parser)


def streamable_text(request: ChatCompletionRequest, text: str, parser: ToolParser | None) -> str:
    """The part of an unfinished reply that can be streamed as content: none of it under a required
    or named `tool_choice`, the text before where a call may begin under "auto", else all."""
    if forces_tool_calls(request):
        return ""
    if parses_tool_calls(request) and parser is not None:
        return text[:parser.held_from(text)]
    return text


def _json(value) -> str:
    """Arguments as JSON text, written the same way under either tool choice (non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


def template_tools(request: ChatCompletionRequest | TokenizeRequest) -> list[dict] | None:
    """The request's tools as the chat template takes them (OpenAI's shape, as dicts)."""
    return [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
