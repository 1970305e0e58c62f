"""A GGUF file's metadata read once: its index and tokenizer kept in jpaged's cache directory.

Parsing a GGUF file's metadata is the slow part of loading one (the default model's 49,152
vocabulary strings and merges take seconds to parse). The first load of a file reads its index
(`gguf.read_gguf_index`: config and tensor table) and its tokenizer (transformers' GGUF
conversion, which reads the tokenizer's metadata only) and writes them to
`<cache dir>/gguf/<key>/` as `index.json` and an HF tokenizer folder (`tokenizer.json`,
`tokenizer_config.json`, chat template). Later loads read those files and memory-map the
weights: no metadata parse at all.

The key hashes the file's resolved path, size and modification time (and this cache's format
version), so a changed or replaced file gets a fresh entry. Entries are written to a temporary
folder and renamed into place, so a crash or a concurrent load never leaves a half-written one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from jpaged.cache_dir import cache_dir
from jpaged.loader.gguf import GGUFIndex, load_gguf_tokenizer, read_gguf_index

logger = logging.getLogger("jpaged")

FORMAT_VERSION = 1


def entry_dir(path: pathlib.Path, root: pathlib.Path | None = None) -> pathlib.Path:
    """The cache folder for the GGUF file at `path` as it is now."""
    stat = path.stat()
    identity = f"{FORMAT_VERSION}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:24]
    return (root or cache_dir()) / "gguf" / f"{path.stem}-{key}"


def open_cached(path: str | os.PathLike, root: pathlib.Path | None = None) -> tuple[GGUFIndex, Callable[[], Any]]:
    """`(index, load_tokenizer)` of the GGUF file at `path`, from the cache when it holds this
    file; `load_tokenizer()` returns its transformers tokenizer (from the cached folder, which
    is the slow part of a cached load: callers may run it while the weights load).

    Raises FileNotFoundError / ValueError as `read_gguf_index` does for a missing or invalid file.
    A cache folder that cannot be written is logged and skipped, never fatal.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    entry = entry_dir(path, root)
    if (entry / "index.json").is_file() and (entry / "tokenizer" / "tokenizer.json").is_file():
        try:
            index = GGUFIndex.from_json(json.loads((entry / "index.json").read_text()))
            return index, functools.partial(_cached_tokenizer, entry / "tokenizer")
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("GGUF cache entry %s is unreadable (%s); reading %s again", entry, error, path)
            shutil.rmtree(entry, ignore_errors=True)
    index = read_gguf_index(path)
    tokenizer = load_gguf_tokenizer(path)
    _write_entry(entry, index, tokenizer)
    return index, lambda: tokenizer


def _cached_tokenizer(folder: pathlib.Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def _write_entry(entry: pathlib.Path, index: GGUFIndex, tokenizer) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=entry.parent, prefix=".staging-"))
    except OSError as error:
        logger.warning("cannot write the GGUF cache under %s (%s); the next load reads the file again",
                       entry.parent, error)
        return
    try:
        tokenizer.save_pretrained(str(staging / "tokenizer"))
        (staging / "index.json").write_text(json.dumps(index.to_json()))
        os.replace(staging, entry)
        logger.info("GGUF index and tokenizer cached in %s", entry)
    except OSError as error:  # another process renamed its entry into place first, or the disk is full
        logger.info("GGUF cache entry %s not written: %s", entry, error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
