"""From an API request to the engine's `SamplingParams`, and the checks a request must pass first.

Runs in the request handler, after `prompts` has tokenized the prompt (its length sets the
default `max_tokens` and the context check). Every refusal is an `APIError` with HTTP 400 naming
the field: `SamplingParams` validates the values and its `ValueError` / `TypeError` message names
the field, which becomes the error's `param`. Plain Python: no jax.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from jpaged.sampling_params import SamplingParams, StructuredOutputsParams, constraints_set
from jpaged.server.errors import APIError, bad_request
from jpaged.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from jpaged.server.tool_parsers import ToolParser
from jpaged.server.tools import forces_tool_calls, parses_tool_calls, tool_schema


def check_model(requested: str | None, served: list[str]) -> str:
    """The name a request is served under: `requested`, one of `served` (the model, then its LoRA
    adapters), or the model's for a request naming none; 404 otherwise, as OpenAI."""
    if requested is None:
        return served[0]
    if requested not in served:
        listed = ", ".join(f"`{name}`" for name in served)
        raise APIError(f"the model `{requested}` does not exist; this server serves {listed}",
                       HTTPStatus.NOT_FOUND, "invalid_request_error", param="model", code="model_not_found")
    return requested


def resolve_max_tokens(asked: int | None, prompt_len: int, max_model_len: int, param: str,
                       prompt_param: str = "prompt", limit: int | None = None) -> int:
    """The output budget: `asked`, or all the context the prompt leaves when None; no more than
    `limit` where given (the model's generation-config `max_new_tokens`, as vLLM caps it).

    Raises:
        APIError: 400 when the prompt fills the context (naming `prompt_param`) or prompt +
            `asked` exceeds `max_model_len` (naming `param`, the request's max-tokens field).
    """
    if prompt_len >= max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens, and the prompt has "
                          f"{prompt_len} tokens: it leaves no room for output", param=prompt_param,
                          code="context_length_exceeded")
    if asked is None:
        return min(max_model_len - prompt_len, limit or max_model_len)
    if asked >= 1 and prompt_len + asked > max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                          f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} in the completion). "
                          "Please reduce the prompt or the completion length.", param=param,
                          code="context_length_exceeded")
    return min(asked, limit) if limit and asked >= 1 else asked


def completion_params(request: CompletionRequest, max_tokens: int, defaults: dict | None = None) -> SamplingParams:
    """`SamplingParams` of a /v1/completions request (`logprobs` is a count; `echo` with
    `logprobs` asks for the prompt's logprobs too; unset fields from `defaults`, see `_build`).
    400 for unsupported or bad values."""
    if request.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if request.stream and request.best_of is not None and request.best_of > request.n:
        raise bad_request("best_of > n cannot be streamed: the best samples are known only at the end",
                          param="best_of")
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is None and request.echo:
        prompt_logprobs = request.logprobs
    return _build(request, defaults, max_tokens=max_tokens, logprobs=request.logprobs, best_of=request.best_of,
                  prompt_logprobs=prompt_logprobs, structured_outputs=structured_outputs(request))


def chat_params(request: ChatCompletionRequest, max_tokens: int, tool_parser: ToolParser | None = None,
                defaults: dict | None = None) -> SamplingParams:
    """`SamplingParams` of a /v1/chat/completions request (`logprobs` a bool, `top_logprobs` a
    count; a required or named `tool_choice` constrains the output, and "auto" needs the server's
    `tool_parser`, see `tools`; a parser whose markers are special tokens keeps them in the
    text; unset fields from `defaults`, see `_build`). 400 for bad values."""
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    if tool_parser is not None and tool_parser.keeps_special_tokens and parses_tool_calls(request):
        request = request.model_copy(update={"skip_special_tokens": False})  # the calls' markers
    renamed = {"logprobs": "top_logprobs", "max_tokens": max_tokens_field(request)}
    return _build(request, defaults, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=request.prompt_logprobs,
                  renamed=renamed, structured_outputs=structured_outputs(request, tool_schema(request, tool_parser)))


def max_tokens_field(request: ChatCompletionRequest) -> str:
    """The chat request's field that set its output budget: `max_completion_tokens`, or the older
    `max_tokens` where only that was sent."""
    if request.max_completion_tokens is None and request.max_tokens is not None:
        return "max_tokens"
    return "max_completion_tokens"


RESPONSE_FORMATS = ("text", "json_object", "json_schema", "structural_tag")


def structured_outputs(request: SamplingFields, tool_constraint: dict | None = None) -> StructuredOutputsParams | None:
    """The request's output constraint: vLLM's `structured_outputs`, with OpenAI's `response_format`
    (`json_object`: any JSON object; `json_schema`: its `json_schema.schema`; `structural_tag`:
    vLLM's, its `structures` and `triggers` as `structural_tag`) or a chat's
    `tool_constraint` (its `tools.tool_schema`) merged in as vLLM does (so `structured_outputs`
    may add options such as `disable_any_whitespace` to them). 400 naming the field for an
    unknown format, a missing schema, or bad or conflicting constraints."""
    response_format = {"type": "text"} if request.response_format is None else request.response_format
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise bad_request(f"response_format type {kind!r} is not supported (supported: {', '.join(RESPONSE_FORMATS)})",
                          param="response_format")
    fields = dict(request.structured_outputs or {})

    def add(kind: str, value, param: str) -> None:
        sent = constraints_set(fields)
        if sent:
            raise bad_request(f"{param} and structured_outputs {sent[0]} cannot both constrain the output", param=param)
        fields[kind] = value

    if tool_constraint is not None:
        if kind != "text":
            raise bad_request("response_format and tool_choice cannot both constrain the output", param="tool_choice")
        add("json", tool_constraint, "tool_choice")
    if kind == "json_object":
        add("json_object", True, "response_format")
    elif kind == "json_schema":
        json_schema = response_format.get("json_schema")
        schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
        if not isinstance(schema, (dict, str)):
            raise bad_request(f"response_format json_schema must be an object holding a schema (a JSON schema "
                              f"object), got {json_schema!r:.200}", param="response_format")
        add("json", schema, "response_format")
    elif kind == "structural_tag":
        add("structural_tag", json.dumps(response_format), "response_format")
    if not fields and request.structured_outputs is None:
        return None
    try:
        return StructuredOutputsParams(**fields)
    except (ValueError, TypeError) as err:
        raise bad_request(str(err).replace("StructuredOutputsParams.__init__()", "structured_outputs"),
                          param="structured_outputs") from err


def constraint_field(request: SamplingFields) -> str:
    """The request field its output constraint comes from, to blame when it does not compile."""
    if isinstance(request, ChatCompletionRequest) and forces_tool_calls(request):
        return "tools"
    if request.response_format is not None and request.response_format.get("type") != "text":
        return "response_format"
    return "structured_outputs"


# request fields that take the model's generation-config default when unset, and their own default
_DEFAULTED = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def _build(request: SamplingFields, defaults: dict | None, renamed: dict[str, str] | None = None,
           **fields) -> SamplingParams:
    """A `SamplingParams` from the fields both endpoints share plus `fields`; `temperature`,
    `top_p`, `top_k`, `min_p` and `repetition_penalty` left unset (or null) take `defaults` (the
    model's generation config), else OpenAI's / vLLM's. Its errors become 400s naming the
    request's field (`renamed` maps a `SamplingParams` field to the request's name)."""
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options can only be set when stream is true", param="stream_options")
    if request.stream and request.prompt_logprobs is not None:
        raise bad_request("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
    if request.use_beam_search:
        raise bad_request("use_beam_search is not supported by the server (LLM.beam_search offers it)",
                          param="use_beam_search")
    unset = {name: (defaults or {}).get(name, default) for name, default in _DEFAULTED.items()
             if getattr(request, name) is None}
    kwargs = dict(
        n=request.n, seed=request.seed, stop=request.stop, stop_token_ids=request.stop_token_ids,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        **{name: getattr(request, name) for name in _DEFAULTED if name not in unset}, **unset,
        logit_bias=request.logit_bias, min_tokens=request.min_tokens, ignore_eos=request.ignore_eos,
        skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output, allowed_token_ids=request.allowed_token_ids,
        bad_words=request.bad_words, truncate_prompt_tokens=request.truncate_prompt_tokens, **fields)
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        field = message.split(" ", 1)[0].split("[", 1)[0]
        param = (renamed or {}).get(field, field) if field in kwargs else None
        if param is not None and param != field:
            message = param + message[len(field):]
        raise bad_request(message, param=param) from err
