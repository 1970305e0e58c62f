"""`jpaged serve`: build the engine, put the asyncio front end and the app on it, run uvicorn.

`create_app` is the whole server over an engine that already exists (tests and embedding use
it); `serve` is the command, reading the CLI's engine and server flags (`jpaged/cli.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from jpaged.chat_template import checked_template, read_chat_template
from jpaged.engine_client import EngineClient
from jpaged.images import MediaAccess, check_content_format
from jpaged.lora import LoRARequest
from jpaged.metrics import Metrics
from jpaged.server.app import build_app
from jpaged.server.async_engine import AsyncEngine
from jpaged.server.errors import APIError
from jpaged.server.serving import ServerState
from jpaged.server.tool_parsers import tool_parser

logger = logging.getLogger("jpaged.server")

API_KEY_ENV = "JPAGED_API_KEY"


def create_app(engine: EngineClient, served_model_name: str | None = None, api_key: str | None = None,
               max_queued_requests: int = 256, allowed_origins: list[str] | None = None,
               chat_template: str | None = None, trust_request_chat_template: bool = False,
               tool_call_parser: str | None = None, lora_modules: list[LoRARequest] | None = None,
               allow_runtime_lora_updating: bool = False, return_tokens_as_token_ids: bool = False,
               allowed_local_media_path: str | None = None, chat_template_content_format: str = "auto",
               allowed_media_domains: list[str] | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine`; its engine loop starts and stops with the app.

    Args:
        engine: the engine to serve; once the app starts, only its loop thread calls it.
        served_model_name: the model's name in the API (default: `engine.model_name`).
        api_key: when set, /v1 routes need `Authorization: Bearer <api_key>`.
        max_queued_requests: most engine requests held at once (>= 1); more get HTTP 503.
        allowed_origins: web origins whose pages may call the server from a browser (CORS;
            "*" for any); None or empty: none.
        chat_template: Jinja text of the chat template (default: the tokenizer's).
        trust_request_chat_template: whether a request may bring its own `chat_template`.
        tool_call_parser: the model family's tool-call syntax (`tool_parsers.TOOL_PARSERS`), which
            serves `tool_choice: "auto"`; None: "auto" is refused.
        lora_modules: LoRA adapters served under their `lora_name`s (the engine needs
            `enable_lora`); each is read before the app is made.
        allow_runtime_lora_updating: whether `POST /v1/load_lora_adapter` and
            `/v1/unload_lora_adapter` (vLLM's) may add and remove adapters while serving.
        return_tokens_as_token_ids: name logprobs' tokens `token_id:N` where a request does not
            say (its `return_tokens_as_token_ids`).
        allowed_local_media_path: a folder whose images chat requests may name by path or
            `file://` URL (vLLM's); None: requests' images come as data or http(s) URLs only.
        chat_template_content_format: how the chat template takes message contents (vLLM's):
            "string", "openai" (lists of parts) or "auto" (`jpaged.images.CONTENT_FORMATS`).
        allowed_media_domains: the hosts whose http(s) image URLs chat requests may name (vLLM's);
            None: any host.

    Raises:
        ValueError: for an unknown `tool_call_parser`, a `chat_template` that does not parse, a
            LoRA adapter the engine cannot run, or whose name is taken, an
            `allowed_local_media_path` that is not a folder, an unknown content format, or an
            `allowed_media_domains` entry that is not a host.
    """
    if allowed_local_media_path is not None and not Path(allowed_local_media_path).is_dir():
        raise ValueError(f"allowed_local_media_path {allowed_local_media_path!r} is not a folder")
    check_content_format(chat_template_content_format)
    name = served_model_name or engine.model_name
    parser = tool_parser(tool_call_parser) if tool_call_parser else None
    chat_template = checked_template(chat_template) if chat_template is not None else None
    metrics = Metrics(name)
    front = AsyncEngine(engine, max_queued_requests, on_finished=metrics.observe_finished,
                        on_aborted=metrics.observe_aborted)
    state = ServerState(front, name, metrics, api_key or None, chat_template, trust_request_chat_template, parser,
                        engine.reasoning_parser, engine.pooling_task, dict(engine.default_sampling_params),
                        classifier=engine.classifier, runtime_lora_updating=allow_runtime_lora_updating,
                        return_tokens_as_token_ids=return_tokens_as_token_ids,
                        media=MediaAccess(None if allowed_local_media_path is None else Path(allowed_local_media_path),
                                          _media_hosts(allowed_media_domains)),
                        chat_template_content_format=chat_template_content_format)
    for lora in lora_modules or ():  # the engine loop has not started: the engine is called here
        try:
            state.load_lora(engine, lora.lora_name, lora.lora_path, lora.lora_int_id)
        except APIError as err:
            raise ValueError(f"LoRA module {lora.lora_name!r}: {err.message}") from err
    app = build_app(state)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])
    return app


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; the exit status."""
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    template = _checked_app_flags(args)
    check_can_listen(args.host, args.port)  # before the model loads
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = _app_from_flags(args, template, api_key=api_key, max_queued_requests=args.max_queued_requests,
                          allowed_origins=args.allowed_origins)
    engine = app.state.server.engine.engine
    logging.getLogger("jpaged.server").setLevel(logging.INFO)
    logger.info("serving %s on http://%s:%d/v1 (%s)", app.state.server.model_name, args.host, args.port,
                "API key required" if api_key else "no API key")
    if engine.default_sampling_params:
        logger.warning("requests that leave them unset take the model's generation_config.json sampling defaults "
                       "%s (--generation-config none keeps the usual ones)", engine.default_sampling_params)
    front = app.state.server.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # Ctrl-C / SIGTERM: end open responses first
            front.stop_requests()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)).run()
    return 0


def run_batch_file(args: argparse.Namespace) -> int:
    """`jpaged run-batch`: answer the input file's lines into the output file (`batch.py`; "-":
    standard output); the exit status, 1 when any line was answered with an error."""
    from jpaged.server.batch import read_batch, run_batch

    template = _checked_app_flags(args)
    lines = read_batch(args.input_file)  # a malformed file is refused before the model loads
    with contextlib.ExitStack() as stack:
        output = sys.stdout if args.output_file == "-" else stack.enter_context(
            open(args.output_file, "w", encoding="utf-8"))  # an unwritable path too, before the model loads
        app = _app_from_flags(args, template, max_queued_requests=args.max_queued_requests)
        failed = run_batch(app, lines, output)
    logger.warning("%d of %d batch lines answered to %s%s", len(lines) - failed, len(lines), args.output_file,
                   f"; {failed} refused (their error is in their line)" if failed else "")
    return 1 if failed else 0


def _checked_app_flags(args: argparse.Namespace) -> str | None:
    """Check the app flags `serve` and `run-batch` share against each other and the runner, before
    the model loads; the chat template's text, if one is given."""
    if args.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be >= 1, got {args.max_queued_requests}")
    if args.enable_auto_tool_choice != (args.tool_call_parser is not None):
        raise ValueError("--enable-auto-tool-choice and --tool-call-parser go together: the parser reads the "
                         "model's tool calls under tool_choice \"auto\"")
    if args.runner == "pooling":
        flags = [flag for flag, given in (("--enable-auto-tool-choice", args.enable_auto_tool_choice),
                                          ("--tool-call-parser", args.tool_call_parser is not None),
                                          ("--reasoning-parser", args.reasoning_parser is not None)) if given]
        if flags:
            raise ValueError(f"{', '.join(flags)} shape generated replies; --runner pooling serves "
                             "/v1/embeddings, /classify, /score, /rerank and /pooling only")
    if (args.lora_modules or getattr(args, "allow_runtime_lora_updating", False)) and not args.enable_lora:
        flag = "--lora-modules" if args.lora_modules else "--allow-runtime-lora-updating"
        raise ValueError(f"{flag} needs --enable-lora")
    return read_chat_template(args.chat_template) if args.chat_template else None


def _app_from_flags(args: argparse.Namespace, template: str | None, **server) -> FastAPI:
    """Load the model of the engine flags and make the app over it with the app flags and `server`'s
    `create_app` arguments."""
    from jpaged.cli import engine_kwargs
    from jpaged.llm import build_engine

    engine = build_engine(args.model, **engine_kwargs(args))
    return create_app(engine, args.served_model_name, chat_template=template,
                      trust_request_chat_template=args.trust_request_chat_template,
                      tool_call_parser=args.tool_call_parser,
                      lora_modules=[LoRARequest(name, i, path)
                                    for i, (name, path) in enumerate(args.lora_modules or (), start=1)],
                      allow_runtime_lora_updating=getattr(args, "allow_runtime_lora_updating", False),
                      return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                      allowed_local_media_path=args.allowed_local_media_path,
                      allowed_media_domains=args.allowed_media_domains,
                      chat_template_content_format=args.chat_template_content_format, **server)


def _media_hosts(domains: list[str] | None) -> frozenset[str] | None:
    """`allowed_media_domains` as the host names URLs are matched by (lower case, an IPv6 address
    without brackets). ValueError for an entry that is not a host (a port, a path, a scheme)."""
    if domains is None:
        return None
    hosts = set()
    for domain in domains:
        host = domain.strip().lower().removeprefix("[").removesuffix("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            if not host or any(mark in host for mark in ":/@?#"):
                raise ValueError(f"allowed_media_domains entry {domain!r} is not a host name or address (give the "
                                 "host alone, without scheme, port or path)") from None
        hosts.add(host)
    return frozenset(hosts)


def check_can_listen(host: str, port: int) -> None:
    """Raise OSError naming `host:port` when the server could not listen there (in use, or not
    this machine's address)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --host or --port") from err
