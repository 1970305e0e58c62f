"""Where the weights of streamed decoder layers are kept off the device (`offload_weights`):
numpy arrays in host memory, or memory-mapped files in a folder.

The loader (`weights.load_params`) fills a `HostStore` instead of the device for every parameter
whose placement is the store, a tensor at a time, so a model larger than the device (and, with
files, larger than host memory) loads. `weight_streaming.py` copies the arrays onto the device
layer by layer during each step. Files hold each array in the layout the device uses (transposed,
quantized, KV heads replicated as the loader makes them), so a step's copy is one contiguous read.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
import weakref

import numpy as np


class HostStore:
    """Arrays by parameter path (`("layers", 3, "q_proj")`): in memory, or, with `directory`, in
    files of a fresh folder inside it (removed with the store)."""

    def __init__(self, directory: str | pathlib.Path | None = None):
        self.folder = None
        if directory is not None:
            pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
            self.folder = pathlib.Path(tempfile.mkdtemp(prefix="offload-", dir=directory))
            weakref.finalize(self, shutil.rmtree, self.folder, True)

    def zeros(self, path: tuple, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A writable array of zeros for the parameter at `path`."""
        if self.folder is None:
            return np.zeros(shape, dtype)
        return np.memmap(self._file(path), dtype=np.dtype(dtype), mode="w+", shape=shape)

    def put(self, path: tuple, value: np.ndarray) -> np.ndarray:
        """`value` kept as the parameter at `path`; returns the kept array (a read-only map of its
        file, with a directory)."""
        if self.folder is None:
            return np.array(value)
        array = self.zeros(path, value.shape, value.dtype)
        array[...] = value
        array.flush()
        return np.memmap(self._file(path), dtype=value.dtype, mode="r", shape=value.shape)

    def _file(self, path: tuple) -> pathlib.Path:
        return self.folder / (".".join(map(str, path)) + ".bin")
