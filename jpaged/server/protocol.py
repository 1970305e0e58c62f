"""The HTTP API's shapes: pydantic models of OpenAI's (and vLLM's) requests and responses.

FastAPI validates each request body into one of the `*Request` models (a wrong type or a
malformed body becomes an HTTP 400, see `app`); handlers answer with the `*Response` /
`*StreamResponse` models, dumped to JSON. Fields follow the OpenAI API reference for
completions and chat completions, plus vLLM's sampling extras (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `allowed_token_ids`, `bad_words`,
`truncate_prompt_tokens`, `structured_outputs`, ...) and its `/tokenize` and `/detokenize`.
Unknown request fields are ignored, as OpenAI-compatible servers do. Plain pydantic: no jax.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_serializer, model_validator
from pydantic_core import PydanticCustomError


def random_id(prefix: str) -> str:
    """A fresh response id such as `cmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    # strict: a number must come as a JSON number (an integer for an int field), a flag as a JSON
    # bool; "5", true for 1 or 1.0 for an int are 400s, as OpenAI's API refuses them
    model_config = ConfigDict(extra="ignore", strict=True)
    _null_kept: ClassVar[tuple[str, ...]] = ()  # fields whose null means something of its own

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """A field sent as null takes its default: OpenAI's API marks the optional fields nullable,
        and clients send None for "not given"."""
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if value is not None or key in cls._null_kept}


class _Body(_Request):
    """A whole request body (its parts are `_Request`s): checked once, before its parts, for text."""

    @model_validator(mode="before")
    @classmethod
    def _unicode_text_only(cls, data: Any) -> Any:
        """A string holding half of a UTF-16 surrogate pair (JSON allows `"\\ud800"`) is refused,
        naming where it is: no tokenizer takes it."""
        if isinstance(data, dict) and (where := _lone_surrogate(data)) is not None:
            raise PydanticCustomError("lone_surrogate", "{where} holds a lone UTF-16 surrogate (such as \\ud800 in JSON), "
                                      "which is not Unicode text",
                                      {"where": where or "a field name", "param": re.split(r"[.\[]", where)[0] or None})
        return data


def _lone_surrogate(data: dict) -> str | None:
    """The path (`messages[0].content`) of a string or key in `data` that is not valid Unicode text
    (one that cannot be written as UTF-8), or None."""
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(value, dict):
            pending += [(f"{path}.{key}" if path else str(key), item) for key, item in value.items()]
            pending += [(path, key) for key in value if isinstance(key, str)]
        elif isinstance(value, list):
            pending += [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return None


class StreamOptions(_Request):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's: with include_usage, usage in every chunk


# vLLM's structured-output fields before `structured_outputs` replaced them: refused, not ignored
# (ignored, a request would get unconstrained text)
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar", "guided_whitespace_pattern": None, "guided_decoding_backend": None}


class SamplingFields(_Body):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    @model_validator(mode="before")
    @classmethod
    def _no_guided_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and (given := [name for name in _GUIDED_FIELDS if name in data]):
            key = _GUIDED_FIELDS[given[0]]
            instead = f'structured_outputs={{"{key}": ...}}' if key else "structured_outputs"
            raise PydanticCustomError("guided_field", "{field} is vLLM's former structured-output field, no longer "
                                      "read: use {instead} (or response_format)",
                                      {"field": given[0], "instead": instead, "param": given[0]})
        return data

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    use_beam_search: StrictBool = False
    priority: StrictInt = 0  # lower first, under a server started with --scheduling-policy priority
    # the output's shape: OpenAI's response_format, or vLLM's structured_outputs
    # (json / regex / choice / grammar / json_object, and its whitespace and properties options)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    # keys the prompt's prefix-cache blocks apart from those of requests without the same salt
    cache_salt: str | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt` is a string, a list of strings, a list of token ids, or a
    list of token-id lists, and `prompt_embeds` one or more embeds prompts (vLLM's); each prompt
    gets `n` choices (choice index = prompt index * n + j, the embeds prompts first)."""

    _null_kept = ("max_tokens",)

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] | None = None
    # vLLM's: prompts as embeddings, each a base64 `torch.save` of a [length, hidden_size] tensor
    # (with --enable-prompt-embeds); they come before the `prompt`s
    prompt_embeds: str | list[str] | None = None
    max_tokens: int | None = 16  # null: all the context the prompt leaves (vLLM's)
    logprobs: int | None = None
    echo: StrictBool = False
    best_of: int | None = None
    suffix: str | None = None
    return_token_ids: StrictBool = False  # vLLM's: the prompt's and each choice's token ids too
    return_tokens_as_token_ids: StrictBool | None = None  # vLLM's: logprob tokens as "token_id:N" (None: the server's)


class ContentPart(_Request):
    type: str
    text: str | None = None
    image_url: dict[str, Any] | str | None = None  # {"url": ...} (OpenAI's), for models that read images


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn's answer to that call


class FunctionDefinition(_Request):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. `max_completion_tokens` (or the older `max_tokens`) defaults to
    what the context has left after the prompt."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: StrictBool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True  # False: "required" makes exactly one call
    # vLLM's extras
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    echo: StrictBool = False  # a final assistant message's text leads the reply (with continue_final_message)
    chat_template: str | None = None  # Jinja text; only where the server trusts request templates
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the template
    return_token_ids: StrictBool = False  # the prompt's and each choice's token ids too
    return_tokens_as_token_ids: StrictBool | None = None  # logprob tokens as "token_id:N" (None: the server's)


class ResponsesRequest(_Body):
    """POST /v1/responses (OpenAI's Responses API; see `responses`). Fields it does not name
    (`temperature`, `top_p`, `parallel_tool_calls`, `user` and vLLM's extras such as `top_k`,
    `seed`, `stop` or `priority`) pass to the chat request it becomes."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    stream: StrictBool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None  # nothing is kept either way
    previous_response_id: str | None = None  # refused: no response is kept
    top_logprobs: int | None = None  # refused
    include: list[str] | None = None  # refused unless empty


class _Encoded(_Body):
    """How vectors leave (vLLM's fields): `encoding_format` "float" (JSON lists), "base64" (the
    values' bytes in base64), "bytes" or "bytes_only" (the bytes as the body itself, with or without
    a `metadata` header); `embed_dtype` and `endianness` choose those bytes' type and order."""

    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = "float"
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "big", "little"] = "native"


class EmbeddingRequest(_Encoded):
    """POST /v1/embeddings: `input` as a completion's `prompt` (a string, strings, token ids, or
    token-id lists); the encoding fields of `_Encoded`; `dimensions` (a Matryoshka model's);
    `use_activation` false (vLLM's) leaves the embeddings unnormalised."""

    model: str | None = None
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: keep each input's last tokens (-1: max_model_len)
    use_activation: StrictBool | None = None  # false: the pooled state unnormalised


class ClassificationRequest(_Body):
    """POST /classify (vLLM's): `input` as a completion's `prompt`; `use_activation` false: raw
    logits."""

    model: str | None = None
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: keep each input's last tokens (-1: max_model_len)
    use_activation: StrictBool | None = None  # None or true: the model's activation


class PoolingRequest(_Encoded):
    """POST /pooling (vLLM's): `input` as a completion's `prompt`, or `messages` (one chat, through
    the chat template: `add_generation_prompt` false by default, as vLLM's pooling routes);
    `task` (None: the server's); the encoding fields of `_Encoded`; `dimensions` as for
    /v1/embeddings; `use_activation` false: raw logits or unnormalised states."""

    model: str | None = None
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]] | None = None
    messages: list[ChatMessage] | None = None
    task: Literal["embed", "classify", "token_embed", "token_classify"] | None = None
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: keep each input's last tokens (-1: max_model_len)
    use_activation: StrictBool | None = None
    add_generation_prompt: StrictBool = False
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False  # with messages: special tokens beyond the template's
    chat_template: str | None = None  # Jinja text; only where the server trusts request templates
    chat_template_kwargs: dict[str, Any] | None = None


class _ScoringBody(_Body):
    """What /score and /rerank share (vLLM's): per-text token limits (0: none), the engine
    prompt's `truncate_prompt_tokens`, the variables of the server's chat template for pairs;
    `use_activation` false: a cross-encoder's raw logits."""

    model: str | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: keep each engine prompt's last tokens (-1: max_model_len)
    max_tokens_per_query: StrictInt = 0  # keep each query's first tokens
    max_tokens_per_doc: StrictInt = 0  # keep each document's first tokens
    use_activation: StrictBool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # variables of the server's --chat-template for pairs
    instruction: str | None = None  # the template variable `instruction` (unless chat_template_kwargs sets it)

    def template_variables(self) -> dict[str, Any]:
        """`chat_template_kwargs`, with `instruction` where they do not set it (as vLLM merges them)."""
        variables = dict(self.chat_template_kwargs or {})
        if self.instruction is not None:
            variables.setdefault("instruction", self.instruction)
        return variables


SCORE_FIELDS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class ScoreRequest(_ScoringBody):
    """POST /score (vLLM's): one query and N documents, or N of each paired in order, under any
    of vLLM's names for them (`queries` / `documents`, `queries` / `items`, `data_1` /
    `data_2`, `text_1` / `text_2`); each a text or a list of texts."""

    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None
    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None

    def pair_fields(self) -> tuple[str, str]:
        """The names of the two sides the request gave. ValueError when it gave none, or half."""
        given = [(first, second) for first, second in SCORE_FIELDS
                 if getattr(self, first) is not None and getattr(self, second) is not None]
        names = " or ".join(f"{first} and {second}" for first, second in SCORE_FIELDS)
        if len(given) == 1:
            extra = sorted({name for pair in SCORE_FIELDS for name in pair if getattr(self, name) is not None}
                           - set(given[0]))
            if extra:
                raise ValueError(f"{', '.join(extra)} does not pair with {given[0][0]} and {given[0][1]}: give the "
                                 f"texts to score under one of {names}")
            return given[0]
        if given:
            raise ValueError(f"the texts to score come under more than one pair of names "
                             f"({', '.join(f'{first} and {second}' for first, second in given)}): give one of {names}")
        raise ValueError(f"the texts to score are missing: give {names}")


class RerankRequest(_ScoringBody):
    """POST /rerank, /v1/rerank, /v2/rerank (vLLM's, Jina's and Cohere's shape): a `query`, its
    `documents`, and `top_n` (the best n to return; 0: all)."""

    query: str
    documents: str | list[str]
    top_n: StrictInt = Field(default=0, ge=0)


class TokenizeRequest(_Body):
    """POST /tokenize: a `prompt` (text), or chat `messages` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # given to the chat template with the messages
    add_special_tokens: StrictBool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool = False  # each token's own string too (the tokenizer's, "Ġthe")
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(_Body):
    """POST /v1/load_lora_adapter (vLLM's): serve the PEFT adapter at `lora_path` as model `lora_name`."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Body):
    """POST /v1/unload_lora_adapter (vLLM's): stop serving the adapter named `lora_name`."""

    lora_name: str
    lora_int_id: int | None = None  # vLLM's field; the name decides


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    completion_tokens_details: dict[str, int] | None = None  # {"reasoning_tokens"} with a reasoning parser

    @model_serializer(mode="wrap")
    def _details_when_given(self, handler) -> dict:
        data = handler(self)
        if data.get("completion_tokens_details") is None:
            data.pop("completion_tokens_details", None)
        return data


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's entry of a prompt token's top logprobs (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids (a stream: in the choice's first chunk)
    token_ids: list[int] | None = None  # with return_token_ids: the choice's tokens (a stream: the chunk's)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning: str | None = None  # a reasoning model's thinking (with a reasoning parser, vLLM's field)
    tool_calls: list[ToolCall] = Field(default_factory=list)


class _WithoutNulls(BaseModel):
    """A stream delta: only the fields it carries are sent."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler) -> dict:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(_WithoutNulls):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_WithoutNulls):
    """A tool call in a chat stream: whole, or (a named tool choice's) its id, type and name with
    the first piece of its arguments, then further pieces alone."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids


class DeltaMessage(_WithoutNulls):
    """A chat stream's delta: only the fields it carries are sent (the role in a choice's first)."""

    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with return_token_ids: the chunk's tokens


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids: in the stream's first chunk


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jpaged"
    root: str | None = None  # the model as the engine was given it, or a LoRA adapter's folder (vLLM's field)
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
