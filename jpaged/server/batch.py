"""`jpaged run-batch`: answer a file of OpenAI batch requests offline, each as the server would.

The input is OpenAI's Batch API file (also vLLM's `run-batch` input): JSON lines
`{"custom_id", "method": "POST", "url", "body"}`. Each body goes to the server app's own route for
its `url` (`create_app`), in process through an ASGI transport, no socket: every route, check and
answer is the server's. Up to `LINES_IN_FLIGHT` lines run at once, so the engine batches them; a
line the server cannot take yet (503, its queue of sequences full) waits for others to finish
and is sent again, while one that alone draws more sequences than the queue holds is refused as
the server refuses it. Answers are JSON, so the bytes encodings of the embedding routes are
refused.
The output gets one JSON line per input line, in input order, written as soon as the lines before
it are done: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`,
the body being what the route answered (an OpenAI error body for a refused line, whose `error`
then holds that error's `code` and `message` too, as OpenAI's batch error objects do).
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm import tqdm

from jpaged.server.errors import error_body

LINES_IN_FLIGHT = 256  # lines answered at once; the engine's own limits (max_num_seqs, KV blocks) queue the rest
RETRY_WAIT_S = 0.05  # before sending again a line the full queue refused
NOT_API_ROUTES = ("/ping",)  # a liveness probe, not an API call


class BatchRequestLine(BaseModel):
    """One input line (OpenAI's batch request input object)."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


def read_batch(path: str | Path) -> list[BatchRequestLine]:
    """The lines of a batch input file ("-": standard input); blank lines are skipped.

    Raises:
        ValueError: naming the line number, for a line that is not such an object (not JSON, a
            field missing or of the wrong type, a method other than POST, an unknown field), a
            `custom_id` used twice, or a file with no line at all.
        OSError: the file cannot be read.
    """
    try:
        text = (sys.stdin.buffer.read() if str(path) == "-" else Path(path).read_bytes()).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); a batch file is JSON lines") from None
    lines, seen = [], {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = BatchRequestLine.model_validate_json(raw)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in err.errors()[:3])
            raise ValueError(f"{path}, line {number}: not a batch request line ({problems}); each line is "
                             '{"custom_id": ..., "method": "POST", "url": ..., "body": {...}}') from None
        if line.custom_id in seen:
            raise ValueError(f"{path}, line {number}: custom_id {line.custom_id!r} is already used on line "
                             f"{seen[line.custom_id]}; each line needs its own")
        seen[line.custom_id] = number
        lines.append(line)
    if not lines:
        raise ValueError(f"{path} holds no batch request line")
    return lines


def run_batch(app: FastAPI, lines: list[BatchRequestLine], output: TextIO, use_tqdm: bool = True) -> int:
    """Answer `lines` through `app`'s routes, writing one output line per input line to `output`
    in input order; the engine loop runs only meanwhile. Returns how many lines were answered
    with an error status."""
    return asyncio.run(_run(app, lines, output, use_tqdm))


async def _run(app: FastAPI, lines: list[BatchRequestLine], output: TextIO, use_tqdm: bool) -> int:
    slots = asyncio.Semaphore(LINES_IN_FLIGHT)
    routes = [path for path, operations in app.openapi()["paths"].items()
              if "post" in operations and path not in NOT_API_ROUTES]
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is the 500 the app answers
    with tqdm(total=len(lines), unit="req", desc="Running batch", disable=not use_tqdm) as bar:

        async def answer(line: BatchRequestLine) -> dict:
            async with slots:
                result = await _answer(client, line, routes)
            bar.update()
            return result

        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=transport, base_url="http://jpaged-batch", timeout=None) as client:
            tasks = [asyncio.ensure_future(answer(line)) for line in lines]
            failed = 0
            try:
                for task in tasks:
                    result = await task
                    failed += result["error"] is not None
                    output.write(json.dumps(result, ensure_ascii=False) + "\n")
                    output.flush()
            finally:
                for task in tasks:
                    task.cancel()
    return failed


async def _answer(client: httpx.AsyncClient, line: BatchRequestLine, routes: list[str]) -> dict:
    if line.url not in routes:
        status, body = 404, error_body(f"no route takes POST {line.url}; batch lines may go to {', '.join(routes)}",
                                       "invalid_request_error", "url")
    elif line.body.get("stream") is True:
        status, body = 400, error_body("a batch line is answered whole: `stream` must be false", "invalid_request_error",
                                       "stream")
    elif line.body.get("encoding_format") in ("bytes", "bytes_only"):
        status, body = 400, error_body(f"encoding_format {line.body['encoding_format']!r} answers with raw bytes; a "
                                       "batch line's answer is JSON: use 'float' or 'base64'", "invalid_request_error",
                                       "encoding_format")
    else:
        status, body = await _posted(client, line)
    error = body.get("error") if status != 200 and isinstance(body, dict) else None
    if status != 200 and not isinstance(error, dict):
        error = {"message": f"HTTP {status}", "code": None}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": None if error is None else {"code": error.get("code") or error.get("type"),
                                                 "message": error.get("message")}}


async def _posted(client: httpx.AsyncClient, line: BatchRequestLine) -> tuple[int, Any]:
    """The route's status and JSON answer to `line`, sent again while the server's queue is full."""
    while True:
        response = await client.post(line.url, json=line.body)
        if response.status_code != 503 or _error_code(response) != "server_overloaded":
            break
        await asyncio.sleep(RETRY_WAIT_S)
    try:
        return response.status_code, response.json()
    except ValueError:
        ok = response.status_code == 200
        return response.status_code, {"text": response.text} if ok else error_body(response.text, "server_error")


def _error_code(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
