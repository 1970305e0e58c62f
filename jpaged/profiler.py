"""Traces of what the engine runs, from jax's profiler (vLLM's `start_profile` / `stop_profile`).

`start` begins a trace under `<profiler_dir>/<prefix>`; `stop` ends it and writes it there as
jax writes traces: `plugins/profile/<run>/<host>.xplane.pb` (TensorBoard's profile plugin, XProf)
and `<host>.trace.json.gz` (Perfetto, chrome://tracing): host and device activity, each XLA
program and its ops. jax runs one trace at a time in a process, so the trace is the process's,
whichever engine (or data-parallel replica) started it. A trace not stopped before the process
ends is not written.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax

_tracing: Path | None = None  # the folder of the trace running, if any


def start(profiler_dir: str | None, prefix: str | None = None) -> Path:
    """Start tracing into `profiler_dir/prefix` (default prefix: the time to the microsecond,
    `profile-%Y%m%d-%H%M%S-<us>`); returns that folder, created (and checked writable) first.
    ValueError without a `profiler_dir`, for a prefix that is not a plain folder name or whose
    folder already holds a trace, a folder that cannot be written, and while a trace runs."""
    global _tracing
    if profiler_dir is None:
        raise ValueError("start_profile needs an engine made with profiler_dir=FOLDER (--profiler-dir)")
    if prefix is not None and (not isinstance(prefix, str) or not prefix.strip() or Path(prefix).name != prefix
                               or prefix in (".", "..") or "\0" in prefix):
        raise ValueError(f"profile prefix must be a folder name, got {prefix!r:.80}")
    if _tracing is not None:
        raise ValueError(f"a profile is already running (into {_tracing}): stop_profile first")
    now = time.time()
    name = prefix or time.strftime("profile-%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1e6) % 10**6:06d}"
    folder = Path(profiler_dir).expanduser() / name
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"{folder} already holds a trace: give start_profile another prefix")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
        jax.profiler.start_trace(str(folder))
    except (OSError, RuntimeError) as err:  # RuntimeError: a trace started outside jpaged
        raise ValueError(f"cannot trace into {folder}: {err}") from err
    _tracing = folder
    return folder


def stop() -> Path:
    """End the running trace and write it; returns its folder. ValueError where none runs, or
    where jax could not write it."""
    global _tracing
    if _tracing is None:
        raise ValueError("no profile is running: start_profile first")
    folder, _tracing = _tracing, None
    try:
        jax.profiler.stop_trace()
    except Exception as err:  # jax's runtime error type is not public
        raise ValueError(f"the trace into {folder} could not be written: {err}") from err
    return folder
