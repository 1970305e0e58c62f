"""Ctrl-C held back while the KV cache is handed to a compiled step and taken back.

The step programs donate the KV cache: the call consumes the old buffers and returns new ones,
which `ModelRunner` stores. A KeyboardInterrupt raised between the call's return and that store
(Python runs signal handlers between bytecodes, so an interrupt that arrived during the call is
raised right there) would leave the runner holding deleted buffers, and every later step would
fail. `interrupts_held()` receives SIGINT during such a block and delivers it again as the block
ends, to whatever handler was installed. Plain Python: no jax.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT until the block ends, then raise it again (the installed handler, by default
    KeyboardInterrupt, sees it then). Only the main thread receives signals; elsewhere, or where
    SIGINT is ignored or left to the system, this does nothing."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)
