"""POST /v1/embeddings (OpenAI's embeddings API) and POST /classify (vLLM's classification API),
served by an engine with the pooling runner.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists (as a
completion's `prompt`); each item becomes one engine request that ends with its embedding
(`jpaged/pooling.py`). `encoding_format` "float" gives each embedding as a list of floats,
"base64" as its float32 bytes (little-endian) in base64, which the `openai` client asks for by
default and decodes. `dimensions` (shortened embeddings) is refused. The usage counts the inputs'
tokens. /classify takes the same `input` and answers, per item, its class probabilities
(`probs`, `num_classes`) and the most probable label's name (`label`, from the model's
`id2label`, else transformers' default `LABEL_<i>`); with `use_activation` false, the head's raw
logits in `probs` instead. `use_activation` false leaves an embedding unnormalised. Each route serves only the engine that does its task: a
generating engine refuses both, an embedding one /classify and a classifying one /v1/embeddings,
and a pooling one the generating routes (400s that say what the model does and where to send it).
"""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
from fastapi.responses import JSONResponse

from jpaged.pooling import PoolingParams
from jpaged.server.errors import APIError, bad_request
from jpaged.server.prompts import completion_prompts, truncated
from jpaged.server.protocol import ClassificationRequest, EmbeddingRequest, random_id
from jpaged.server.serving import ServerState, collect, pooling_route_error, submit


async def create_embedding(request: EmbeddingRequest, state: ServerState) -> JSONResponse:
    """The embeddings of `request.input`, in order. Raises APIError: 400 for bad input or a
    generating engine, 503 for a full server."""
    model = state.model(request.model)
    if state.pooling_task != "embed":
        raise bad_request(pooling_route_error(state.pooling_task), param="model")
    if request.dimensions is not None:
        raise bad_request(f"dimensions {request.dimensions} is not supported: embeddings have the model's hidden size",
                          param="dimensions")
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


async def _pool_inputs(request: EmbeddingRequest | ClassificationRequest, state: ServerState, model: str,
                       prefix: str) -> tuple[list, int]:
    """Run each item of `request.input` through the pooling engine: the outputs, in order, and
    the inputs' token count."""
    try:
        prompts = await asyncio.to_thread(completion_prompts, request.input, state.engine.tokenizer)
    except APIError as err:
        err.param, err.message = "input", err.message.replace("prompt", "input")
        raise
    prompts = [truncated(prompt, request.truncate_prompt_tokens, state.engine.max_model_len) for prompt in prompts]
    params = PoolingParams(use_activation=request.use_activation)
    group = await submit(state, random_id(prefix), prompts, [params] * len(prompts), model=model,
                         renamed={"prompt": "input"})
    return await collect(group), sum(len(prompt.token_ids) for prompt in prompts)


def _encoded(embedding: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return embedding
    return base64.b64encode(np.asarray(embedding, "<f4").tobytes()).decode("ascii")
