"""Builds jpaged's C++ CPU kernels, one small library each, and registers them as XLA FFI targets.

The kernels (sharing `cpu_ffi.h`) are compiled with the system's C++ compiler (`$CXX`, else
`c++`) against jaxlib's FFI headers, for this machine's processor (`-march=native`). Each library
holds one kernel for one set of types, so that a process compiles only what its model runs:
"float-matmul" and "float-matmul-transposed" (`cpu_float_matmul.cc`), "quantized-matmul"
(`cpu_quantized_matmul.cc`) and "attention-<query>-<cache>" (`cpu_paged_attention.cc` built
for float32, bfloat16 or float16 queries over a cache of the queries' dtype or of int8 or fp8
values; `cpu_paged_attention.attention_library` names the one a model needs). Each is built once per machine, kept in a folder the caller names (jpaged
uses `<cache dir>/kernels`) under a name that hashes its source, the flags, jaxlib's version, the
compiler's version and the processor; later processes load that file. `start_build(folder,
library)` builds (or finds) and registers a library in a background thread, so that the compile
overlaps the model's loading (libraries started together compile in parallel); `wait(library)`
returns once it is registered, or with the reason it could not be. Until then, and where it
cannot be built, each kernel's Python wrapper computes with its jnp reference (or XLA's product).
"""

from __future__ import annotations

import ctypes
import dataclasses
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
QUERY_TYPES = {"float32": "float", "bfloat16": "uint16_t", "float16": "_Float16"}  # attention's query dtype: its C++ type
CACHE_TYPES = {**QUERY_TYPES, "int8": "int8_t", "fp8": "uint8_t"}


@dataclasses.dataclass(frozen=True)
class Library:
    source: pathlib.Path
    symbol: str  # the FFI handler it exports
    defines: tuple[str, ...] = ()  # compiler definitions that choose its types


def _attention(query: str, cache: str) -> Library:
    return Library(HERE / "cpu_paged_attention.cc", "JpagedRaggedPagedAttention",
                   (f"-DJPAGED_QUERY={QUERY_TYPES[query]}", f"-DJPAGED_CACHE={CACHE_TYPES[cache]}"))


LIBRARIES = {
    "float-matmul": Library(HERE / "cpu_float_matmul.cc", "JpagedFloatMatmul"),
    "float-matmul-transposed": Library(HERE / "cpu_float_matmul.cc", "JpagedFloatMatmulTransposed"),
    "quantized-matmul": Library(HERE / "cpu_quantized_matmul.cc", "JpagedQuantizedMatmul"),
    **{f"attention-{query}-{cache}": _attention(query, cache) for query in QUERY_TYPES
       for cache in (query, "int8", "fp8")},
}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp-simd", "-shared", "-fPIC", "-w")
_lock = threading.Lock()
_build_threads: dict[str, threading.Thread] = {}
_results: dict[str, dict[str, object]] = {name: {} for name in LIBRARIES}  # "library" (CDLL), or "error"


def compiler() -> str | None:
    """The C++ compiler the kernels are built with, or None when there is none."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def target(library: str) -> str:
    """The FFI target name under which `library`'s kernel is registered."""
    return "jpaged_" + library.replace("-", "_")


def start_build(folder: str | os.PathLike, library: str) -> None:
    """Build (or find) `library` (a name in `LIBRARIES`) in `folder` and register its kernel with
    XLA, in a background thread.

    Several threads and processes may build at once: a build goes to a temporary file that is
    renamed into place. Only the first call per library in a process does anything.
    """
    with _lock:
        if library not in _build_threads:
            _build_threads[library] = threading.Thread(target=_load, args=(pathlib.Path(folder), library),
                                                       daemon=True, name=f"jpaged-cpu-kernels-{library}")
            _build_threads[library].start()


def wait(library: str) -> str | None:
    """Wait for `start_build`'s thread; None once the kernel is registered, else why it is not."""
    if library not in _build_threads:
        return f"the CPU kernel library {library!r} was never built (start_build)"
    _build_threads[library].join()
    return _results[library].get("error")


def is_loaded(library: str) -> bool:
    return "library" in _results[library]


def loaded() -> list[str]:
    """The libraries registered so far in this process."""
    return sorted(name for name in LIBRARIES if is_loaded(name))


def _load(folder: pathlib.Path, library: str) -> None:
    try:
        loaded = ctypes.cdll.LoadLibrary(str(_build(folder, library)))
        handler = getattr(loaded, LIBRARIES[library].symbol)
        jax.ffi.register_ffi_target(target(library), jax.ffi.pycapsule(handler), platform="cpu")
        _results[library]["library"] = loaded
    except (OSError, AttributeError, subprocess.SubprocessError, RuntimeError) as error:
        _results[library]["error"] = f"the CPU kernel library {library!r} could not be built ({error})"


def _build(folder: pathlib.Path, library: str) -> pathlib.Path:
    cxx = compiler()
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    spec = LIBRARIES[library]
    flags = [*FLAGS, *spec.defines]
    parts = [file.read_bytes() for file in (spec.source, *HEADERS)]
    parts += [" ".join(flags).encode(), jaxlib.__version__.encode(), version.encode(), _processor().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    name = f"cpu_kernels-{library}-{key}.so"
    command = [cxx, *flags, f"-I{jax.ffi.include_dir()}", str(spec.source), "-o"]
    try:
        return _compiled(folder / name, command)
    except OSError:  # a cache folder that cannot be written: this user's temporary folder instead
        fallback = pathlib.Path(tempfile.gettempdir()) / f"jpaged-kernels-{os.getuid()}"
        if fallback == folder:
            raise
        return _compiled(fallback / name, command)


def _compiled(path: pathlib.Path, command: list[str]) -> pathlib.Path:
    """`path`, compiled by `command` + its output file unless it exists already."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = pathlib.Path(scratch) / path.name
        run = subprocess.run([*command, str(built)], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"{command[0]} failed: {run.stderr.strip()[-2000:]}")
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
