"""jax's persistent compilation cache, kept in jpaged's cache directory (`<cache dir>/xla`).

A step program compiled once is written to disk and loaded by the next process that needs the
same program (same model shapes, step shape, jax version and device), so a second start
compiles nothing it compiled before. The engine turns it on when it starts (`EngineConfig.
compilation_cache`, on by default); it is left alone where the user has pointed jax's cache
elsewhere. jax decides once per process, at its first compilation, whether the cache is used,
so it takes effect when the engine is the first thing in the process to compile (as in the
CLI, scripts and servers). The first time a process enables the cache, the folder is trimmed to
`MAX_BYTES`, least recently used files first (by access or modification time, whichever is
later). jax's own eviction is left off: it rescans the whole folder and takes a lock across
processes at every write, about 0.3 s per program in a folder of 3,700 entries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import tempfile

import jax
from jax import monitoring

from jpaged.cache_dir import cache_dir

logger = logging.getLogger("jpaged")

MAX_BYTES = 2 * 2**30
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_counts = {"hits": 0, "misses": 0}
_listening = False
_trimmed: set[pathlib.Path] = set()  # folders trimmed by this process


def enable(directory: pathlib.Path | None = None) -> pathlib.Path | None:
    """Point jax's persistent compilation cache at `directory` (default `<cache dir>/xla`),
    caching every program however quick its compilation. Returns the directory in use: the
    user's own where jax already had one (with the thresholds the user set), None where
    `directory` cannot be written (logged once; compiled programs are then not kept)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        _listen()
        return pathlib.Path(current)
    directory = directory or cache_dir() / "xla"
    if not _writable(directory):
        return None
    if directory not in _trimmed:
        _trimmed.add(directory)
        trim(directory)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _listen()
    return directory


def trim(directory: pathlib.Path, max_bytes: int = MAX_BYTES) -> None:
    """Delete the least recently used files of `directory` until the rest hold at most
    `max_bytes`. A file's last use is the later of its access and modification times."""
    files = []
    for entry in os.scandir(directory):
        with contextlib.suppress(OSError):
            info = entry.stat()
            files.append((max(info.st_atime, info.st_mtime), info.st_size, entry.path))
    total = 0
    for _, size, path in sorted(files, reverse=True):
        total += size
        if total > max_bytes:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _writable(directory: pathlib.Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
        return True
    except OSError as error:
        logger.warning("compiled programs will not be kept: %s cannot be written (%s)", directory, error)
        return False


def counts() -> dict[str, int]:
    """Persistent-cache hits and misses of this process since the cache was enabled."""
    return dict(_counts)


def _listen() -> None:
    global _listening
    if not _listening:
        monitoring.register_event_listener(_count)
        _listening = True


def _count(event: str, **_) -> None:
    if event in _EVENTS:
        _counts[_EVENTS[event]] += 1
