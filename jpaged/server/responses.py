"""POST /v1/responses: OpenAI's Responses API, served by the chat path.

A request becomes a chat completion request (`chat_request`): `instructions` a leading system
message; `input` (a string, or a list of items: messages whose content is a string or
`input_text` / `output_text` / `input_image` parts, `function_call` items and the
`function_call_output` items that answer them) the messages; `max_output_tokens` the output budget; `text.format` the
`response_format`; flat function `tools` and `tool_choice` the chat's; other fields
(`temperature`, `top_p`, vLLM's extras) pass as they are. The chat path renders, checks and runs
it, and its reply comes back as output items: with a reasoning parser, a `reasoning` item with one
`reasoning_text` part (when the model thought), then a `message` with one `output_text` part (when the
reply has text, or makes no call), then a `function_call` item per tool call. The status is
"incomplete" (reason `max_output_tokens`) when the output ran out of tokens.

A stream sends OpenAI's typed events, numbered by `sequence_number`: `response.created`,
`response.in_progress`; for the reasoning `response.output_item.added`,
`response.content_part.added`, `response.reasoning_text.delta` as it arrives,
`response.reasoning_text.done`, `response.content_part.done`, `response.output_item.done`; for
the message `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta` as text arrives,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`; for each
call `response.output_item.added`, `response.function_call_arguments.delta` (the arguments
whole, as the chat path finds calls in the finished reply) and `.done`,
`response.output_item.done`; then `response.completed` (or `response.incomplete`) carrying the
whole response. Under a named `tool_choice` the call's arguments stream as they are generated
instead. A failure mid-stream is an `error` event. Nothing is stored and every request runs at
once: `previous_response_id`, `conversation`, `prompt` (stored templates) and `background` are
refused.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from jpaged.outputs import RequestOutput
from jpaged.server.async_engine import RequestGroup
from jpaged.server.chat import chat_request_input
from jpaged.server.errors import APIError, bad_request
from jpaged.server.params import constraint_field
from jpaged.server.protocol import ChatCompletionRequest, ResponsesRequest, ToolCall
from jpaged.server.serving import ChoiceProgress, ServerState, collect, failed, submit
from jpaged.server.tools import named_call, names_one_call, reply, streamable_text

# chat request fields a Responses request names otherwise, or that have no meaning here
_CHAT_ONLY = ("messages", "max_tokens", "max_completion_tokens", "response_format", "n", "best_of", "logprobs",
              "echo", "use_beam_search")
_STATEFUL = ("previous_response_id", "conversation", "prompt", "background")  # need kept state or a queue
_RENAMED = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text"}
_MAX_METADATA_KEYS = 16  # OpenAI's limit
_TEXT_PARTS = ("input_text", "output_text", "text")


async def create_response(body: ResponsesRequest, state: ServerState) -> JSONResponse | AsyncIterator[str]:
    """Serve a Responses request: a response body, or (with `stream`) an iterator of SSE events.
    Raises APIError for bad input (400) or a full server (503)."""
    model = state.model(body.model)
    request = chat_request(body)
    try:
        prompt, params = await chat_request_input(request, state)
        response = _Response(body, request, model, params.temperature, params.top_p,
                             state.thinking(request, prompt.token_ids))
        group = await submit(state, response.id, [prompt], [params], request.priority, constraint_field(request),
                             model=model)
    except APIError as err:
        err.param = _RENAMED.get(err.param, err.param)
        for chat_name, name in (("max_completion_tokens", "max_output_tokens"), ("response_format", "text.format")):
            err.message = err.message.replace(chat_name, name)
        raise
    if body.stream:
        return _stream(response, state, group)
    (output,) = await collect(group)
    choice = output.outputs[0]
    reasoning, answer = state.split_reply(choice.text, response.thinking)
    content, calls = reply(request, answer, state.tool_parser)
    status = _item_status(output)
    items = [_reasoning_item(response.reasoning_id, reasoning, status)] if reasoning else []
    items += ([_message_item(response.message_id, content or "", status)] if content or not calls else [])
    items += [_call_item(call, status=status) for call in calls]
    return JSONResponse(response.body(output, items, state.reasoning_tokens(choice, response.thinking)))


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request that serves `body`. Raises APIError 400 naming the field of
    `body` that cannot be served."""
    extra = {key: value for key, value in (body.model_extra or {}).items() if key != "stream_options"}
    if stateful := [name for name in _STATEFUL if getattr(body, name, None) or extra.get(name)]:
        raise bad_request(f"{stateful[0]} is not supported: the server keeps no responses, conversations or "
                          "prompts and runs each request at once; send the conversation so far as input items",
                          param=stateful[0])
    if body.top_logprobs is not None or body.include:
        field = "top_logprobs" if body.top_logprobs is not None else "include"
        raise bad_request(f"{field} is not supported on /v1/responses (chat completions give logprobs)", param=field)
    if refused := [name for name in _CHAT_ONLY if name in extra]:
        raise bad_request(f"{refused[0]} is a chat completions field, not a Responses one", param=refused[0])
    if body.metadata is not None and len(body.metadata) > _MAX_METADATA_KEYS:
        raise bad_request(f"metadata has {len(body.metadata)} keys, more than the limit {_MAX_METADATA_KEYS}",
                          param="metadata")
    system = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    fields = {**extra, "messages": system + _messages(body.input), "max_completion_tokens": body.max_output_tokens,
              "tools": _tools(body.tools), "tool_choice": _tool_choice(body.tool_choice),
              "response_format": _response_format(body.text)}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        error = err.errors()[0]
        location = [str(part) for part in error.get("loc", ())]
        param = _RENAMED.get(location[0], location[0]) if location else None
        raise bad_request(f"{'.'.join(location) or 'body'}: {error.get('msg')}", param=param) from err


def _messages(items: str | list[dict[str, Any]]) -> list[dict]:
    """Chat messages from `input`: a string is one user message; a `function_call` item joins
    the assistant message before it (or starts one); a `function_call_output` is a tool message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise bad_request("input is an empty list: at least one item is needed", param="input")
    messages: list[dict] = []
    call_ids: set[str] = set()
    for i, item in enumerate(items):
        where, kind = f"input[{i}]", item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where} has role {role!r}; a message's role is user, system, developer or "
                                  "assistant", param="input")
            messages.append({"role": role, "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            call_ids.add(call["id"])
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "tool_calls": [call]})
        elif kind == "function_call_output":
            if (call_id := _string(item, "call_id", where)) not in call_ids:
                raise bad_request(f"{where} answers call_id {call_id!r}, which no earlier function_call item made",
                                  param="input")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _text(item.get("output"), where)})
        else:
            raise bad_request(f"{where} is of type {kind!r}; supported items are message, function_call and "
                              "function_call_output", param="input")
    return messages


def _content(content: Any, where: str) -> str | list[dict]:
    """A message's content for the chat template: its text (`_text`), or where it holds
    `input_image` parts, its parts as chat parts (each image an `image_url` part)."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "input_image"
                                                  for p in content):
        return _text(content, where)
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "input_image":
            parts.append({"type": "text", "text": _text([part], where)})
        elif isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            kind = "file_id, which needs stored files this server does not keep" if part.get("file_id") else "no image_url"
            raise bad_request(f"{where}.content[{j}] is an input_image part with {kind}: send the image as its "
                              "image_url (an http(s) or data URL)", param="input")
    return parts


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or its text parts joined by newlines (as chat parts are)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where} needs its content: a string or a list of input_text parts", param="input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise bad_request(f"{where}.content[{j}] is not a text part (type {kind!r}); only input_text, "
                              "output_text and input_image parts are supported", param="input")
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{j}] is a text part without its text", param="input")
        texts.append(part["text"])
    return "\n".join(texts)


def _string(item: dict, field: str, where: str) -> str:
    value = item.get(field)
    if not isinstance(value, str):
        raise bad_request(f"{where} needs `{field}` as a string, got {value!r:.100}", param="input")
    return value


def _tools(tools: list[dict] | None) -> list[dict] | None:
    """Flat function tools (`{"type": "function", "name", "parameters"}`) in the chat's shape."""
    if tools is None:
        return None
    chat_tools = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise bad_request(f"tools[{i}] is of type {tool.get('type')!r}; only function tools are supported",
                              param="tools")
        chat_tools.append({"type": "function", "function": {key: tool[key] for key in ("name", "description",
                                                                                         "parameters") if key in tool}})
    return chat_tools


def _tool_choice(choice: str | dict | None) -> str | dict | None:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict | None) -> dict | None:
    """`text.format` as the chat's `response_format` (None: plain text). A json_schema format
    needs its `name`, as OpenAI's does."""
    fmt = (text or {}).get("format")
    if fmt is None or fmt == {"type": "text"} or not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None if fmt is None or fmt == {"type": "text"} else fmt
    if not isinstance(fmt.get("name"), str) or not fmt["name"]:
        raise bad_request("text.format of type json_schema needs its name", param="text")
    return {"type": "json_schema", "json_schema": {key: fmt[key] for key in ("name", "schema", "strict") if key in fmt}}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _item_status(output: RequestOutput) -> str:
    """A finished output item's status: "incomplete" where `max_output_tokens` cut the reply."""
    return "incomplete" if output.outputs[0].finish_reason == "length" else "completed"


def _message_item(item_id: str, text: str | None, status: str) -> dict:
    """The reply's message item; `text` None: no content part yet (a stream's opening)."""
    content = [] if text is None else [_text_part(text)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _reasoning_item(item_id: str, text: str | None, status: str) -> dict:
    """The reply's reasoning item; `text` None: no content part yet (a stream's opening)."""
    content = [] if text is None else [_reasoning_part(text)]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def _reasoning_part(text: str) -> dict:
    return {"type": "reasoning_text", "text": text}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(call: ToolCall, arguments: str | None = None, status: str = "completed") -> dict:
    return {"id": "fc_" + call.id.rsplit("-", 1)[-1], "type": "function_call", "call_id": call.id,
            "name": call.function.name, "arguments": call.function.arguments if arguments is None else arguments,
            "status": status}


@dataclass
class _Response:
    """What a response says of its request, and its ids."""

    request: ResponsesRequest
    chat: ChatCompletionRequest
    model: str
    temperature: float
    top_p: float
    thinking: bool  # whether the reply starts in the model's thinking (`ServerState.thinking`)

    def __post_init__(self):
        self.id, self.message_id, self.created_at = _new_id("resp"), _new_id("msg"), int(time.time())
        self.reasoning_id = _new_id("rs")

    def body(self, output: RequestOutput | None, items: list[dict], reasoning_tokens: int = 0) -> dict:
        """The response object: in progress (`output` None), or finished with `items` (of whose
        output tokens `reasoning_tokens` were reasoning)."""
        request, status, usage, incomplete = self.request, "in_progress", None, None
        if output is not None:
            choice = output.outputs[0]
            status = "incomplete" if choice.finish_reason == "length" else "completed"
            incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
            prompt_tokens, completion_tokens = len(output.prompt_token_ids), len(choice.token_ids)
            usage = {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": output.num_cached_tokens,
                                                                            "cache_write_tokens": 0},
                     "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                     "total_tokens": prompt_tokens + completion_tokens}
        return {"id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
                "status": status, "output": items, "error": None, "incomplete_details": incomplete,
                "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
                "metadata": request.metadata or {}, "parallel_tool_calls": self.chat.parallel_tool_calls,
                "temperature": self.temperature, "top_p": self.top_p,
                "tool_choice": request.tool_choice or "auto",
                "tools": request.tools or [],
                "text": {**(request.text or {}), "format": (request.text or {}).get("format") or {"type": "text"}},
                "previous_response_id": None, "store": False, "truncation": "disabled", "usage": usage,
                "user": self.chat.user}


class _Events:
    """Server-sent events of a Responses stream, numbered in order."""

    def __init__(self):
        self.sequence_number = 0

    def __call__(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"


async def _stream(response: _Response, state: ServerState, group: RequestGroup) -> AsyncIterator[str]:
    """The response's events: its lifecycle around the output items' events (`_reply_events`, or
    `_argument_events` for a named function's call), or an `error` event if the engine fails."""
    event, outcome = _Events(), {}
    items = _argument_events if names_one_call(response.chat) else _reply_events
    try:
        yield event("response.created", response=response.body(None, []))
        yield event("response.in_progress", response=response.body(None, []))
        async for line in items(response, state, group, event, outcome):
            yield line
        final = outcome["final"]
        body = response.body(final, outcome["items"], state.reasoning_tokens(final.outputs[0], response.thinking))
        yield event("response.completed" if body["status"] == "completed" else "response.incomplete", response=body)
    except Exception as err:  # the engine failed mid-stream: tell the client, then end the stream
        error = failed(err)
        yield event("error", code=error.code or error.type, message=error.message, param=error.param)
    finally:
        group.close()


class _ReasoningEvents:
    """A stream's reasoning item (output index 0): opened by its first text, closed before the
    answer's first item or at the end."""

    def __init__(self, response: _Response, event: _Events):
        self.event, self.id, self.text, self.item = event, response.reasoning_id, "", None
        self.part = dict(item_id=self.id, output_index=0, content_index=0)

    def delta(self, reasoning: str | None) -> list[str]:
        new, self.text = (reasoning or "")[len(self.text):], reasoning or ""
        if not new:
            return []
        opening = [] if len(self.text) > len(new) else [
            self.event("response.output_item.added", output_index=0, item=_reasoning_item(self.id, None, "in_progress")),
            self.event("response.content_part.added", **self.part, part=_reasoning_part(""))]
        return [*opening, self.event("response.reasoning_text.delta", **self.part, delta=new)]

    def close(self, status: str, items: list[dict]) -> list[str]:
        """The closing events (once, where the item opened); the item joins `items`."""
        if not self.text or self.item is not None:
            return []
        self.item = _reasoning_item(self.id, self.text, status)
        items.append(self.item)
        return [self.event("response.reasoning_text.done", **self.part, text=self.text),
                self.event("response.content_part.done", **self.part, part=_reasoning_part(self.text)),
                self.event("response.output_item.done", output_index=0, item=self.item)]


async def _reply_events(response: _Response, state: ServerState, group: RequestGroup, event: _Events,
                        outcome: dict) -> AsyncIterator[str]:
    """The reasoning's events as it arrives, the message's as its text arrives (held back where a
    call may begin, as chat streams hold it), then each call's, whole; `outcome` gets the final
    output and the items."""
    sent, opened, final, calls, items = ChoiceProgress(), False, None, [], []
    thought = _ReasoningEvents(response, event)
    message = dict(item_id=response.message_id, output_index=0, content_index=0)

    def open_message() -> list[str]:
        message["output_index"] = len(items)
        return [event("response.output_item.added", output_index=len(items),
                      item=_message_item(response.message_id, None, "in_progress")),
                event("response.content_part.added", **message, part=_text_part(""))]

    async for _, output in group:
        final, choice = output, output.outputs[0]
        reasoning, answer = state.split_reply(choice.text, response.thinking)
        for line in thought.delta(reasoning):
            yield line
        if choice.finished():
            content, calls = reply(response.chat, answer, state.tool_parser)
            text = sent.new_text(content or "") if calls else sent.new_text(answer)
        else:
            streamable = streamable_text(response.chat, answer, state.tool_parser)
            text = sent.new_text(streamable) if len(streamable) > len(sent.text_sent) else ""
        if text:
            if not opened:
                for line in [*thought.close("completed", items), *open_message()]:
                    yield line
                opened = True
            yield event("response.output_text.delta", **message, delta=text, logprobs=[])
    status = _item_status(final)
    for line in thought.close(status, items):
        yield line
    if opened or not calls:
        if not opened:
            for opening in open_message():
                yield opening
        items.append(_message_item(response.message_id, sent.text_sent, status))
        yield event("response.output_text.done", **message, text=sent.text_sent, logprobs=[])
        yield event("response.content_part.done", **message, part=_text_part(sent.text_sent))
        yield event("response.output_item.done", output_index=message["output_index"], item=items[-1])
    for call in calls:
        index, item = len(items), _call_item(call, status=status)
        items.append(item)
        yield event("response.output_item.added", output_index=index, item=_call_item(call, "", "in_progress"))
        yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                    delta=item["arguments"])
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                    name=item["name"], arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)
    outcome.update(final=final, items=items)


async def _argument_events(response: _Response, state: ServerState, group: RequestGroup, event: _Events,
                           outcome: dict) -> AsyncIterator[str]:
    """A named function's call, its arguments as they are generated (as chat streams send them).
    (A reply cut by `max_output_tokens` leaves them incomplete; the status says so.)"""
    sent, final, call = ChoiceProgress(), None, named_call(response.chat, state.tool_parser)
    thought, items, index = _ReasoningEvents(response, event), [], None
    item_id = _call_item(call)["id"]
    async for _, output in group:
        final = output
        reasoning, answer = state.split_reply(output.outputs[0].text, response.thinking)
        for line in thought.delta(reasoning):
            yield line
        pieces = sent.new_text(answer)
        if index is None and (pieces or output.finished):
            for line in thought.close("completed", items):
                yield line
            index = len(items)
            yield event("response.output_item.added", output_index=index, item=_call_item(call, "", "in_progress"))
        if pieces:
            yield event("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=pieces)
    item = _call_item(call, sent.text_sent, _item_status(final))
    yield event("response.function_call_arguments.done", item_id=item_id, output_index=index, name=item["name"],
                arguments=item["arguments"])
    yield event("response.output_item.done", output_index=index, item=item)
    outcome.update(final=final, items=[*items, item])
