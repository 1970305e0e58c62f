"""Builds jpaged's C++ CPU kernels into one library and registers them as XLA FFI targets.

The kernels (`cpu_paged_attention.cc`, `cpu_quantized_matmul.cc`, `cpu_float_matmul.cc`, sharing
`cpu_ffi.h`) are compiled once per machine with the system's C++ compiler (`$CXX`, else `c++`)
against jaxlib's FFI headers, for this machine's processor (`-march=native`), and kept in a folder the caller names
(jpaged uses `<cache dir>/kernels`) under a name that hashes the sources, the flags, jaxlib's
version, the compiler's version and the processor; later processes load that file.
`start_build(folder)` builds (or finds) and registers the library in a background thread, so that
the compile overlaps the model's loading; `wait()` returns once it is registered, or with the
reason it could not be. Until then, and where it cannot be built, each kernel's Python wrapper
computes with its jnp reference.
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
import jaxlib

HERE = pathlib.Path(__file__).parent
SOURCES = (HERE / "cpu_paged_attention.cc", HERE / "cpu_quantized_matmul.cc", HERE / "cpu_float_matmul.cc")
HEADERS = (HERE / "cpu_ffi.h",)
TARGETS = {  # FFI target name: the library's handler symbol
    "jpaged_ragged_paged_attention": "JpagedRaggedPagedAttention",
    "jpaged_quantized_matmul": "JpagedQuantizedMatmul",
    "jpaged_float_matmul": "JpagedFloatMatmul",
}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp-simd", "-shared", "-fPIC", "-w")
_lock = threading.Lock()
_build_thread: threading.Thread | None = None
_result: dict[str, object] = {}  # "library" (ctypes.CDLL) once registered, or "error" (str)


def compiler() -> str | None:
    """The C++ compiler the kernels are built with, or None when there is none."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def start_build(folder: str | os.PathLike) -> None:
    """Build (or find) the kernels in `folder` and register them with XLA, in a background thread.

    Several threads and processes may build at once: a build goes to a temporary file that is
    renamed into place. Only the first call in a process does anything.
    """
    global _build_thread
    with _lock:
        if _build_thread is None:
            _build_thread = threading.Thread(target=_load, args=(pathlib.Path(folder),), daemon=True,
                                             name="jpaged-cpu-kernels")
            _build_thread.start()


def wait() -> str | None:
    """Wait for `start_build`'s thread; None once the kernels are registered, else why they are not."""
    if _build_thread is None:
        return "the CPU kernels were never built (start_build)"
    _build_thread.join()
    return _result.get("error")


def is_loaded() -> bool:
    return "library" in _result


def _load(folder: pathlib.Path) -> None:
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(folder)))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _result["library"] = library
    except (OSError, AttributeError, subprocess.SubprocessError, RuntimeError) as error:
        _result["error"] = f"the CPU kernels could not be built ({error})"


def _build(folder: pathlib.Path) -> pathlib.Path:
    cxx = compiler()
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    parts = [file.read_bytes() for file in (*SOURCES, *HEADERS)]
    parts += [" ".join(FLAGS).encode(), jaxlib.__version__.encode(), version.encode(), _processor().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    path = folder / f"cpu_kernels-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        scratch = pathlib.Path(scratch)
        objects = [scratch / f"{source.stem}.o" for source in SOURCES]
        compiles = [subprocess.Popen([cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", "-c", str(source), "-o", str(obj)],
                                     stderr=subprocess.PIPE, text=True) for source, obj in zip(SOURCES, objects)]
        _check(cxx, compiles)
        _check(cxx, [subprocess.Popen([cxx, *FLAGS, *map(str, objects), "-o", str(scratch / path.name)],
                                      stderr=subprocess.PIPE, text=True)])
        os.replace(scratch / path.name, path)
    return path


def _check(cxx: str, runs: list[subprocess.Popen]) -> None:
    """Wait for the compiler runs `runs` (in parallel); RuntimeError with its messages if one failed."""
    errors = [run.communicate()[1] for run in runs]
    for run, error in zip(runs, errors):
        if run.returncode:
            raise RuntimeError(f"{cxx} failed: {error.strip()[-2000:]}")


def _processor() -> str:
    """What `-march=native` depends on: the processor's model and feature flags."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        fields = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(fields)
    except OSError:
        return platform.processor() + platform.machine()
