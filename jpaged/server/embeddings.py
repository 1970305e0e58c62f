"""POST /v1/embeddings: OpenAI's embeddings API, served by an engine with the pooling runner.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists (as a
completion's `prompt`); each item becomes one engine request that ends with its embedding
(`jpaged/pooling.py`). `encoding_format` "float" gives each embedding as a list of floats,
"base64" as its float32 bytes (little-endian) in base64, which the `openai` client asks for by
default and decodes. `dimensions` (shortened embeddings) is refused. The usage counts the inputs'
tokens. A server whose engine generates refuses this route, and one whose engine embeds refuses
the generating routes (400s that say which runner the model runs).
"""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
from fastapi.responses import JSONResponse

from jpaged.server.errors import APIError, bad_request
from jpaged.server.prompts import completion_prompts, truncated
from jpaged.server.protocol import EmbeddingRequest, random_id
from jpaged.server.serving import ServerState, collect, submit


async def create_embedding(request: EmbeddingRequest, state: ServerState) -> JSONResponse:
    """The embeddings of `request.input`, in order. Raises APIError: 400 for bad input or a
    generating engine, 503 for a full server."""
    model = state.model(request.model)
    if not state.pooling:
        raise bad_request(f"the model `{model}` generates text; /v1/embeddings needs a server started with "
                          "--runner pooling", param="model")
    if request.dimensions is not None:
        raise bad_request(f"dimensions {request.dimensions} is not supported: embeddings have the model's hidden size",
                          param="dimensions")
    try:
        prompts = await asyncio.to_thread(completion_prompts, request.input, state.engine.tokenizer)
    except APIError as err:
        err.param, err.message = "input", err.message.replace("prompt", "input")
        raise
    prompts = [truncated(prompt, request.truncate_prompt_tokens, state.engine.max_model_len) for prompt in prompts]
    group = await submit(state, random_id("embd"), prompts, [None] * len(prompts), model=model,
                         renamed={"prompt": "input"})
    outputs = await collect(group)
    data = [{"index": i, "object": "embedding", "embedding": _encoded(output.outputs.embedding, request.encoding_format)}
            for i, output in enumerate(outputs)]
    tokens = sum(len(prompt.token_ids) for prompt in prompts)
    return JSONResponse({"id": random_id("embd"), "object": "list", "created": int(time.time()), "model": model,
                         "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _encoded(embedding: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return embedding
    return base64.b64encode(np.asarray(embedding, "<f4").tobytes()).decode("ascii")
