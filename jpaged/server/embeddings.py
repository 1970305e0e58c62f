"""POST /v1/embeddings (OpenAI's embeddings API), POST /classify (vLLM's classification API) and
POST /pooling (vLLM's pooling API), served by an engine with the pooling runner.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists (as a
completion's `prompt`); each item becomes one engine request that ends with its embedding
(`jpaged/pooling.py`). `encoding_format` "float" gives each embedding as a list of floats,
"base64" as its float32 bytes (little-endian) in base64, which the `openai` client asks for by
default and decodes. `dimensions` shortens a Matryoshka model's embeddings (400 for another
model). The usage counts the inputs' tokens. /classify takes the same `input` and answers, per item, its class probabilities
(`probs`, `num_classes`) and the most probable label's name (`label`, from the model's
`id2label`, else transformers' default `LABEL_<i>`); with `use_activation` false, the head's raw
logits in `probs` instead. `use_activation` false leaves an embedding unnormalised. Each route serves only the engine that does its task: a
generating engine refuses both, an embedding one /classify and a classifying one /v1/embeddings,
and a pooling one the generating routes (400s that say what the model does and where to send it).

/pooling serves every pooling engine, whatever its task: per item, the output `LLM.encode`
gives (`data`: an embedding, class probabilities, or a row per prompt token for the token-level
tasks; "base64" encodes the rows' float32 bytes in order). It takes `messages` (one chat through
the chat template) instead of `input`, and refuses (400) a `task` other than the engine's;
`dimensions` as for /v1/embeddings.
"""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
from fastapi.responses import JSONResponse

from jpaged.outputs import pooling_request_output
from jpaged.pooling import PoolingParams
from jpaged.server.errors import APIError, bad_request
from jpaged.server.prompts import Prompt, chat_prompt, completion_prompts, truncated
from jpaged.server.protocol import ClassificationRequest, EmbeddingRequest, PoolingRequest, random_id
from jpaged.server.serving import ServerState, collect, pooling_route_error, submit


async def create_embedding(request: EmbeddingRequest, state: ServerState) -> JSONResponse:
    """The embeddings of `request.input`, in order. Raises APIError: 400 for bad input or a
    generating engine, 503 for a full server."""
    model = state.model(request.model)
    if state.pooling_task != "embed":
        raise bad_request(pooling_route_error(state.pooling_task), param="model")
    outputs, tokens = await _pool_inputs(request, state, model, "embd")
    data = [{"index": i, "object": "embedding", "embedding": _encoded(output.outputs.embedding, request.encoding_format)}
            for i, output in enumerate(outputs)]
    return JSONResponse({"id": random_id("embd"), "object": "list", "created": int(time.time()), "model": model,
                         "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def create_classification(request: ClassificationRequest, state: ServerState) -> JSONResponse:
    """The class probabilities of each item of `request.input`, in order. Raises APIError: 400
    for bad input or an engine that does not classify, 503 for a full server."""
    model = state.model(request.model)
    if state.pooling_task != "classify":
        raise bad_request(pooling_route_error(state.pooling_task), param="model")
    outputs, tokens = await _pool_inputs(request, state, model, "classify")
    data = [{"index": i, "label": output.outputs.label, "probs": output.outputs.probs,
             "num_classes": len(output.outputs.probs)} for i, output in enumerate(outputs)]
    return JSONResponse({"id": random_id("classify"), "object": "list", "created": int(time.time()), "model": model,
                         "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                                                 "completion_tokens": 0}})


async def create_pooling(request: PoolingRequest, state: ServerState) -> JSONResponse:
    """The pooling output of each item of `request.input` (or of `request.messages`), in order.
    Raises APIError: 400 for bad input, a generating engine, another task or bad `dimensions`; 503
    for a full server."""
    model = state.model(request.model)
    if state.pooling_task is None:
        raise bad_request(pooling_route_error(None), param="model")
    if request.task is not None and request.task != state.pooling_task:
        raise bad_request(f"task {request.task!r} is not this server's: its model runs {state.pooling_task!r} (a "
                          f"server started with --pooler-config '{{\"task\": \"{request.task}\"}}' runs it, where "
                          "the model has that task)", param="task")
    if (request.input is None) == (request.messages is None):
        raise bad_request("give the inputs as either input or messages (one of the two)", param="input")
    prompts = None
    if request.messages is not None:
        prompts = [await asyncio.to_thread(chat_prompt, state.engine.tokenizer, request.messages,
                                           request.add_generation_prompt, request.continue_final_message,
                                           request.add_special_tokens, None, state.template(request),
                                           "messages cannot be rendered: send the text as input")]
    outputs, tokens = await _pool_inputs(request, state, model, "pool", prompts)
    data = [{"index": i, "object": "pooling",
             "data": _encoded(pooling_request_output(output).outputs.data, request.encoding_format)}
            for i, output in enumerate(outputs)]
    return JSONResponse({"id": random_id("pool"), "object": "list", "created": int(time.time()), "model": model,
                         "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                                                 "completion_tokens": 0}})


async def _pool_inputs(request: EmbeddingRequest | ClassificationRequest | PoolingRequest, state: ServerState,
                       model: str, prefix: str, prompts: list[Prompt] | None = None) -> tuple[list, int]:
    """Run each item of `request.input` (or each of `prompts`, rendered from `messages`) through
    the pooling engine: the outputs, in order, and the inputs' token count."""
    field = "input" if prompts is None else "messages"
    if prompts is None:
        try:
            prompts = await asyncio.to_thread(completion_prompts, request.input, state.engine.tokenizer)
        except APIError as err:
            err.param, err.message = "input", err.message.replace("prompt", "input")
            raise
    prompts = [truncated(prompt, request.truncate_prompt_tokens, state.engine.max_model_len) for prompt in prompts]
    try:
        params = PoolingParams(use_activation=request.use_activation, dimensions=getattr(request, "dimensions", None))
    except ValueError as err:
        raise bad_request(str(err), param="dimensions") from err
    group = await submit(state, random_id(prefix), prompts, [params] * len(prompts), model=model,
                         renamed={"prompt": field})
    return await collect(group), sum(len(prompt.token_ids) for prompt in prompts)


def _encoded(values, encoding_format: str) -> list | str:
    """`values` (a list or array of floats, or of rows of them) as a JSON list, or ("base64")
    their float32 bytes, little-endian, rows in order."""
    if encoding_format == "float":
        return values.tolist() if isinstance(values, np.ndarray) else values
    return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode("ascii")
