"""POST /score and POST /rerank (vLLM's scoring routes; /rerank in Jina's and Cohere's shape,
also at /v1/rerank and /v2/rerank), served by a pooling engine that scores pairs.

Both score a query against documents as `LLM.score` does (`jpaged/scoring.py`): a cross-encoder
reads each pair as one engine request, a bi-encoder embeds each text once and takes cosines.
/score answers one `score` per pair in the documents' order; /rerank answers the documents
sorted by `relevance_score`, best first, each with its `index` in the request and its `document`
text, cut to `top_n`. A cross-encoder's pairs go through the server's `--chat-template` where one
is given (a reranker's prompt format), with the request's `chat_template_kwargs` and
`instruction`. `use_activation` false gives a cross-encoder's raw logits. Usage counts the tokens of the engine's prompts. A generating engine, and a
classifier of more than one label, refuse both (400).
"""

from __future__ import annotations

import asyncio
import re
import time

from fastapi.responses import JSONResponse

from jpaged.chat_template import checked_variables
from jpaged.pooling import PoolingParams
from jpaged.scoring import (
    pair_max_length,
    pair_scores,
    pair_token_ids,
    paired,
    score_pairs,
    score_type,
    truncated_text,
)
from jpaged.server.errors import APIError, bad_request
from jpaged.server.prompts import Prompt, truncated
from jpaged.server.protocol import RerankRequest, ScoreRequest, random_id
from jpaged.server.serving import ServerState, collect, submit


async def create_score(request: ScoreRequest, state: ServerState) -> JSONResponse:
    """A score per pair of `request`'s texts. Raises APIError: 400 for bad input or an engine that
    does not score, 503 for a full server."""
    model = state.model(request.model)
    try:
        first, second = request.pair_fields()
    except ValueError as err:
        raise bad_request(str(err)) from err
    scores, tokens = await _scores(request, state, model, getattr(request, first), getattr(request, second),
                                   (first, second))
    data = [{"index": i, "object": "score", "score": score} for i, score in enumerate(scores)]
    return JSONResponse({"id": random_id("score"), "object": "list", "created": int(time.time()), "model": model,
                         "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                                                 "completion_tokens": 0}})


async def create_rerank(request: RerankRequest, state: ServerState) -> JSONResponse:
    """`request.documents` by their score against `request.query`, best first, the best
    `top_n` (all for 0). Raises APIError as `create_score`."""
    model = state.model(request.model)
    documents = [request.documents] if isinstance(request.documents, str) else request.documents
    scores, tokens = await _scores(request, state, model, request.query, documents, ("query", "documents"))
    results = sorted(({"index": i, "document": {"text": text}, "relevance_score": score}
                      for i, (text, score) in enumerate(zip(documents, scores))),
                     key=lambda result: result["relevance_score"], reverse=True)
    return JSONResponse({"id": random_id("rerank"), "model": model, "usage": {"prompt_tokens": tokens,
                                                                            "total_tokens": tokens},
                         "results": results[:request.top_n or len(results)]})


async def _scores(request: ScoreRequest | RerankRequest, state: ServerState, model: str, data_1, data_2,
                  fields: tuple[str, str]) -> tuple[list[float], int]:
    """The score of each pair, in the documents' order, and the engine prompts' token count."""
    engine = state.engine
    try:
        kind = score_type(state.pooling_task, state.classifier)
        queries, documents = score_pairs(data_1, data_2)
    except ValueError as err:
        message = str(err).replace("data_1", fields[0]).replace("data_2", fields[1])
        param = "model" if "scoring needs" in message else fields[1] if fields[1] in message.split()[0] else fields[0]
        raise bad_request(message, param=param) from err
    for name, limit in (("max_tokens_per_query", request.max_tokens_per_query),
                        ("max_tokens_per_doc", request.max_tokens_per_doc)):
        if not 0 <= limit < engine.max_model_len:
            raise bad_request(f"{name} {limit} must be at least 0 and less than max_model_len "
                              f"({engine.max_model_len})", param=name)
    tokenizer = engine.tokenizer
    queries, documents = await asyncio.to_thread(
        lambda: ([truncated_text(tokenizer, text, request.max_tokens_per_query) for text in queries],
                 [truncated_text(tokenizer, text, request.max_tokens_per_doc) for text in documents]))
    if kind == "cross-encoder":
        try:
            variables = checked_variables(request.template_variables())
        except ValueError as err:
            raise bad_request(str(err), param="chat_template_kwargs") from err
        try:
            max_length = pair_max_length(request.truncate_prompt_tokens, engine.max_model_len)
        except ValueError as err:
            raise bad_request(str(err), param="truncate_prompt_tokens") from err
        prompts = await asyncio.to_thread(_pair_prompts, tokenizer, paired(queries, documents),
                                          state.classifier.use_sep_token, state.chat_template, variables, max_length)
        names = [(f"pair {i}", fields[1]) for i in range(len(prompts))]
    else:
        prompts = await asyncio.to_thread(_text_prompts, tokenizer, queries, documents, fields)
        prompts = [truncated(prompt, request.truncate_prompt_tokens, engine.max_model_len) for prompt in prompts]
        names = [(f"{fields[0]}[{i}]", fields[0]) for i in range(len(queries))] + [
            (f"{fields[1]}[{i}]", fields[1]) for i in range(len(documents))]
    params = [PoolingParams(use_activation=request.use_activation)] * len(prompts)
    try:
        group = await submit(state, random_id("score"), prompts, params, model=model)
    except APIError as err:
        err.message, err.param = _blamed(err.message, err.param, names)
        raise
    outputs = await collect(group)
    return pair_scores(kind, outputs, len(queries)), sum(len(prompt.token_ids) for prompt in prompts)


def _blamed(message: str, param: str | None, names: list[tuple[str, str]]) -> tuple[str, str | None]:
    """An engine refusal's message and param, with "prompt i" (or, for one prompt, "prompt") told
    as the pair or text it is, and the field it came from."""
    found = re.match(r"prompt (\d+): ", message)
    index = int(found[1]) if found else 0 if len(names) == 1 else None
    if index is None:
        return message, names[-1][1] if param == "prompt" else param
    name, field = names[index]
    return f"{name}: {message[found.end():] if found else message}", field if param == "prompt" else param


def _pair_prompts(tokenizer, pairs: list[tuple[str, str]], use_sep_token: bool, chat_template: str | None,
                  variables: dict, max_length: int | None) -> list[Prompt]:
    prompts = []
    for i, (query, document) in enumerate(pairs):
        try:
            prompts.append(Prompt(pair_token_ids(tokenizer, query, document, use_sep_token, chat_template, variables,
                                                 max_length)))
        except ValueError as err:
            param = "truncate_prompt_tokens" if str(err).startswith("truncate_prompt_tokens") else None
            raise bad_request(f"pair {i}: {err}", param=param) from err
    return prompts


def _text_prompts(tokenizer, queries: list[str], documents: list[str], fields: tuple[str, str]) -> list[Prompt]:
    prompts = []
    for field, texts in zip(fields, (queries, documents)):
        for i, text in enumerate(texts):
            token_ids = tokenizer.encode(text)
            if not token_ids:
                raise bad_request(f"{field}[{i}] is empty: at least one token is needed", param=field)
            prompts.append(Prompt(token_ids, text))
    return prompts
