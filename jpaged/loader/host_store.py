"""Where the weights of streamed decoder layers are kept off the device (`offload_weights`):
numpy arrays in host memory, or memory-mapped files in a folder.

The loader (`weights.load_params`) fills a `HostStore` instead of the device for every parameter
whose placement is the store, a tensor at a time, so a model larger than the device (and, with
files, larger than host memory) loads. `weight_streaming.py` copies the arrays onto the device
layer by layer during each step. Files hold each array in the layout the device uses (transposed,
quantized, KV heads replicated as the loader makes them), so a step's copy is one contiguous read.

Once loading is done, `seal` unlinks the files: their maps keep them readable, and the system
frees their space when the last map goes (when the engine goes, or its process ends however it
ends). A folder left by a process killed while loading is removed by the next store made in the
same place.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import numpy as np


class HostStore:
    """Arrays by parameter path (`("layers", 3, "q_proj")`): in memory, or, with `directory`, in
    files of a fresh folder inside it."""

    def __init__(self, directory: str | pathlib.Path | None = None):
        self.folder = None
        if directory is not None:
            directory = pathlib.Path(directory)
            try:
                directory.mkdir(parents=True, exist_ok=True)
                _remove_orphans(directory)
                self.folder = pathlib.Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=directory))
            except OSError as error:
                raise OSError(f"offload_weights='disk' keeps layers in {directory}, which cannot be written: "
                              f"{error}") from error

    def zeros(self, path: tuple, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A writable array of zeros for the parameter at `path`."""
        if self.folder is None:
            return np.zeros(shape, dtype)
        file, size = self._file(path), int(np.prod(shape)) * np.dtype(dtype).itemsize
        with open(file, "wb") as f:  # the space reserved now: a full disk is an error, not a fault later
            self._reserve(f, size)
        return np.memmap(file, dtype=np.dtype(dtype), mode="r+", shape=shape)

    def put(self, path: tuple, value: np.ndarray) -> np.ndarray:
        """`value` kept as the parameter at `path`; returns the kept array (a read-only map of its
        file, with a directory)."""
        if self.folder is None:
            return np.array(value)
        file = self._file(path)
        value = np.ascontiguousarray(value)
        with open(file, "wb") as f:
            self._reserve(f, value.nbytes)
            f.write(memoryview(value.reshape(-1).view(np.uint8)))
        return np.memmap(file, dtype=value.dtype, mode="r", shape=value.shape)

    def seal(self) -> None:
        """Loading is done: unlink the files (their maps keep what they hold until they go)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _reserve(self, f, size: int) -> None:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as error:
            self.seal()
            raise OSError(f"offload_weights='disk': no room for {size / 2**20:.1f} MiB more in {self.folder.parent} "
                          f"({error.strerror})") from error

    def _file(self, path: tuple) -> pathlib.Path:
        return self.folder / (".".join(map(str, path)) + ".bin")


def _remove_orphans(directory: pathlib.Path) -> None:
    """Remove the folders of processes that no longer run (killed while loading)."""
    for folder in directory.iterdir():
        pid = folder.name.split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
