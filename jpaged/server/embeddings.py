"""POST /v1/embeddings (OpenAI's embeddings API), POST /classify (vLLM's classification API) and
POST /pooling (vLLM's pooling API), served by an engine with the pooling runner.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists (as a
completion's `prompt`); each item becomes one engine request that ends with its embedding
(`jpaged/pooling.py`). `encoding_format` "float" gives each embedding as a list of floats,
"base64" as its bytes in base64 (float32 in this machine's byte order by default, which the
`openai` client asks for and decodes; vLLM's `embed_dtype` and `endianness` choose others), and
vLLM's "bytes" / "bytes_only" send the bytes as the body itself, described (with "bytes") by a
`metadata` header: each vector's `start`, `end`, `shape`, `embed_dtype` and `endianness`. `dimensions` shortens a Matryoshka model's embeddings (400 for another
model). The usage counts the inputs' tokens. /classify takes the same `input` and answers, per item, its class probabilities
(`probs`, `num_classes`) and the most probable label's name (`label`, from the model's
`id2label`, else transformers' default `LABEL_<i>`); with `use_activation` false, the head's raw
logits in `probs` instead. `use_activation` false leaves an embedding unnormalised. Each route serves only the engine that does its task: a
generating engine refuses both, an embedding one /classify and a classifying one /v1/embeddings,
and a pooling one the generating routes (400s that say what the model does and where to send it).

/pooling serves every pooling engine, whatever its task: per item, the output `LLM.encode`
gives (`data`: an embedding, class probabilities, or a row per prompt token for the token-level
tasks; "base64" and the bytes formats encode the rows in order). It takes `messages` (one chat through
the chat template) instead of `input`, and refuses (400) a `task` other than the engine's;
`dimensions` as for /v1/embeddings.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time

import ml_dtypes
import numpy as np
from fastapi.responses import JSONResponse, Response

from jpaged.outputs import pooling_request_output
from jpaged.pooling import PoolingParams
from jpaged.server.errors import APIError, bad_request
from jpaged.server.prompts import Prompt, chat_prompt, completion_prompts, truncated
from jpaged.server.protocol import ClassificationRequest, EmbeddingRequest, PoolingRequest, random_id
from jpaged.server.serving import ServerState, collect, pooling_route_error, submit


async def create_embedding(request: EmbeddingRequest, state: ServerState) -> Response:
    """The embeddings of `request.input`, in order. Raises APIError: 400 for bad input or a
    generating engine, 503 for a full server."""
    model = state.model(request.model)
    if state.pooling_task != "embed":
        raise bad_request(pooling_route_error(state.pooling_task), param="model")
    outputs, tokens = await _pool_inputs(request, state, model, "embd")
    body = {"id": random_id("embd"), "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "object": "embedding"} for i in range(len(outputs))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return _respond(request, body, "embedding", [output.outputs.embedding for output in outputs])


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


async def create_pooling(request: PoolingRequest, state: ServerState) -> Response:
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
    body = {"id": random_id("pool"), "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "object": "pooling"} for i in range(len(outputs))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}
    return _respond(request, body, "data", [pooling_request_output(output).outputs.data for output in outputs])


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


EMBED_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
                "fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}


def _respond(request: EmbeddingRequest | PoolingRequest, body: dict, field: str, vectors: list) -> Response:
    """The response of a route whose `body["data"]` items each carry one of `vectors` under
    `field`, encoded as `request` asks: JSON (lists or base64 text), or the vectors' bytes as the
    body itself, one after the other, described by a `metadata` header (vLLM's "bytes"; none
    with "bytes_only")."""
    if request.encoding_format in ("float", "base64"):
        for item, values in zip(body["data"], vectors):
            item[field] = (np.asarray(values).tolist() if request.encoding_format == "float"
                           else base64.b64encode(_binary(values, request)).decode("ascii"))
        return JSONResponse(body)
    chunks, items, start = [], [], 0
    for index, values in enumerate(vectors):
        chunks.append(_binary(values, request))
        items.append({"index": index, "embed_dtype": request.embed_dtype, "endianness": request.endianness,
                      "start": start, "end": start + len(chunks[-1]), "shape": list(np.shape(values))})
        start += len(chunks[-1])
    metadata = {key: body[key] for key in ("id", "created", "model", "usage")}
    headers = {"metadata": json.dumps({**metadata, "data": items})} if request.encoding_format == "bytes" else None
    return Response(b"".join(chunks), media_type="application/octet-stream", headers=headers)


def _binary(values, request: EmbeddingRequest | PoolingRequest) -> bytes:
    """`values` (floats, or rows of them) as `request.embed_dtype` numbers in `request.endianness`
    byte order ("native": this machine's), rows in order; converted from float32 rounding to
    nearest, as torch converts."""
    array = np.asarray(values, np.float32).astype(EMBED_DTYPES[request.embed_dtype])
    raw = array.view(f"u{array.itemsize}")
    if request.endianness not in ("native", sys.byteorder):
        raw = raw.byteswap()
    return raw.tobytes()
