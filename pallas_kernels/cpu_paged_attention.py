"""Ragged paged attention on CPUs: a C++ kernel called from the jitted step through XLA's FFI.

`cpu_ragged_paged_attention(q, k_cache, v_cache, layer, md, scale)` has the contract of the
jnp reference `paged_attention.ragged_paged_attention` (same arguments, same result to float32
rounding). Where the reference gathers every row's context into a padded copy before its einsums,
the kernel (`cpu_paged_attention.cc`) reads each live key and value once, in place, from the
blocks the row's block table names; rows (and 16-query tiles of prompt chunks) are shared between
the calling thread and XLA's intra-op thread pool.

The kernel is compiled once per machine with the system's C++ compiler (`$CXX`, else `c++`)
against jaxlib's FFI headers, for this machine's processor (`-march=native`), and kept in a folder
the caller names (jpaged uses `<cache dir>/kernels`) under a name that hashes the source, the
flags, jaxlib's version, the compiler's version and the processor; later processes load that
file. `start_build(folder)` builds (or finds) and registers it in a background thread, so that the
compile overlaps the model's loading; `wait()` returns once it is registered, or with the reason it
could not be (then this function computes with the jnp reference, as it does before `wait()`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from pallas_kernels.paged_attention import AttentionMetadata, ragged_paged_attention

TARGET = "jpaged_ragged_paged_attention"
SOURCE = pathlib.Path(__file__).with_suffix(".cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp-simd", "-shared", "-fPIC", "-w")
_lock = threading.Lock()
_build_thread: threading.Thread | None = None
_result: dict[str, object] = {}  # "library" (ctypes.CDLL) once registered, or "error" (str)


def compiler() -> str | None:
    """The C++ compiler the kernel is built with, or None when there is none."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def start_build(folder: str | os.PathLike) -> None:
    """Build (or find) the kernel in `folder` and register it with XLA, in a background thread.

    Several threads and processes may build at once: a build goes to a temporary file that is
    renamed into place. Only the first call in a process does anything.
    """
    global _build_thread
    with _lock:
        if _build_thread is None:
            _build_thread = threading.Thread(target=_load, args=(pathlib.Path(folder),), daemon=True,
                                             name="jpaged-cpu-kernel")
            _build_thread.start()


def wait() -> str | None:
    """Wait for `start_build`'s thread; None once the kernel is registered, else why it is not."""
    if _build_thread is None:
        return "the CPU attention kernel was never built (start_build)"
    _build_thread.join()
    return _result.get("error")


def is_loaded() -> bool:
    return "library" in _result


def cpu_ragged_paged_attention(q, k_cache, v_cache, layer, md: AttentionMetadata, scale: float):
    """Attention of `q [T, heads, head_dim]` over layer `layer` of the paged caches
    `[layers, blocks, block_size, kv_heads, head_dim]`; `[T, heads, head_dim]` in q's dtype.

    float32 or bfloat16, q and caches of one dtype; other dtypes, or a process where the kernel is
    not registered, compute with the jnp reference. The kernel checks the metadata it reads
    (layer, block ids, query and context ranges) and fails the step with an error naming what was
    out of range.
    """
    if not is_loaded() or q.dtype != k_cache.dtype or q.dtype not in (jnp.float32, jnp.bfloat16):
        return ragged_paged_attention(q, k_cache, v_cache, layer, md, scale)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    return call(q, k_cache, v_cache, jnp.asarray(layer, jnp.int32).reshape(1), md.block_tables, md.context_lens,
                md.query_start, md.query_lens, scale=np.float32(scale))


def _load(folder: pathlib.Path) -> None:
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(folder)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JpagedRaggedPagedAttention), platform="cpu")
        _result["library"] = library
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        _result["error"] = f"the CPU attention kernel could not be built ({error})"


def _build(folder: pathlib.Path) -> pathlib.Path:
    cxx = compiler()
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    source = SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                                     version.encode(), _processor().encode()])).hexdigest()[:16]
    path = folder / f"cpu_paged_attention-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = pathlib.Path(scratch) / path.name
        result = subprocess.run([cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)],
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{cxx} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, path)
    return path


def _processor() -> str:
    """What `-march=native` depends on: the processor's model and feature flags."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        fields = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(fields)
    except OSError:
        return platform.processor() + platform.machine()
