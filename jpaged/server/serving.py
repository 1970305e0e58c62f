"""What the completion and chat handlers share: the server's state, submitting a request's prompts
to the `AsyncEngine`, collecting final outputs, usage, and server-sent events.

A handler builds prompts and `SamplingParams`, calls `submit` (which turns the front end's
refusals into HTTP errors: 503 when the queue is full, 400 when the engine refuses the input),
then either `collect`s the final outputs or streams `sse` events ending with `DONE`, and always
closes the group (closing aborts what has not finished).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus

from pydantic import BaseModel

from jpaged.engine_client import EngineClient, PromptType
from jpaged.images import IMAGE_PART_TYPES, MediaAccess
from jpaged.lora import LoRARequest
from jpaged.metrics import Metrics
from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.pooling import Classifier, PoolingParams
from jpaged.reasoning import ReasoningParser
from jpaged.sampling_params import SamplingParams
from jpaged.server.async_engine import (
    AsyncEngine,
    EngineStepError,
    RequestGroup,
    ServerOverloaded,
    ServerStopping,
    TooManySequences,
)
from jpaged.server.errors import APIError, bad_request, internal_error, overloaded, stopping
from jpaged.server.params import check_model
from jpaged.server.prompts import ChatTemplate, Prompt, chat_prompt
from jpaged.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    TokenizeRequest,
    ToolCall,
    UsageInfo,
)
from jpaged.server.tool_parsers import ToolParser

DONE = "data: [DONE]\n\n"
MEDIA_THREADS = 16  # chats with images read at once (each may download its images)


@dataclass
class ServerState:
    """What the routes need: the engine front end, the served model's name, the metrics, the key,
    and how chats are rendered and read (the server's chat template, None for the tokenizer's;
    whether requests may bring their own; the tool-call parser of "auto" tool choice, if any), and
    the sampling defaults of fields a request leaves unset (`EngineClient.default_sampling_params`)."""

    engine: AsyncEngine
    model_name: str
    metrics: Metrics
    api_key: str | None = None
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    tool_parser: ToolParser | None = None
    reasoning_parser: ReasoningParser | None = None  # the engine's (`EngineConfig.reasoning_parser`)
    # runner "pooling": "embed" (/v1/embeddings), "classify" (/classify), "token_embed" or
    # "token_classify" (/pooling only; /pooling serves the others too)
    pooling_task: str | None = None
    sampling_defaults: dict = field(default_factory=dict)
    loras: dict[str, LoRARequest] = field(default_factory=dict)  # LoRA adapters served, by model name
    runtime_lora_updating: bool = False  # whether requests may load and unload adapters
    classifier: Classifier | None = None  # a classifying engine's head (`EngineClient.classifier`)
    return_tokens_as_token_ids: bool = False  # logprob tokens named `token_id:N` unless a request says otherwise
    media: MediaAccess = MediaAccess(local_root=None)  # the image sources requests may name (no local paths)
    chat_template_content_format: str = "auto"  # how the template takes contents (`jpaged.images.CONTENT_FORMATS`)
    # chats with images are read here (their downloads may be slow), apart from other requests' prompts
    media_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(MEDIA_THREADS, "jpaged-media"))

    async def chat_prompt(self, messages: list[ChatMessage], *args, template: ChatTemplate) -> Prompt:
        """`prompts.chat_prompt` of `messages` (its other arguments `args`) off the event loop: a
        chat holding image parts in `media_pool`, so that slow image downloads hold up no other
        request's prompt."""
        pool = self.media_pool if any(isinstance(m.content, list) and any(part.type in IMAGE_PART_TYPES
                                                                          for part in m.content) for m in messages) else None
        build = functools.partial(chat_prompt, self.engine.tokenizer, messages, *args, template=template,
                                  vision=self.engine.vision_config, media=self.media, max_images=self.engine.max_images,
                                  interleave=self.engine.interleave_mm_strings)
        return await asyncio.get_running_loop().run_in_executor(pool, build)

    def tokens_as_ids(self, request: CompletionRequest | ChatCompletionRequest) -> bool:
        """Whether `request`'s logprobs name tokens by id (its `return_tokens_as_token_ids`, else the server's)."""
        asked = request.return_tokens_as_token_ids
        return self.return_tokens_as_token_ids if asked is None else asked

    def thinking(self, request: ChatCompletionRequest, prompt_ids: list[int]) -> bool:
        """Whether the replies to `request` (rendered as `prompt_ids`) start in the model's
        thinking: there is a reasoning parser, the request leaves thinking on
        (`chat_template_kwargs.enable_thinking`) and the prompt has not closed it. Read once per
        request, for `split_reply` and `reasoning_tokens`."""
        if self.reasoning_parser is None:
            return False
        enabled = (request.chat_template_kwargs or {}).get("enable_thinking", True) is not False
        return enabled and not self.reasoning_parser.reasoning_ended(prompt_ids)

    def split_reply(self, text: str, thinking: bool) -> tuple[str | None, str]:
        """(reasoning, answer) of a reply's text: with a reasoning parser, its thinking (None
        where there is none) and the text after it; else None and the whole text. A reply that
        does not start `thinking` is all answer."""
        if self.reasoning_parser is None:
            return None, text
        reasoning, answer = self.reasoning_parser.split(text, thinking)
        return reasoning, answer or ""

    def reasoning_tokens(self, choice: CompletionOutput, thinking: bool) -> int:
        """How many of a reply's tokens are reasoning (0 without a reasoning parser); the EOS or
        stop token that ended it is none."""
        if self.reasoning_parser is None:
            return 0
        token_ids = choice.token_ids
        if choice.finish_reason == "stop" and not isinstance(choice.stop_reason, str):
            token_ids = token_ids[:-1]
        return self.reasoning_parser.count_reasoning_tokens(token_ids, thinking)

    def model(self, requested: str | None) -> str:
        """The model name a request is served under (the base model's, or a LoRA adapter's);
        APIError 404 for a name the server does not serve."""
        return check_model(requested, [self.model_name, *self.loras])

    # The calls below run on the engine loop thread (`AsyncEngine.call`), so that an adapter is
    # loaded, unloaded and looked up for a request one at a time.

    def lora_for(self, model: str) -> LoRARequest | None:
        """The adapter a request for `model` runs through (None: the base model); APIError 404
        where `model` stopped being served since the request named it."""
        return self.loras.get(self.model(model))

    def load_lora(self, engine: EngineClient, name: str, path: str, lora_int_id: int | None = None) -> LoRARequest:
        """Read the adapter at `path` into `engine` and serve it as `name`, under `lora_int_id`
        (None: the next id free). APIError 400 naming the field at fault."""
        if name in (self.model_name, *self.loras):
            raise bad_request(f"the model name {name!r} is already served", param="lora_name")
        if lora_int_id is None:
            lora_int_id = max([0, *engine.list_loras(), *(lora.lora_int_id for lora in self.loras.values())]) + 1
        try:
            lora = LoRARequest(name, lora_int_id, path)
        except ValueError as err:
            raise bad_request(str(err), param="lora_name" if "lora_name" in str(err) else "lora_path") from err
        try:
            engine.add_lora(lora)
        except ValueError as err:
            raise bad_request(str(err), param="lora_path") from err
        self.loras[name] = lora
        return lora

    def unload_lora(self, engine: EngineClient, name: str) -> None:
        """Stop serving adapter `name` and remove it from `engine` (APIError 404 for a name not
        served, 400 while requests run through it)."""
        lora = self.loras.get(name)
        if lora is None:
            raise APIError(f"the LoRA adapter {name!r} is not served", HTTPStatus.NOT_FOUND, param="lora_name",
                           code="model_not_found")
        try:
            engine.remove_lora(lora.lora_int_id)
        except ValueError as err:
            raise bad_request(str(err), param="lora_name") from err
        del self.loras[name]

    def template(self, request: ChatCompletionRequest | TokenizeRequest) -> ChatTemplate:
        """The chat template that renders `request`'s messages (`ChatTemplate.of_request`)."""
        return ChatTemplate.of_request(request.chat_template, request.chat_template_kwargs, self.chat_template,
                                       self.trust_request_chat_template, self.chat_template_content_format)


async def submit(state: ServerState, request_id: str, prompts: list[Prompt],
                 params: list[SamplingParams | PoolingParams | None],
                 priority: int = 0, constraint_field: str = "structured_outputs",
                 renamed: dict[str, str] | None = None, model: str | None = None) -> RequestGroup:
    """Queue one engine request per prompt, each with `priority`, run through the LoRA adapter
    `model` names where it names one (`ServerState.model`). Raises APIError: 503 when the
    server is full, 400 when the engine refuses a prompt (ids outside the vocabulary, too long for
    the KV cache, more logprobs than `--max-logprobs`, an output constraint that does not compile,
    blamed on `constraint_field`, the field it came from) or the priority (not 0 under
    first-come-first-served scheduling). `renamed` maps a `SamplingParams` field to the request's
    name for it, for the error's `param` and message. `PoolingParams` or None (embeddings,
    classifications, scores) go to a pooling engine only, `SamplingParams` to a generating one
    only (400 otherwise)."""
    if (state.pooling_task is not None) != all(param is None or isinstance(param, PoolingParams) for param in params):
        raise bad_request(pooling_route_error(state.pooling_task))
    requests: list[tuple[PromptType, SamplingParams | None]] = [
        (prompt.engine_prompt(), param)
        for prompt, param in zip(prompts, params)]
    try:
        return await state.engine.add(request_id, requests, priority, lambda: state.lora_for(model))
    except ServerOverloaded as err:
        raise overloaded(str(err)) from err
    except TooManySequences as err:
        raise bad_request(str(err), param=err.param) from err
    except ValueError as err:
        field = _refused_field(str(err))
        if field == "structured_outputs" != constraint_field:
            raise bad_request(re.sub(r"^structured_outputs (\w+)", lambda found: f"{constraint_field} " + (
                found[1] if found[1] == "structural_tag" else "schema"), str(err)), param=constraint_field) from err
        param = (renamed or {}).get(field, field)
        raise bad_request(re.sub(rf"^{field}\b", param, str(err)), param=param) from err


def pooling_route_error(pooling_task: str | None) -> str:
    """Why a route does not serve this server's model: what the model does, and where to send it."""
    if pooling_task is None:
        return "this server's model generates text; embeddings and classifications need a model run with --runner pooling"
    route = {"embed": "/v1/embeddings (text pairs to /score or /rerank)",
             "classify": "/classify (text pairs, where the model has one label, to /score or /rerank)",
             "token_embed": "/pooling (text pairs to /score or /rerank)", "token_classify": "/pooling"}[pooling_task]
    return f"this server's model runs --runner pooling to {pooling_task} prompts: send its inputs to {route}"


def _refused_field(message: str) -> str:
    """The request field an engine refusal (`LLMEngine.add_request`'s ValueError) is about."""
    leading = message.split(" ", 3)[:3]
    fields = ("logit_bias", "bad_words", "stop_token_ids", "allowed_token_ids", "truncate_prompt_tokens",
              "structured_outputs", "priority", "logprobs", "prompt_logprobs", "dimensions", "cache_salt",
              "prompt_embeds")
    return next((field for field in fields if field in leading), "prompt")


async def collect(group: RequestGroup) -> list[RequestOutput]:
    """Each request's final output, in prompt order. Raises APIError 500 if the engine failed, 503
    if the server is stopping."""
    finals: dict[int, RequestOutput] = {}
    try:
        async for index, output in group:
            if output.finished:
                finals[index] = output
    except EngineStepError as err:
        raise failed(err) from err
    finally:
        group.close()
    return [finals[i] for i in range(len(finals))]


def chunk_usage(request: SamplingFields, prompt_tokens: int, completion_tokens: int) -> UsageInfo | None:
    """A streamed chunk's usage under vLLM's `stream_options.continuous_usage_stats` (with
    `include_usage`): its choice's prompt and its tokens so far; None otherwise."""
    options = request.stream_options
    if options is None or not (options.include_usage and options.continuous_usage_stats):
        return None
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def usage(prompt_tokens: int, outputs: list[RequestOutput]) -> UsageInfo:
    """Token counts: `prompt_tokens`, and every returned choice's generated tokens."""
    completion = sum(len(choice.token_ids) for output in outputs for choice in output.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion)


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event carrying `payload` as JSON."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def failed(err: Exception) -> APIError:
    """The API error for a request the engine could not finish: 503 when the server is stopping,
    else 500."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, ServerStopping):
        return stopping(str(err))
    return internal_error(str(err))


def sse_error(err: Exception) -> str:
    """The event that reports a failure in the middle of a stream (then `DONE` follows)."""
    return sse(failed(err).body())


class ChoiceProgress:
    """What one streamed choice has sent: its text, how many tokens' logprobs, where the next
    token's text starts in the choice (a completion's `text_offset`), whether its finish chunk
    went out, and the call whose arguments it streams (a named tool choice's, once begun)."""

    def __init__(self):
        self.text_sent = ""
        self.reasoning_sent = ""
        self.num_tokens_sent = 0
        self.token_offset = 0
        self.finished = False
        self.call: ToolCall | None = None

    def new_text(self, text: str) -> str:
        """The part of the choice's cumulative `text` not yet sent, marked as sent. The engine's
        text of a choice only grows (each step's is a prefix of the final one), so the deltas of
        a stream concatenate to the final text."""
        start, self.text_sent = len(self.text_sent), text
        return text[start:]

    def new_reasoning(self, reasoning: str | None) -> str | None:
        """The part of the choice's cumulative reasoning not yet sent (None: nothing new), marked as sent."""
        start, self.reasoning_sent = len(self.reasoning_sent), reasoning or ""
        return self.reasoning_sent[start:] or None

    def new_tokens(self, token_ids: list[int], logprobs: list | None) -> tuple[list[int], list]:
        """The tokens (and their logprob entries) not yet sent, marked as sent."""
        start, self.num_tokens_sent = self.num_tokens_sent, len(token_ids)
        return token_ids[start:], (logprobs or [])[start:]
