"""Builds jpaged's C++ CPU kernels into two libraries and registers them as XLA FFI targets.

The kernels (sharing `cpu_ffi.h`) are compiled with the system's C++ compiler (`$CXX`, else
`c++`) against jaxlib's FFI headers, for this machine's processor (`-march=native`), into the
library "float" (`cpu_paged_attention.cc`, `cpu_float_matmul.cc`: what a float model runs) and
the library "quantized" (`cpu_quantized_matmul.cc`, built only when a quantized model asks for
it, as it takes about as long to compile as the rest), each once per machine, kept in a folder
the caller names (jpaged uses `<cache dir>/kernels`) under a name that hashes its sources, the
flags, jaxlib's version, the compiler's version and the processor; later processes load that
file. `start_build(folder, library)` builds (or finds) and registers a library in a background
thread, so that the compile overlaps the model's loading; `wait(library)` returns once it is
registered, or with the reason it could not be. Until then, and where it cannot be built, each
kernel's Python wrapper computes with its jnp reference (or XLA's product).
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
HEADERS = (HERE / "cpu_ffi.h",)
# Two libraries, each built on first use: what a float model runs, and the quantized matmul.
LIBRARIES = {  # name: (sources, {FFI target name: handler symbol})
    "float": ((HERE / "cpu_paged_attention.cc", HERE / "cpu_float_matmul.cc"),
              {"jpaged_ragged_paged_attention": "JpagedRaggedPagedAttention",
               "jpaged_float_matmul": "JpagedFloatMatmul"}),
    "quantized": ((HERE / "cpu_quantized_matmul.cc",), {"jpaged_quantized_matmul": "JpagedQuantizedMatmul"}),
}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp-simd", "-shared", "-fPIC", "-w")
_lock = threading.Lock()
_build_threads: dict[str, threading.Thread] = {}
_results: dict[str, dict[str, object]] = {name: {} for name in LIBRARIES}  # "library" (CDLL), or "error"


def compiler() -> str | None:
    """The C++ compiler the kernels are built with, or None when there is none."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def start_build(folder: str | os.PathLike, library: str = "float") -> None:
    """Build (or find) `library`'s kernels in `folder` and register them with XLA, in a background
    thread: "float" (attention, float32 matmul) or "quantized" (the quantized matmul).

    Several threads and processes may build at once: a build goes to a temporary file that is
    renamed into place. Only the first call per library in a process does anything.
    """
    with _lock:
        if library not in _build_threads:
            _build_threads[library] = threading.Thread(target=_load, args=(pathlib.Path(folder), library),
                                                       daemon=True, name=f"jpaged-cpu-kernels-{library}")
            _build_threads[library].start()


def wait(library: str = "float") -> str | None:
    """Wait for `start_build`'s thread; None once the kernels are registered, else why they are not."""
    if library not in _build_threads:
        return "the CPU kernels were never built (start_build)"
    _build_threads[library].join()
    return _results[library].get("error")


def is_loaded(library: str = "float") -> bool:
    return "library" in _results[library]


def _load(folder: pathlib.Path, library: str) -> None:
    try:
        loaded = ctypes.cdll.LoadLibrary(str(_build(folder, library)))
        for target, symbol in LIBRARIES[library][1].items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu")
        _results[library]["library"] = loaded
    except (OSError, AttributeError, subprocess.SubprocessError, RuntimeError) as error:
        _results[library]["error"] = f"the CPU kernels could not be built ({error})"


def _build(folder: pathlib.Path, library: str) -> pathlib.Path:
    cxx = compiler()
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    sources = LIBRARIES[library][0]
    parts = [file.read_bytes() for file in (*sources, *HEADERS)]
    parts += [" ".join(FLAGS).encode(), jaxlib.__version__.encode(), version.encode(), _processor().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    path = folder / f"cpu_kernels-{library}-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        scratch = pathlib.Path(scratch)
        objects = [scratch / f"{source.stem}.o" for source in sources]
        compiles = [subprocess.Popen([cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", "-c", str(source), "-o", str(obj)],
                                     stderr=subprocess.PIPE, text=True) for source, obj in zip(sources, objects)]
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
