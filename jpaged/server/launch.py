"""`jpaged serve`: build the engine, put the asyncio front end and the app on it, run uvicorn.

`create_app` is the whole server over an engine that already exists (tests and embedding use
it); `serve` is the command, reading the CLI's engine and server flags (`jpaged/cli.py`).
"""

from __future__ import annotations

import argparse
import logging
import os

from fastapi import FastAPI

from jpaged.engine_client import EngineClient
from jpaged.server.app import build_app
from jpaged.server.async_engine import AsyncEngine
from jpaged.server.metrics import ServerMetrics
from jpaged.server.serving import ServerState

logger = logging.getLogger("jpaged.server")

API_KEY_ENV = "JPAGED_API_KEY"


def create_app(engine: EngineClient, served_model_name: str | None = None, api_key: str | None = None,
               max_queued_requests: int = 256) -> FastAPI:
    """The OpenAI-compatible app over `engine`; its engine loop starts and stops with the app.

    Args:
        engine: the engine to serve; once the app starts, only its loop thread calls it.
        served_model_name: the model's name in the API (default: `engine.model_name`).
        api_key: when set, /v1 routes need `Authorization: Bearer <api_key>`.
        max_queued_requests: most engine requests held at once (>= 1); more get HTTP 503.
    """
    name = served_model_name or engine.model_name
    metrics = ServerMetrics(name)
    front = AsyncEngine(engine, max_queued_requests, on_finished=metrics.observe_finished,
                        on_aborted=metrics.observe_aborted)
    return build_app(ServerState(front, name, metrics, api_key or None))


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; the exit status."""
    import uvicorn

    from jpaged.cli import engine_kwargs
    from jpaged.llm import build_engine

    if args.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be >= 1, got {args.max_queued_requests}")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    engine = build_engine(args.model, **engine_kwargs(args))
    app = create_app(engine, args.served_model_name, api_key, args.max_queued_requests)
    logging.getLogger("jpaged.server").setLevel(logging.INFO)
    logger.info("serving %s on http://%s:%d/v1 (%s)", app.state.server.model_name, args.host, args.port,
                "API key required" if api_key else "no API key")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
