"""The FastAPI application: routes, the API key check, disconnect handling and error handlers.

`build_app(state)` wires the routes to the handlers (`completions`, `chat`, `responses`, `embeddings`: also
/classify; `scoring`: /score and /rerank) and the small routes
(`/v1/models`, `/health` and `/ping`, `/version`, `/metrics`, `/tokenize`, `/detokenize`). Every error leaves as an
OpenAI-shaped body (`errors`): `APIError`s with their status, request validation failures and
malformed JSON as 400 (not FastAPI's 422), unknown routes with their 404/405, and anything
unexpected as 500. When an API key is set, /v1 routes, /classify, /score and /rerank need `Authorization: Bearer <key>`.

A client that goes away is noticed while its request runs: streamed responses are cancelled by
Starlette when the connection drops; non-streamed handlers race a disconnect listener. Either way
the request's group is closed, which aborts it in the engine and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jpaged.metrics import CONTENT_TYPE
from jpaged.server.chat import create_chat_completion
from jpaged.server.completions import create_completion
from jpaged.server.embeddings import create_classification, create_embedding, create_pooling
from jpaged.server.errors import APIError, bad_request, error_body, error_type_for_status, unauthorized
from jpaged.server.protocol import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    PoolingRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from jpaged.server.responses import create_response
from jpaged.server.scoring import create_rerank, create_score
from jpaged.server.serving import ServerState
from jpaged.server.tools import template_tools

logger = logging.getLogger("jpaged.server")


def build_app(state: ServerState, manage_engine: bool = True) -> FastAPI:
    """The server's app over `state`. With `manage_engine`, the app starts the engine loop when it
    starts up and stops it when it shuts down; otherwise the caller does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            state.engine.start()
        try:
            yield
        finally:
            if manage_engine:
                state.engine.shutdown()

    app = FastAPI(title="jpaged", lifespan=lifespan)
    app.state.server = state
    _add_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_check_api_key)])
    v1.add_api_route("/completions", _completions, methods=["POST"])
    v1.add_api_route("/chat/completions", _chat_completions, methods=["POST"])
    v1.add_api_route("/responses", _responses, methods=["POST"])
    v1.add_api_route("/embeddings", _embeddings, methods=["POST"])
    v1.add_api_route("/models", _models, methods=["GET"])
    v1.add_api_route("/models/{model:path}", _model, methods=["GET"])
    if state.runtime_lora_updating:
        v1.add_api_route("/load_lora_adapter", _load_lora_adapter, methods=["POST"])
        v1.add_api_route("/unload_lora_adapter", _unload_lora_adapter, methods=["POST"])
    app.include_router(v1)
    if getattr(state.engine, "enable_sleep_mode", False):  # vLLM's sleep-mode routes
        app.add_api_route("/sleep", _sleep, methods=["POST"], dependencies=[Depends(_check_api_key)])
        app.add_api_route("/wake_up", _wake_up, methods=["POST"], dependencies=[Depends(_check_api_key)])
        app.add_api_route("/is_sleeping", _is_sleeping, methods=["GET"], dependencies=[Depends(_check_api_key)])
    if getattr(state.engine, "profiler_dir", None):  # vLLM's profiler routes
        app.add_api_route("/start_profile", _start_profile, methods=["POST"], dependencies=[Depends(_check_api_key)])
        app.add_api_route("/stop_profile", _stop_profile, methods=["POST"], dependencies=[Depends(_check_api_key)])
    for path, method in (("/health", "GET"), ("/health", "HEAD"), ("/ping", "GET"), ("/ping", "POST")):
        app.add_api_route(path, _health, methods=[method])  # a route per method: each its own OpenAPI operation
    app.add_api_route("/reset_prefix_cache", _reset_prefix_cache, methods=["POST"],
                      dependencies=[Depends(_check_api_key)])
    app.add_api_route("/version", _version, methods=["GET"])
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    app.add_api_route("/classify", _classify, methods=["POST"], dependencies=[Depends(_check_api_key)])
    app.add_api_route("/pooling", _pooling, methods=["POST"], dependencies=[Depends(_check_api_key)])
    for path in ("/score", "/v1/score"):
        app.add_api_route(path, _score, methods=["POST"], dependencies=[Depends(_check_api_key)])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.add_api_route(path, _rerank, methods=["POST"], dependencies=[Depends(_check_api_key)])
    app.add_api_route("/tokenize", _tokenize, methods=["POST"])
    app.add_api_route("/detokenize", _detokenize, methods=["POST"])
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _check_api_key(request: Request) -> None:
    key = _state(request).api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
        raise unauthorized("a valid API key is needed: send `Authorization: Bearer <key>`")


async def _completions(body: CompletionRequest, request: Request) -> Response:
    return await _respond(request, create_completion(body, _state(request)))


async def _chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _respond(request, create_chat_completion(body, _state(request)))


async def _responses(body: ResponsesRequest, request: Request) -> Response:
    return await _respond(request, create_response(body, _state(request)))


async def _embeddings(body: EmbeddingRequest, request: Request) -> Response:
    return await _respond(request, create_embedding(body, _state(request)))


async def _classify(body: ClassificationRequest, request: Request) -> Response:
    return await _respond(request, create_classification(body, _state(request)))


async def _pooling(body: PoolingRequest, request: Request) -> Response:
    return await _respond(request, create_pooling(body, _state(request)))


async def _score(body: ScoreRequest, request: Request) -> Response:
    return await _respond(request, create_score(body, _state(request)))


async def _rerank(body: RerankRequest, request: Request) -> Response:
    return await _respond(request, create_rerank(body, _state(request)))


async def _respond(request: Request, handler: Awaitable[Response | AsyncIterator[str]]) -> Response:
    """Run a generation handler until it answers or the client disconnects (then it is cancelled,
    which aborts its requests); wrap a stream of events as a server-sent event response."""
    result = await _unless_disconnected(request, handler)
    if isinstance(result, Response):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _unless_disconnected(request: Request, handler: Awaitable[Any]) -> Any:
    work = asyncio.ensure_future(handler)
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work not in done:
        work.cancel()
        logger.info("client went away before its response was ready: request aborted")
        return Response(status_code=499)
    return work.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _models(request: Request) -> ModelList:
    state = _state(request)
    return ModelList(data=[await _model(name, request) for name in (state.model_name, *state.loras)])


async def _model(model: str, request: Request) -> ModelCard:
    state = _state(request)
    name = state.model(model)
    lora = state.loras.get(name)
    if lora is None:
        return ModelCard(id=name, max_model_len=state.engine.max_model_len, root=state.engine.model_name)
    return ModelCard(id=name, max_model_len=state.engine.max_model_len, root=str(lora.lora_path),
                     parent=state.model_name)


async def _load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Response:
    """Read the adapter and serve it under its name (400 for a name taken or an adapter the
    engine cannot run). It runs on the engine loop, one change at a time."""
    state = _state(request)
    lora = await state.engine.call(lambda engine: state.load_lora(engine, body.lora_name, body.lora_path))
    return Response(f"Success: LoRA adapter '{lora.lora_name}' added successfully.", media_type="text/plain")


async def _unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Response:
    """Stop serving the adapter (404 for a name not served; 400 while requests use it)."""
    state = _state(request)
    await state.engine.call(lambda engine: state.unload_lora(engine, body.lora_name))
    return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")


async def _sleep(request: Request, level: str = "1") -> Response:
    """`POST /sleep?level=1` (weights kept in host memory) or `level=2` (weights discarded, read
    again from the model's files by `/wake_up`): free the engine's device memory until
    `/wake_up` (400 while requests are unfinished, or for another level)."""
    try:
        number = int(level)
    except ValueError:
        raise bad_request(f"level must be an integer, got {level!r:.50}", param="level") from None
    await _on_engine(request, lambda engine: engine.sleep(number))
    return Response(status_code=200)


async def _wake_up(request: Request) -> Response:
    """`POST /wake_up` (optionally `?tags=weights&tags=kv_cache`): give back what `/sleep` freed."""
    tags = request.query_params.getlist("tags") or None
    await _on_engine(request, lambda engine: engine.wake_up(tags))
    return Response(status_code=200)


async def _start_profile(request: Request) -> Response:
    """`POST /start_profile`: start a jax profiler trace under `--profiler-dir` (400 while one runs)."""
    await _on_engine(request, lambda engine: engine.start_profile())
    return Response(status_code=200)


async def _stop_profile(request: Request) -> Response:
    """`POST /stop_profile`: end the trace and write it (400 where none runs)."""
    await _on_engine(request, lambda engine: engine.stop_profile())
    return Response(status_code=200)


async def _reset_prefix_cache(request: Request) -> Response:
    """`POST /reset_prefix_cache` (vLLM's): drop the prefix cache's blocks that no running request
    holds, as before timing a cold prompt."""
    await _on_engine(request, lambda engine: engine.reset_prefix_cache())
    return Response(status_code=200)


async def _is_sleeping(request: Request) -> dict:
    return {"is_sleeping": await _on_engine(request, lambda engine: engine.is_sleeping())}


async def _on_engine(request: Request, call):
    """`call(engine)` on the engine loop; its ValueError as a 400."""
    try:
        return await _state(request).engine.call(call)
    except ValueError as err:
        raise bad_request(str(err)) from err


async def _health(request: Request) -> Response:
    if not _state(request).engine.is_running:
        return JSONResponse(error_body("the engine loop is not running", "server_error"), status_code=503)
    return Response(status_code=200)


async def _version() -> dict:
    return {"version": importlib.metadata.version("jpaged")}


async def _metrics(request: Request) -> Response:
    state = _state(request)
    stats = await state.engine.call(lambda engine: engine.stats())
    return Response(state.metrics.render(stats), media_type=CONTENT_TYPE)


async def _tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _state(request)
    state.model(body.model)
    tokenizer = state.engine.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise APIError("give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        tokens = (await state.chat_prompt(body.messages, body.add_generation_prompt, body.continue_final_message,
                                          bool(body.add_special_tokens), template_tools(body),
                                          template=state.template(body))).token_ids
    else:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = await asyncio.to_thread(tokenizer.encode, body.prompt, add_special_tokens=add_special)
    strings = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=state.engine.max_model_len, tokens=tokens,
                            token_strs=strings)


async def _detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = _state(request)
    state.model(body.model)
    vocab = len(state.engine.tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(f"tokens {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(body.tokens))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(err)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = str(err.detail)
        if err.status_code == 400 and err.__cause__ is not None:  # JSON the parser could not take in
            message = f"the body could not be read as JSON: {err.__cause__}"
        return JSONResponse(error_body(message, error_type_for_status(err.status_code)),
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        return JSONResponse(error_body(f"internal server error: {err!r}", "server_error"), status_code=500)


def _describe_validation(err: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending field for a body that failed validation."""
    problems, param = [], None
    for item in err.errors():
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        if item.get("type") == "json_invalid":
            reason = (item.get("ctx") or {}).get("error") or item.get("msg")
            where = f" at character {location[0]}" if location else ""
            problems.append(f"the body is not valid JSON: {reason}{where}")
            continue
        if not location and item.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            problems.append("the body must be a JSON object, sent with Content-Type: application/json")
            continue
        field = ".".join(location)
        param = param or (location[0] if location else (item.get("ctx") or {}).get("param"))
        problems.append(f"{field or 'body'}: {item.get('msg')}")
    return "; ".join(problems[:5]) or "the request body is invalid", param
