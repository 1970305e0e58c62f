"""POST /v1/completions: prompts in, OpenAI text completions out, whole or as a stream of chunks.

Each prompt becomes one engine request with `n` samples; choice `prompt_index * n + j` is sample
`j` of prompt `prompt_index`. With `echo` the prompt's text leads each choice (and, with
`logprobs`, the prompt's token logprobs lead the choice's). Streams send each choice's text
deltas as they come, its finish reason in its last chunk, a usage chunk when
`stream_options.include_usage` is set, and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse

from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.sampling_params import SamplingParams
from jpaged.server.async_engine import RequestGroup
from jpaged.server.errors import APIError, bad_request
from jpaged.server.logprobs import completion_logprobs, prompt_logprobs, text_length
from jpaged.server.params import completion_params, constraint_field, resolve_max_tokens
from jpaged.server.prompts import Prompt, completion_prompts, truncated
from jpaged.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    random_id,
)
from jpaged.server.serving import (
    DONE,
    ChoiceProgress,
    ServerState,
    chunk_usage,
    collect,
    sse,
    sse_error,
    submit,
    usage,
)


async def create_completion(request: CompletionRequest, state: ServerState) -> JSONResponse | AsyncIterator[str]:
    """Serve a completion request: a response body, or (with `stream`) an iterator of SSE events.
    Raises APIError for bad input (400) or a full server (503)."""
    model = state.model(request.model)
    tokenizer, max_model_len = state.engine.tokenizer, state.engine.max_model_len
    prompts = await asyncio.to_thread(completion_prompts, request.prompt, tokenizer, request.prompt_embeds,
                                      state.engine.enable_prompt_embeds)  # other requests go on meanwhile
    if request.echo and any(p.embeds is not None for p in prompts):
        raise bad_request("echo needs the prompt's tokens; a prompt given as prompt_embeds has none", param="echo")
    prompts = [dataclasses.replace(truncated(p, request.truncate_prompt_tokens, max_model_len),
                                   cache_salt=request.cache_salt) for p in prompts]
    if _scores_only(request) and request.min_tokens:
        raise bad_request(f"min_tokens must be in [0, max_tokens=0], got {request.min_tokens}", param="min_tokens")
    asked = 1 if _scores_only(request) else request.max_tokens  # one token is computed, none returned
    params = [_params_of(request, asked, prompt, max_model_len, state.sampling_defaults, i if len(prompts) > 1 else None)
              for i, prompt in enumerate(prompts)]
    request_id = random_id("cmpl")
    group = await submit(state, request_id, prompts, params, request.priority, constraint_field(request), model=model)
    if request.stream:
        return _stream(request, state, model, request_id, prompts, params[0], group)
    outputs = [_returned(request, output) for output in await collect(group)]
    as_ids = state.tokens_as_ids(request)
    choices = [_choice(request, tokenizer, i, prompt, output, choice, as_ids)
               for i, (prompt, output) in enumerate(zip(prompts, outputs)) for choice in output.outputs]
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    response = CompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=usage(prompt_tokens, outputs))
    return JSONResponse(response.model_dump())


def _params_of(request: CompletionRequest, asked: int | None, prompt: Prompt, max_model_len: int, defaults: dict,
               index: int | None) -> SamplingParams:
    """The sampling parameters of one of the request's prompts, unset fields from `defaults`; a
    refusal of the prompt at `index` of several (its length against the context) says which, a
    refusal of the request's own values does not."""
    limit = None if _scores_only(request) else defaults.get("max_tokens")
    try:
        max_tokens = resolve_max_tokens(asked, len(prompt.token_ids), max_model_len, "max_tokens", limit=limit)
    except APIError as err:
        if index is not None:
            err.message = f"prompt {index}: {err.message}"
        raise
    return completion_params(request, max_tokens, defaults)


def _scores_only(request: CompletionRequest) -> bool:
    """`echo` with `max_tokens` 0 (vLLM's and OpenAI's legacy way to score a prompt): the answer
    is the prompt, with its logprobs where asked for, and no generated token."""
    return request.echo and request.max_tokens == 0


def _returned(request: CompletionRequest, output: RequestOutput) -> RequestOutput:
    """`output` as the response reports it: without its generated tokens when it only scores."""
    if not _scores_only(request):
        return output
    emptied = [dataclasses.replace(choice, text="", token_ids=[], logprobs=None if choice.logprobs is None else [],
                                   cumulative_logprob=None, finish_reason=choice.finish_reason and "length",
                                   stop_reason=None) for choice in output.outputs]
    return dataclasses.replace(output, outputs=emptied)


def _prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    return prompt.text if prompt.text is not None else tokenizer.decode(prompt.token_ids)


def _choice(request: CompletionRequest, tokenizer: Any, prompt_index: int, prompt: Prompt, output: RequestOutput,
            choice: CompletionOutput, as_ids: bool) -> CompletionChoice:
    index = prompt_index * request.n + choice.index
    echoed, echoed_logprobs = _echo(request, tokenizer, prompt, output, as_ids) if request.echo else ("", None)
    logprobs = None
    if request.logprobs is not None:
        logprobs = completion_logprobs(tokenizer, choice.token_ids, choice.logprobs or [],
                                       _offset_after(tokenizer, prompt, echoed, echoed_logprobs), as_token_ids=as_ids,
                                       first_alone=prompt.embeds is not None)
        if echoed_logprobs is not None:
            logprobs = _joined(echoed_logprobs, logprobs)
    return CompletionChoice(index=index, text=echoed + choice.text, logprobs=logprobs,
                            finish_reason=choice.finish_reason, stop_reason=choice.stop_reason,
                            prompt_logprobs=prompt_logprobs(output.prompt_logprobs) if request.prompt_logprobs is not None
                            else None, **_token_ids(request, prompt.prompt_token_ids, choice.token_ids))


def _token_ids(request: CompletionRequest, prompt_ids: list[int] | None, token_ids: list[int]) -> dict:
    """A choice's `prompt_token_ids` and `token_ids` fields where the request asks for them."""
    return {"prompt_token_ids": prompt_ids, "token_ids": list(token_ids)} if request.return_token_ids else {}


def _joined(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=first.text_offset + second.text_offset,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              tokens=first.tokens + second.tokens, top_logprobs=first.top_logprobs + second.top_logprobs)


async def _stream(request: CompletionRequest, state: ServerState, model: str, request_id: str, prompts: list[Prompt],
                  params: SamplingParams, group: RequestGroup) -> AsyncIterator[str]:
    tokenizer, created, as_ids = state.engine.tokenizer, int(time.time()), state.tokens_as_ids(request)
    progress: dict[int, ChoiceProgress] = {}
    finals: dict[int, RequestOutput] = {}

    def chunk(choices: list[CompletionChoice], usage_info=None) -> str:
        return sse(CompletionStreamResponse(id=request_id, created=created, model=model,
                                            choices=choices, usage=usage_info))

    try:
        async for prompt_index, output in group:
            output = _returned(request, output)
            if output.finished:
                finals[prompt_index] = output
            for choice in output.outputs:
                if not choice.token_ids and not choice.finished():
                    continue  # its prompt is still being computed (and its prompt logprobs with it)
                index = prompt_index * request.n + choice.index
                sent = progress.get(index)
                echoed, echoed_logprobs, prompt_ids = "", None, None
                if sent is None:
                    sent = progress[index] = ChoiceProgress()
                    prompt_ids = prompts[prompt_index].prompt_token_ids
                    if request.echo:
                        echoed, echoed_logprobs = _echo(request, tokenizer, prompts[prompt_index], output, as_ids)
                        sent.token_offset = _offset_after(tokenizer, prompts[prompt_index], echoed,
                                                          echoed_logprobs)
                event = _choice_chunk(request, tokenizer, sent, choice, index, echoed, echoed_logprobs, prompt_ids,
                                      as_ids, prompts[prompt_index].embeds is not None)
                if event is not None:
                    yield chunk([event], chunk_usage(request, len(prompts[prompt_index].token_ids),
                                                     len(choice.token_ids)))
        if request.stream_options and request.stream_options.include_usage:
            outputs = [finals[i] for i in sorted(finals)]
            yield chunk([], usage(sum(len(p.token_ids) for p in prompts), outputs))
    except Exception as err:  # the engine failed mid-stream: tell the client, then end the stream
        yield sse_error(err)
    finally:
        group.close()
    yield DONE


def _echo(request: CompletionRequest, tokenizer: Any, prompt: Prompt, output: RequestOutput,
          as_ids: bool) -> tuple[str, CompletionLogprobs | None]:
    """The prompt's text that leads an echoed choice, and its tokens' logprobs where asked for."""
    if request.logprobs is None:
        return _prompt_text(tokenizer, prompt), None
    return _prompt_text(tokenizer, prompt), completion_logprobs(
        tokenizer, prompt.token_ids, output.prompt_logprobs or [None] * len(prompt.token_ids), top=request.logprobs,
        as_token_ids=as_ids)


def _offset_after(tokenizer: Any, prompt: Prompt, echoed: str, echoed_logprobs: CompletionLogprobs | None) -> int:
    """The `text_offset` of the first generated token: the echoed prompt tokens' offsets run on
    (`text_length`, as vLLM counts them, which differs from the text's length where a character
    spans tokens), else the echoed text's length."""
    if echoed_logprobs is None or not echoed_logprobs.tokens:
        return len(echoed)
    return echoed_logprobs.text_offset[-1] + text_length(tokenizer, prompt.token_ids[-1:])


def _choice_chunk(request: CompletionRequest, tokenizer: Any, sent: ChoiceProgress, choice: CompletionOutput,
                  index: int, echoed: str, echoed_logprobs: CompletionLogprobs | None, prompt_ids: list[int] | None,
                  as_ids: bool, embeds_prompt: bool) -> CompletionChoice | None:
    """The chunk that brings a streamed choice up to date, or None when it has nothing new. Its
    tokens' `text_offset`s count from the choice's start as a whole response's do (so text held
    back for a possible stop string does not shift them). `prompt_ids` are given for the
    choice's first chunk (sent with `return_token_ids`)."""
    if sent.finished:
        return None
    text = echoed + sent.new_text(choice.text)
    first_alone = embeds_prompt and sent.num_tokens_sent == 0
    token_ids, entries = sent.new_tokens(choice.token_ids, choice.logprobs)
    logprobs = None
    if request.logprobs is not None and (token_ids or echoed_logprobs is not None):
        logprobs = completion_logprobs(tokenizer, token_ids, entries, sent.token_offset, as_token_ids=as_ids,
                                       first_alone=first_alone)
        sent.token_offset += text_length(tokenizer, token_ids, first_alone)
        if echoed_logprobs is not None:
            logprobs = _joined(echoed_logprobs, logprobs)
    tokens_to_send = request.return_token_ids and (token_ids or prompt_ids is not None)
    if not text and logprobs is None and not tokens_to_send and not choice.finished():
        return None
    sent.finished = choice.finished()
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=choice.finish_reason,
                            stop_reason=choice.stop_reason, **_token_ids(request, prompt_ids, token_ids))
