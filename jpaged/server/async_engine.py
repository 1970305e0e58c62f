"""The asyncio front end of the engine: one background thread steps it while requests come and go.

The engine is not thread-safe, so only the loop thread touches it. Request handlers, on the
event loop, hand it commands through a thread-safe queue (add a group of requests, abort one, run
a function such as `stats`) and wake it; the loop thread runs pending commands between steps,
steps while anything is unfinished and sleeps otherwise. Each HTTP request's engine requests form
a `RequestGroup` with one asyncio queue, which the loop thread feeds through
`loop.call_soon_threadsafe`. Closing a group (the handler finished, or its client went away)
aborts its unfinished requests, which frees their KV blocks at once.

Back-pressure: at most `max_queued_requests` sequences are held at a time (an engine request
counts once per sample it draws, `n` or `best_of`); beyond that `add` raises `ServerOverloaded`
at once instead of queueing without bound. An exception from one
request's `add_request` fails that request only; an exception from a step fails the requests the
engine held (it cannot tell which one caused it), aborts them, and the loop keeps serving.
When the server is told to stop, every request in flight fails the same way (`ServerStopping`),
so that its response ends at once with an error instead of being cut off.
Plain Python over the `EngineClient` interface: importing this starts no jax.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from jpaged.config import QwenVisionConfig, VisionConfig
from jpaged.engine_client import EngineClient, PromptType
from jpaged.lora import LoRARequest
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams

logger = logging.getLogger("jpaged.server")

IDLE_STEP_WAIT_S = 0.002  # pause after a step that scheduled nothing, rather than spin


class ServerOverloaded(Exception):
    """The server already holds `max_queued_requests` sequences."""


class TooManySequences(ValueError):
    """One request draws more sequences than `max_queued_requests`: it could never be served.
    `param` is the request field to blame ("n" for samples, "prompt" for prompts)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class EngineStepError(RuntimeError):
    """A step of the engine failed while this request was in it."""


class ServerStopping(EngineStepError):
    """The server is shutting down: the request was aborted before it finished."""


class RequestGroup:
    """The engine requests of one HTTP request (one per prompt), streamed back together.

    Iterate it (`async for index, output in group`) to get each request's cumulative
    `RequestOutput` as it advances; when outputs pile up faster than they are read, only the
    latest per request is yielded (each holds all text and tokens so far). Iteration ends once
    every request has finished; `EngineStepError` is raised if a step failed. `close()` aborts
    whatever has not finished and gives back the group's places in the queue; it is idempotent.
    """

    def __init__(self, front: AsyncEngine, request_ids: list[str], loop: asyncio.AbstractEventLoop, places: int):
        self.request_ids = request_ids
        self.places = places  # its sequences, counted against max_queued_requests
        self._front, self._loop = front, loop
        self._queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
        self._unfinished = set(range(len(request_ids)))
        self._closed = False

    def push(self, item: tuple[int, RequestOutput] | BaseException) -> None:
        """Called by the loop thread: deliver an output or an error to the event loop."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._unfinished:
            latest = self._latest([await self._queue.get()])
            for index in sorted(latest):
                output = latest[index]
                if output.finished:
                    self._unfinished.discard(index)
                    if not self._unfinished:
                        self.close()  # give the places back before the last output goes out
                yield index, output

    def _latest(self, items: list) -> dict[int, RequestOutput]:
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        latest: dict[int, RequestOutput] = {}
        for item in items:
            if isinstance(item, BaseException):
                self.close()
                raise item
            latest[item[0]] = item[1]
        return latest

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        unfinished = [self.request_ids[i] for i in sorted(self._unfinished)]
        self._front._release(self.places, unfinished)


class AsyncEngine:
    """Runs `engine` on a background thread for asyncio request handlers.

    Args:
        engine: the engine; after `start()` only the loop thread calls it. Its `tokenizer`,
            `model_name` and `max_model_len` are read-only and may be used anywhere.
        max_queued_requests: most sequences held at once (running or waiting; a request counts
            once per sample), >= 1.
        on_finished: called on the loop thread with every finished `RequestOutput` (metrics).
        on_aborted: called on the loop thread with the id of every request it aborts (its client
            left, or a step failed).
    """

    def __init__(self, engine: EngineClient, max_queued_requests: int = 256,
                 on_finished: Callable[[RequestOutput], None] | None = None,
                 on_aborted: Callable[[str], None] | None = None):
        if max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {max_queued_requests}")
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._on_finished, self._on_aborted = on_finished, on_aborted
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._groups: dict[str, tuple[RequestGroup, int]] = {}  # loop thread only: request id -> (group, index)
        self._held = 0  # event loop only: places taken by open groups
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="jpaged-engine-loop", daemon=True)

    @property
    def tokenizer(self) -> Any:
        """The engine's HF tokenizer (read-only use is safe from any thread)."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        """The model as the engine was given it (a path or hub id)."""
        return self.engine.model_name

    @property
    def vision_config(self) -> VisionConfig | QwenVisionConfig | None:
        return self.engine.vision_config

    @property
    def max_images(self) -> int | None:
        return self.engine.max_images

    @property
    def interleave_mm_strings(self) -> bool:
        return self.engine.interleave_mm_strings

    @property
    def enable_sleep_mode(self) -> bool:
        return getattr(self.engine, "enable_sleep_mode", False)

    @property
    def profiler_dir(self) -> str | None:
        return getattr(self.engine, "profiler_dir", None)

    @property
    def enable_prompt_embeds(self) -> bool:
        return self.engine.enable_prompt_embeds

    @property
    def num_held_requests(self) -> int:
        """Sequences the server holds now (what `max_queued_requests` bounds)."""
        return self._held

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop thread after the step in progress; unfinished requests are abandoned."""
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stop_requests(self) -> None:
        """Abort every request in flight, failing each group with `ServerStopping` (so that open
        responses end now, before the server stops); callable from any thread, a signal handler's
        included."""
        if self.is_running:
            self._submit(lambda: self._fail_all(ServerStopping("the server is shutting down")))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    async def add(self, request_id: str, requests: list[tuple[PromptType, SamplingParams]],
                  priority: int = 0, lora_request: LoRARequest | Callable[[], LoRARequest | None] | None = None
                  ) -> RequestGroup:
        """Queue `requests` (prompt, params) as `request_id-0`, `request_id-1`, ..., each with
        `priority` and `lora_request` (or what that function returns on the loop thread, just
        before they are added; its errors are raised here), and return their group.

        Raises:
            ServerOverloaded: taking them would exceed `max_queued_requests` sequences now.
            TooManySequences (a ValueError): they draw more samples than `max_queued_requests`.
            ValueError: the engine refused one (none of them is then queued); the message names
                the prompt when there are several.
        """
        counts = [params.num_samples if isinstance(params, SamplingParams) else 1 for _, params in requests]
        places = sum(counts)
        if places > self.max_queued_requests:
            samples = max(counts)
            if len(requests) == 1:
                what = f"{samples} samples (n / best_of)"
            else:
                what = f"{len(requests)} prompts" + (f" of up to {samples} samples each" if samples > 1 else "")
            raise TooManySequences(f"{what} in one request exceed the server's limit of {self.max_queued_requests} "
                                   "sequences in flight (--max-queued-requests)", "n" if samples > 1 else "prompt")
        if self._held + places > self.max_queued_requests:
            raise ServerOverloaded(
                f"the server is at its limit of {self.max_queued_requests} sequences in flight "
                f"(--max-queued-requests); retry later")
        self._held += places
        loop = asyncio.get_running_loop()
        group = RequestGroup(self, [f"{request_id}-{i}" for i in range(len(requests))], loop, places)
        try:
            await self.call(lambda engine: self._add_group(engine, group, requests, priority, lora_request))
        except BaseException as err:
            self._held -= places
            if isinstance(err, asyncio.CancelledError):  # the add may still run: undo it after
                self._submit(lambda: self._abort(group.request_ids))
            raise
        return group

    async def call(self, fn: Callable[[EngineClient], Any]) -> Any:
        """Run `fn(engine)` on the loop thread between steps and return its result (or raise its error)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run() -> None:
            try:
                result, error = fn(self.engine), None
            except Exception as err:
                result, error = None, err
            loop.call_soon_threadsafe(_settle, future, result, error)

        self._submit(run)
        return await future

    def _release(self, count: int, unfinished: list[str]) -> None:
        """A group closed: free its places now, and abort its unfinished requests on the loop thread."""
        self._held -= count
        if unfinished and self.is_running:
            self._submit(lambda: self._abort(unfinished))

    def _submit(self, command: Callable[[], None]) -> None:
        if not self.is_running:
            raise RuntimeError("the engine loop is not running")
        self._commands.put(command)
        self._wakeup.set()

    # Everything below runs on the loop thread.

    def _add_group(self, engine: EngineClient, group: RequestGroup, requests: list, priority: int,
                   lora_request) -> None:
        added = []
        if callable(lora_request):
            lora_request = lora_request()
        try:
            for request_id, (prompt, params) in zip(group.request_ids, requests):
                engine.add_request(request_id, prompt, params, priority, lora_request)
                added.append(request_id)
        except Exception as err:
            for request_id in added:
                engine.abort_request(request_id)
            if len(requests) > 1 and isinstance(err, ValueError):
                raise ValueError(f"prompt {len(added)}: {err}") from err
            raise
        for index, request_id in enumerate(group.request_ids):
            self._groups[request_id] = (group, index)

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self._groups.pop(request_id, None) is not None:
                self.engine.abort_request(request_id)
                self._notify(self._on_aborted, request_id)

    def _run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            self._run_commands()
            if self._stopping:
                break
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait()
            elif not self._step():
                self._wakeup.wait(IDLE_STEP_WAIT_S)

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            except Exception:  # a command's own errors go to its caller; this is a bug in the loop
                logger.exception("engine loop command failed")

    def _step(self) -> bool:
        """One engine step, its outputs delivered; False when nothing could be scheduled."""
        try:
            outputs = self.engine.step()
        except Exception as err:
            logger.exception("engine step failed; failing the %d requests it held", len(self._groups))
            self._fail_all(EngineStepError(f"the engine failed while running this request: {err!r}"))
            return True
        for output in outputs:
            self._deliver(output)
        return bool(outputs)

    def _deliver(self, output: RequestOutput) -> None:
        if output.finished:
            self._notify(self._on_finished, output)
        entry = self._groups.get(output.request_id)
        if entry is None:
            return
        group, index = entry
        if output.finished:
            del self._groups[output.request_id]
        try:
            group.push((index, output))
        except RuntimeError:  # its event loop has closed: nobody is listening
            self._abort([output.request_id])

    @staticmethod
    def _notify(callback: Callable[[Any], None] | None, arg: Any) -> None:
        if callback is not None:
            try:
                callback(arg)
            except Exception:
                logger.exception("server callback failed")

    def _fail_all(self, error: EngineStepError) -> None:
        groups = self._groups
        self._groups = {}
        for request_id, (group, _) in groups.items():
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("aborting %s failed", request_id)
            self._notify(self._on_aborted, request_id)
            try:
                group.push(error)
            except RuntimeError:
                pass


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
