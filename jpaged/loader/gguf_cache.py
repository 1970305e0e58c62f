"""A GGUF file's metadata read once: its index and tokenizer kept in jpaged's cache directory.

Parsing a GGUF file's metadata is the slow part of loading one (the default model's 49,152
vocabulary strings and merges take about a second to parse). The first load of a file parses it
once (`gguf.read_gguf`): its index (config and tensor table) and its tokenizer's metadata, from
which transformers' GGUF tokenizer conversion builds the tokenizer without reading the file again.
Both are written to `<cache dir>/gguf/<key>/` as `index.json` and an HF tokenizer folder
(`tokenizer.json`, `tokenizer_config.json`, chat template; none for a file whose metadata holds
no usable tokenizer, which then runs with `tokenizer=`). Later loads read those files and
memory-map the weights: no metadata parse at all.

The key hashes the file's resolved path, size, modification time and its first and last MiB
(where the metadata starts and the last tensors lie; this cache's format version too), so a
changed or replaced file gets a fresh entry (and its older entry is removed), one copied over it
with its size and time kept included, unless the two differ only in the middle of their tensors.
Entries are written to a temporary folder and renamed into place, so a crash or a concurrent load
never leaves a half-written one; a manifest lists an entry's files, and an entry missing one, or
whose index or tokenizer cannot be read, is removed and rebuilt from the file.
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
from jpaged.loader.gguf import GGUFIndex, load_gguf_tokenizer, read_gguf

logger = logging.getLogger("jpaged")

FORMAT_VERSION = 3
SAMPLED_BYTES = 2**20  # from each end of the file, into its key
MANIFEST = "manifest.json"


def entry_dir(path: pathlib.Path, root: pathlib.Path | None = None) -> pathlib.Path:
    """The cache folder for the GGUF file at `path` as it is now."""
    stat = path.stat()
    key = hashlib.sha256(f"{FORMAT_VERSION}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    with path.open("rb") as file:
        key.update(file.read(SAMPLED_BYTES))
        file.seek(max(0, stat.st_size - SAMPLED_BYTES))
        key.update(file.read(SAMPLED_BYTES))
    key = key.hexdigest()[:24]
    return (root or cache_dir()) / "gguf" / f"{path.stem}-{key}"


def open_cached(path: str | os.PathLike, root: pathlib.Path | None = None) -> tuple[GGUFIndex, Callable[[], Any]]:
    """`(index, load_tokenizer)` of the GGUF file at `path`, from the cache when it holds this
    file; `load_tokenizer()` returns its transformers tokenizer (from the cached folder, which
    is the slow part of a cached load: callers may run it while the weights load).

    An entry that is incomplete or unreadable (index or tokenizer) is logged, removed and
    rebuilt from the file. Raises FileNotFoundError / ValueError as `read_gguf` does for a
    missing or invalid file. A cache folder that cannot be written is logged and skipped.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    entry = entry_dir(path, root)
    if entry.exists():
        try:
            index = _read_index(entry)
            return index, functools.partial(_cached_tokenizer, entry, path, index)
        except (OSError, ValueError, KeyError, TypeError) as error:
            _discard(entry, path, error)
    index, tokenizer_metadata = read_gguf(path)
    try:
        tokenizer = load_gguf_tokenizer(path, tokenizer_metadata)
    except ValueError:  # no tokenizer to use: the model still runs with another (tokenizer=)
        _write_entry(entry, path, index, None)
        return index, functools.partial(load_gguf_tokenizer, path, tokenizer_metadata)  # says why, if called
    _write_entry(entry, path, index, tokenizer)
    return index, lambda: tokenizer


def _read_index(entry: pathlib.Path) -> GGUFIndex:
    """The entry's index, once every file its manifest lists is there; ValueError otherwise."""
    manifest = json.loads((entry / MANIFEST).read_text())
    missing = [name for name in manifest["files"] if not (entry / name).is_file()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return GGUFIndex.from_json(json.loads((entry / "index.json").read_text()))


def _cached_tokenizer(entry: pathlib.Path, path: pathlib.Path, index: GGUFIndex):
    from transformers import PreTrainedTokenizerFast

    if not (entry / "tokenizer").is_dir():  # the file's metadata has no tokenizer to use: say why
        return load_gguf_tokenizer(path)
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(entry / "tokenizer"))
    except Exception as error:  # noqa: BLE001 - whatever a damaged tokenizer file raises, the GGUF has the truth
        _discard(entry, path, error)
        tokenizer = load_gguf_tokenizer(path)
        _write_entry(entry, path, index, tokenizer)
        return tokenizer


def _discard(entry: pathlib.Path, path: pathlib.Path, error: Exception) -> None:
    logger.warning("GGUF cache entry %s is unreadable (%s: %s); reading %s again",
                   entry, type(error).__name__, str(error)[:200], path)
    shutil.rmtree(entry, ignore_errors=True)


def _write_entry(entry: pathlib.Path, path: pathlib.Path, index: GGUFIndex, tokenizer) -> None:
    """Write the entry through a staging folder renamed into place; the manifest, written last,
    lists its files. Entries of earlier versions of the same file are removed."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=entry.parent, prefix=".staging-"))
    except OSError as error:
        logger.warning("cannot write the GGUF cache under %s (%s); the next load reads the file again",
                       entry.parent, error)
        return
    try:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging / "tokenizer"))
        (staging / "index.json").write_text(json.dumps(index.to_json()))
        files = sorted(str(f.relative_to(staging)) for f in staging.rglob("*") if f.is_file())
        (staging / MANIFEST).write_text(json.dumps({"source": str(path.resolve()), "files": files}))
        os.replace(staging, entry)
        logger.info("GGUF index and tokenizer cached in %s", entry)
        _remove_older_entries(entry, path)
    except OSError as error:  # another process renamed its entry into place first, or the disk is full
        logger.info("GGUF cache entry %s not written: %s", entry, error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_older_entries(entry: pathlib.Path, path: pathlib.Path) -> None:
    source = str(path.resolve())
    for other in entry.parent.glob(f"{path.stem}-*"):
        try:
            if other != entry and json.loads((other / MANIFEST).read_text())["source"] == source:
                shutil.rmtree(other, ignore_errors=True)
        except (OSError, ValueError, KeyError):
            continue
