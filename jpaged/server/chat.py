"""POST /v1/chat/completions: messages in through the chat template, assistant replies out.

The conversation is rendered by the tokenizer's chat template (`prompts.chat_prompt`) into one
engine request with `n` samples. Streams open each choice with a `{"role": "assistant"}` delta,
then send content deltas (under a named `tool_choice`, the call's arguments as they come instead;
under "required", the calls whole in the last chunk; under "auto", content up to where a call may
begin, and the calls whole in the last chunk, see `tools`), the finish reason in the choice's last chunk, a usage chunk when
`stream_options.include_usage` is set, and `data: [DONE]`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse

from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.sampling_params import SamplingParams
from jpaged.server.async_engine import RequestGroup
from jpaged.server.errors import bad_request
from jpaged.server.logprobs import chat_logprobs, prompt_logprobs
from jpaged.server.params import chat_params, constraint_field, max_tokens_field, resolve_max_tokens
from jpaged.server.prompts import Prompt, message_text, truncated
from jpaged.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    UsageInfo,
    random_id,
)
from jpaged.server.serving import (
    DONE,
    ChoiceProgress,
    ServerState,
    chunk_usage,
    collect,
    pooling_route_error,
    sse,
    sse_error,
    submit,
    usage,
)
from jpaged.server.tools import named_call, names_one_call, parses_tool_calls, reply, streamable_text, template_tools


async def create_chat_completion(request: ChatCompletionRequest, state: ServerState
                                 ) -> JSONResponse | AsyncIterator[str]:
    """Serve a chat completion request: a response body, or (with `stream`) an iterator of SSE
    events. Raises APIError for bad input (400) or a full server (503)."""
    model = state.model(request.model)
    prompt, params = await chat_request_input(request, state)
    request_id = random_id("chatcmpl")
    group = await submit(state, request_id, [prompt], [params], request.priority, constraint_field(request),
                         renamed={"logprobs": "top_logprobs"}, model=model)
    if request.stream:
        return _stream(request, state, model, request_id, prompt, params, group)
    (output,) = await collect(group)
    choices, thinking = [], state.thinking(request, prompt.token_ids)
    for choice in output.outputs:
        reasoning, answer = state.split_reply(choice.text, thinking)
        content, calls = reply(request, answer, state.tool_parser)
        if state.reasoning_parser is not None and not content:
            content = None  # no answer (vLLM's, under a reasoning parser)
        if echo := _echoed(request):
            content = echo + (content or "")
        message = ChatResponseMessage(content=content, reasoning=reasoning, tool_calls=calls)
        choices.append(ChatChoice(index=choice.index, message=message,
                                  logprobs=_logprobs(state, request, params, choice.token_ids, choice.logprobs),
                                  finish_reason=_finish_reason(request, choice, calls), stop_reason=choice.stop_reason,
                                  token_ids=list(choice.token_ids) if request.return_token_ids else None))
    response = ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                      usage=_usage(state, prompt, output, thinking),
                                      prompt_logprobs=prompt_logprobs(output.prompt_logprobs),
                                      prompt_token_ids=prompt.token_ids if request.return_token_ids else None)
    return JSONResponse(response.model_dump())


async def chat_request_input(request: ChatCompletionRequest, state: ServerState) -> tuple[Prompt, SamplingParams]:
    """The engine's prompt (the messages through the chat template) and sampling parameters of a
    chat request. Raises APIError 400 naming the field that cannot be served, or for a pooling
    engine (which generates nothing)."""
    if state.pooling_task is not None:
        raise bad_request(pooling_route_error(state.pooling_task))
    prompt = await state.chat_prompt(request.messages, request.add_generation_prompt,  # other requests go on meanwhile
                                     request.continue_final_message, False, template_tools(request),
                                     template=state.template(request))
    prompt = dataclasses.replace(truncated(prompt, request.truncate_prompt_tokens, state.engine.max_model_len),
                                 cache_salt=request.cache_salt)
    asked = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    max_tokens = resolve_max_tokens(asked, len(prompt.token_ids), state.engine.max_model_len,
                                    max_tokens_field(request), prompt_param="messages",
                                    limit=state.sampling_defaults.get("max_tokens"))
    return prompt, chat_params(request, max_tokens, state.tool_parser, state.sampling_defaults)


def _usage(state: ServerState, prompt: Prompt, output: RequestOutput, thinking: bool) -> UsageInfo:
    """The token counts, with the reasoning tokens among the completion's where a reasoning parser
    reads the replies (vLLM's `completion_tokens_details`; `thinking` as `ServerState.thinking`)."""
    counts = usage(len(prompt.token_ids), [output])
    if state.reasoning_parser is not None:
        thought = sum(state.reasoning_tokens(choice, thinking) for choice in output.outputs)
        counts.completion_tokens_details = {"reasoning_tokens": thought}
    return counts


def _echoed(request: ChatCompletionRequest) -> str:
    """What vLLM's chat `echo` puts before the reply: the final message's text when it is the
    assistant's (the reply continues or follows it), else nothing."""
    last = len(request.messages) - 1
    if not request.echo or request.messages[last].role != "assistant":
        return ""
    return message_text(request.messages[last], last)


def _finish_reason(request: ChatCompletionRequest, choice: CompletionOutput, calls: list[ToolCall]) -> str:
    """"tool_calls" when a required or "auto" tool choice made calls (OpenAI's); the engine's reason
    else (a named function's call ends with "stop", as OpenAI's forced calls)."""
    chose = request.tool_choice == "required" or parses_tool_calls(request)
    return "tool_calls" if calls and chose else choice.finish_reason


def _logprobs(state: ServerState, request: ChatCompletionRequest, params: SamplingParams, token_ids: list[int],
              entries: list | None):
    if params.logprobs is None:
        return None
    return chat_logprobs(state.engine.tokenizer, token_ids, entries or [], params.logprobs, state.tokens_as_ids(request))


async def _stream(request: ChatCompletionRequest, state: ServerState, model: str, request_id: str, prompt: Prompt,
                  params: SamplingParams, group: RequestGroup) -> AsyncIterator[str]:
    created = int(time.time())
    progress = [ChoiceProgress() for _ in range(params.n)]
    final, thinking = None, state.thinking(request, prompt.token_ids)

    def chunk(choices: list[ChatStreamChoice], usage_info=None, prompt_ids=None) -> str:
        return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=model,
                                                choices=choices, usage=usage_info, prompt_token_ids=prompt_ids))

    try:
        prompt_tokens = len(prompt.token_ids)
        for index in range(params.n):
            first = index == 0 and request.return_token_ids
            yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))],
                        chunk_usage(request, prompt_tokens, 0), prompt.token_ids if first else None)
            if echo := _echoed(request):
                yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(content=echo))],
                            chunk_usage(request, prompt_tokens, 0))
        async for _, output in group:
            final = output if output.finished else final
            for choice in output.outputs:
                event = _choice_chunk(request, state, params, progress[choice.index], choice, thinking)
                if event is not None:
                    yield chunk([event], chunk_usage(request, prompt_tokens, len(choice.token_ids)))
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], _usage(state, prompt, final, thinking))
    except Exception as err:  # the engine failed mid-stream: tell the client, then end the stream
        yield sse_error(err)
    finally:
        group.close()
    yield DONE


def _choice_chunk(request: ChatCompletionRequest, state: ServerState, params: SamplingParams, sent: ChoiceProgress,
                  choice: CompletionOutput, thinking: bool) -> ChatStreamChoice | None:
    """The chunk that brings a streamed choice up to date, or None when it has nothing new. Text
    that may hold tool calls (`tools.streamable_text`) waits for the finished reply; the calls
    then come whole in the last chunk, after any content not yet sent. A named function's
    arguments stream as they come (`_arguments_chunk`)."""
    if sent.finished:
        return None
    reasoning, answer = state.split_reply(choice.text, thinking)
    thought = sent.new_reasoning(reasoning)
    if names_one_call(request):
        return _arguments_chunk(request, state, params, sent, choice, answer, thought)
    calls: list[ToolCall] = []
    if choice.finished():
        content, calls = reply(request, answer, state.tool_parser)
        text = sent.new_text(content or "") if calls else sent.new_text(answer)
    else:
        streamable = streamable_text(request, answer, state.tool_parser)
        text = sent.new_text(streamable) if len(streamable) > len(sent.text_sent) else ""
    token_ids, entries = sent.new_tokens(choice.token_ids, choice.logprobs)
    logprobs = _logprobs(state, request, params, token_ids, entries) if token_ids else None
    if not text and not thought and logprobs is None and not _sends_tokens(request, token_ids) \
            and not choice.finished():
        return None
    sent.finished = choice.finished()
    delta = DeltaMessage(content=text or (None if calls or thought else ""), reasoning=thought,
                         tool_calls=[_whole_call(i, call) for i, call in enumerate(calls)] or None)
    return ChatStreamChoice(index=choice.index, delta=delta, logprobs=logprobs,
                            finish_reason=_finish_reason(request, choice, calls) if choice.finished() else None,
                            stop_reason=choice.stop_reason, token_ids=_chunk_tokens(request, token_ids))


def _sends_tokens(request: ChatCompletionRequest, token_ids: list[int]) -> bool:
    """Whether a chunk must go out for its new tokens alone (`return_token_ids`: every token is sent)."""
    return request.return_token_ids and bool(token_ids)


def _chunk_tokens(request: ChatCompletionRequest, token_ids: list[int]) -> list[int] | None:
    return list(token_ids) if request.return_token_ids else None


def _whole_call(index: int, call: ToolCall) -> DeltaToolCall:
    return DeltaToolCall(index=index, id=call.id, type="function",
                         function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))


def _arguments_chunk(request: ChatCompletionRequest, state: ServerState, params: SamplingParams, sent: ChoiceProgress,
                     choice: CompletionOutput, answer: str, thought: str | None) -> ChatStreamChoice | None:
    """A named function's call as its arguments (`answer`, the reply after any reasoning) are
    generated (vLLM's): the first chunk with a piece brings the call's id, type, name and that
    piece, later ones further pieces; reasoning (`thought`, new since the last chunk) comes
    before. (A reply cut by `max_tokens` leaves the arguments incomplete; finish reason "length"
    says so.)"""
    pieces = sent.new_text(answer)
    token_ids, entries = sent.new_tokens(choice.token_ids, choice.logprobs)
    logprobs = _logprobs(state, request, params, token_ids, entries) if token_ids else None
    if not pieces and not thought and logprobs is None and not _sends_tokens(request, token_ids) \
            and not choice.finished():
        return None
    sent.finished = choice.finished()
    if not pieces and sent.call is None and not choice.finished():  # still thinking: no call yet
        return ChatStreamChoice(index=choice.index, delta=DeltaMessage(reasoning=thought), logprobs=logprobs,
                                token_ids=_chunk_tokens(request, token_ids))
    first = sent.call is None
    if first:
        sent.call = named_call(request, state.tool_parser)
        calls = [_whole_call(0, sent.call.model_copy(update={"function": FunctionCall(
            name=sent.call.function.name, arguments=pieces)}))]
    else:
        calls = [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=pieces))] if pieces else None
    return ChatStreamChoice(index=choice.index, delta=DeltaMessage(reasoning=thought, tool_calls=calls), logprobs=logprobs,
                            finish_reason=choice.finish_reason if choice.finished() else None,
                            stop_reason=choice.stop_reason, token_ids=_chunk_tokens(request, token_ids))
