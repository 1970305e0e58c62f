"""Compiled step programs kept on disk under what they are made from, so a later process neither
traces nor compiles them.

jax's persistent compilation cache (`compile_cache.py`) finds a program by its lowered text, so
each process still traces and lowers every step program before it can look one up (seconds for
the step programs of a 30-layer model on a small CPU). `ProgramCache` finds a compiled step by a
key made before any tracing, from everything the program depends on: the source of jpaged's own
packages, the jax and jaxlib versions, the backend and its devices, a description of the
program's settings given by the caller, and the arguments' shapes, dtypes and shardings. A hit
loads the executable (`jax.experimental.serialize_executable`); a miss traces and compiles the
function (through jax's persistent cache) and stores the result. `prefetch` makes a program
ready in a background thread (XLA compiles and loads with the GIL released), so a program the
engine will need next compiles (or loads) while the current one compiles or runs. Files live in
`<cache dir>/programs`; the least recently used go beyond `MAX_BYTES`. Anything unreadable is
compiled afresh and overwritten.

A key names devices only by their place in the program's device assignment, so one compiled
program serves every set of devices laid out alike: the data-parallel replicas of an engine (the
same program on other devices) each load the one program their first replica compiled, from this
process's memory or from the folder, with their own devices in its device assignment. Replicas
asking together wait for the one compilation.

An executable that jax itself loaded from its persistent cache cannot be serialized again whole
on CPU (the copy lacks some of its functions), so such a program is used but not kept. The jitted
function's name carries a digest of the key's fixed part, which keeps jax's cache from serving a
program compiled by other jpaged source: a program new to this cache is compiled afresh.

In a run of several processes (`jax.distributed`) the cache keeps nothing on disk: every process
would find the same key, while each one's executable holds only its own devices (jax's persistent
cache still serves them).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import pathlib
import pickle
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import jax.extend.backend
import jaxlib
import numpy as np
from jax.experimental import serialize_executable

logger = logging.getLogger("jpaged")

MAX_BYTES = 512 * 2**20
_PACKAGES = ("jpaged", "pallas_kernels", "sharding")


class ProgramCache:
    """`jax.jit(fn, donate_argnums)` whose compiled programs are also kept in `directory` (None:
    in this process only). The first `num_fixed` arguments must keep their shapes, dtypes and
    shardings for the cache's lifetime (parameters, KV cache): they are described once. `context`
    describes whatever else shapes the program (configurations), as text.

    `compiler_options` (XLA debug options by name, as `jax.stages.Lowered.compile` takes them)
    apply to every program it compiles; give them in `context` too, since they shape the program.

    `num_programs` counts the programs this process has made ready (compiled or loaded);
    `max_temp_bytes` is the most working memory (XLA's temporaries, in bytes per device) any of
    them needs beyond its arguments and outputs."""

    def __init__(self, fn: Callable, donate_argnums: tuple[int, ...], num_fixed: int, context: str,
                 directory: pathlib.Path | None, compiler_options: dict | None = None):
        self._name = getattr(fn, "__name__", "program")
        self._label = self._name.strip("_").removesuffix("_fn")  # "_step_fn": "step"
        digest = hashlib.sha256(f"{_environment()}\n{context}".encode()).hexdigest()[:16]

        def program(*args):
            return fn(*args)

        program.__name__ = f"{self._name}_{digest}"
        self._jit = jax.jit(program, donate_argnums=donate_argnums)
        self._num_fixed = num_fixed
        self._context = context
        self._compiler_options = compiler_options
        self._directory = directory if jax.process_count() == 1 else None
        self._ready: dict[tuple, Callable] = {}
        self._pending: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jpaged-programs")
        self._fixed: tuple | None = None  # the fixed arguments' abstract values
        self._fixed_key: str | None = None  # and their description
        self.num_programs = 0
        self.max_temp_bytes = 0

    def __call__(self, *args):
        signature = self._signature(args)
        program = self._ready.get(signature)
        if program is None:
            program = self._ready[signature] = self._future(args, signature).result()
        return program(*args)

    def lower(self, *args):
        """The jitted function lowered for `args` (as `jax.jit(...).lower`), for inspection."""
        return self._jit.lower(*args)

    def prefetch(self, *args) -> None:
        """Start making the program for `args` (arrays or `jax.ShapeDtypeStruct`s) ready in the
        background; returns at once."""
        self._future(args, self._signature(args), self._background.submit)

    def _signature(self, args: tuple) -> tuple:
        leaves, tree = jax.tree.flatten(args[self._num_fixed:])
        return (tree, *((x.shape, x.dtype) for x in leaves))

    def _future(self, args: tuple, signature: tuple, submit=None) -> Future:
        """The program for `args`, made ready through `submit` (default: here and now) unless it
        is already on its way."""
        with self._lock:
            future = self._pending.get(signature)
            if future is not None:
                return future
            future = self._pending[signature] = Future()
            if self._fixed is None:
                self._fixed = jax.tree.map(_abstract, args[: self._num_fixed])
                self._fixed_key = _describe(self._fixed)
            abstract = (*self._fixed, *jax.tree.map(_abstract, args[self._num_fixed:]))
            self.num_programs += 1
            number = self.num_programs

        def make_ready():
            try:
                program = self._load_or_compile(abstract, number)
                with self._lock:
                    self.max_temp_bytes = max(self.max_temp_bytes, _temp_bytes(program))
                future.set_result(program)
            except BaseException as error:
                with self._lock:
                    del self._pending[signature]
                    self.num_programs -= 1
                future.set_exception(error)

        (submit or (lambda fn: fn()))(make_ready)
        return future

    def _load_or_compile(self, args: tuple, number: int) -> Callable:
        """The program for `args`: one made in this process for the same key (waiting for it while
        it is being made), else the folder's, else compiled (and kept)."""
        devices = _devices(args)
        text = "\n".join([_environment(), self._context, self._fixed_key, _describe(args[self._num_fixed:])])
        digest = hashlib.sha256(text.encode()).hexdigest()
        key = f"{self._name}-{digest}"  # the steps, layers and head share a context
        made = _made.claim(key)
        if made is not None:
            try:
                program = made.on(devices)
            except Exception as error:  # a backend that cannot move it: made here, as a program of its own
                logger.info("%s program #%d compiled: the one made for devices %s could not be moved (%s)",
                            self._label, number, list(made.device_ids), error)
                return self._load_or_compile_here(args, devices, key, number)[0]
            logger.info("%s program #%d loaded from the one made for devices %s", self._label, number,
                        list(made.device_ids))
            return program
        try:
            program, kept = self._load_or_compile_here(args, devices, key, number)
        except BaseException as error:
            _made.fail(key, error)
            raise
        _made.record(key, _Program(program, tuple(d.id for d in devices), kept))
        return program

    def _load_or_compile_here(self, args: tuple, devices: tuple, key: str, number: int) -> tuple[Callable, Callable]:
        """The program for `args` (kept as `key`) from the folder or compiled, and a function that
        gives it serialized, with the ids of the devices it was serialized for (raising where it
        cannot: a program jax loaded from its own cache)."""
        path = self._directory / key if self._directory is not None else None
        if path is not None and path.exists():
            device_ids = None
            try:
                serialized, device_ids = pickle.loads(path.read_bytes())
                program = _load(serialized, device_ids, devices)
            except Exception as error:
                if device_ids is not None and not _same_devices(device_ids, devices):  # kept for others
                    logger.info("%s program #%d compiled: the one kept for devices %s could not be moved (%s)",
                                self._label, number, list(device_ids), error)
                else:  # a file from an interrupted write or another jaxlib build
                    logger.warning("compiling afresh: %s could not be loaded (%s)", path, error)
                    with contextlib.suppress(OSError):  # a read-only cache keeps it
                        path.unlink(missing_ok=True)
            else:
                with contextlib.suppress(OSError):  # its use, for the least-recently-used trim
                    os.utime(path)
                logger.info("%s program #%d loaded from %s", self._label, number, path)
                return program, lambda: pickle.loads(path.read_bytes())  # a loaded program serializes wrong
        hits = _jax_cache_hits()
        program = self._jit.lower(*args).compile(self._compiler_options)
        if _jax_cache_hits() > hits:
            logger.info("%s program #%d loaded from jax's compilation cache (not kept in %s)", self._label, number, path)
            return program, _not_serializable
        logger.info("%s program #%d compiled", self._label, number)
        if path is None and jax.local_device_count() == 1:  # neither kept nor moved: no other device here
            return program, _not_serializable
        try:  # before it runs: on CPU some programs (a sort's comparator) no longer serialize once run
            kept = serialize_executable.serialize(program), [d.id for d in devices]
        except Exception as error:
            logger.info("%s program #%d cannot be kept (%s)", self._label, number, error)
            return program, _not_serializable
        if path is not None and _store(path, kept):
            return program, lambda: pickle.loads(path.read_bytes())
        return program, lambda: kept


def _not_serializable():
    raise RuntimeError("the program cannot be serialized whole")


class _Program:
    """A program made in this process: the program (held weakly), the ids of the devices it runs
    on, and a function that gives it serialized with the ids of the devices it was serialized for
    (a file's may name others)."""

    def __init__(self, program, device_ids: tuple[int, ...], kept: Callable[[], tuple]):
        self._program = weakref.ref(program)
        self.device_ids = device_ids
        self._kept = kept

    def living(self):
        """The program, or None once nothing holds it."""
        return self._program()

    def on(self, devices: tuple):
        """The program to run on `devices` in the places of its own: itself where they are the
        same devices. Raises where it cannot be moved."""
        program = self.living()
        if program is None:
            raise RuntimeError("the program is no longer held")
        if _same_devices(self.device_ids, devices):
            return program
        serialized, ids = self._kept()
        return _load(serialized, ids, devices)


class _Made:
    """The programs this process made, by key: each a `Future` of a `_Program`, which lasts while
    something holds its program."""

    def __init__(self):
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}

    def claim(self, key: str) -> _Program | None:
        """The living program made here for `key`, waiting for it while it is being made; else
        None, and the caller is to make it, then `record` it (or `fail`)."""
        while True:
            with self._lock:
                future = self._futures.get(key)
                if future is None or not _living(future):
                    self._futures = {k: f for k, f in self._futures.items() if _living(f)}
                    self._futures[key] = Future()
                    return None
            try:
                made = future.result()
            except BaseException:
                if not future.done():  # interrupted while waiting
                    raise
                continue  # its maker failed: claimed afresh
            if made.living() is not None:
                return made

    def record(self, key: str, made: _Program) -> None:
        self._futures[key].set_result(made)

    def fail(self, key: str, error: BaseException) -> None:
        self._futures[key].set_exception(error)


def _living(future: Future) -> bool:
    """Being made, or made and still held."""
    return not future.done() or (future.exception() is None and future.result().living() is not None)


_made = _Made()


def _devices(args) -> tuple:
    """The devices of the program for `args`, in the order of its device assignment: those of the
    first argument placed on devices (a mesh's, flattened), else the default device."""
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return tuple(sharding.mesh.devices.flat)
        if sharding is not None and len(sharding.device_set) == 1:
            return tuple(sharding.device_set)
    return (jax.devices()[0],)


def _same_devices(ids: Sequence[int], devices: tuple) -> bool:
    """Whether `devices` are those of `ids`, in the same places."""
    return list(ids) == [d.id for d in devices]


def _load(serialized: tuple, ids: Sequence[int], devices: tuple):
    """A program serialized (`serialize_executable.serialize`) for the devices `ids`, loaded to run
    on `devices`, each in the place of its counterpart in `ids`.

    On other devices the executable is deserialized with compile options naming them, made as jax
    makes them: jax itself loads a GPU program from its persistent cache this way (it keys such
    programs without their devices). That reaches into jax's internals, so any failure raises,
    and the caller compiles."""
    if _same_devices(ids, devices):
        return serialize_executable.deserialize_and_load(*serialized, execution_devices=list(devices))
    if len(ids) != len(devices):
        raise ValueError(f"a program for {len(ids)} devices cannot run on {len(devices)}")
    from jax._src import compiler

    backend = devices[0].client
    options = compiler.get_compile_options(num_replicas=1, num_partitions=len(devices),
                                           device_assignment=np.array([[d.id for d in devices]]), backend=backend)
    moved_to = dict(zip(ids, devices))

    class Unpickler(serialize_executable._JaxPjrtUnpickler):  # device `ids[i]` read as `devices[i]`
        def persistent_load(self, pid):
            if pid[0] == "device":
                return moved_to[pid[1]]
            if pid[0] == "exec":
                return self.backend.deserialize_executable(pid[1], self.execution_devices, options)
            return super().persistent_load(pid)

    payload, in_tree, out_tree = serialized
    unloaded, args_info, no_kwargs = Unpickler(io.BytesIO(payload), backend, list(devices)).load()
    program = jax.stages.Compiled(unloaded.load(), [], in_tree.unflatten(args_info), out_tree, no_kwargs=no_kwargs)
    placed = [d.id for d in program.runtime_executable().local_devices()]
    if sorted(placed) != sorted(d.id for d in devices):
        raise RuntimeError(f"the program loaded onto devices {placed}, not {[d.id for d in devices]}")
    return program


_this_thread = threading.local()


def _count_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _this_thread.jax_cache_hits = _jax_cache_hits() + 1


jax.monitoring.register_event_listener(_count_hit)


def _jax_cache_hits() -> int:
    """Programs this thread has had from jax's persistent cache."""
    return getattr(_this_thread, "jax_cache_hits", 0)


def _temp_bytes(program) -> int:
    """The working memory XLA set aside for `program` (0 where the backend does not say)."""
    try:
        stats = program.memory_analysis()
    except Exception:  # not every backend or loaded executable can say
        return 0
    return int(getattr(stats, "temp_size_in_bytes", 0) or 0)


def _abstract(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _describe(tree) -> str:
    """The abstract value of every leaf of `tree` (shape, dtype, sharding) and its structure."""
    leaves, treedef = jax.tree.flatten(tree)
    avals = [(x.shape, str(x.dtype), str(getattr(x, "sharding", None))) for x in leaves]
    return f"{treedef}\n{avals}"


@functools.cache
def _environment() -> str:
    """What every program depends on beyond its arguments: jpaged's source, jax, the devices."""
    root = pathlib.Path(__file__).resolve().parents[1]
    source = hashlib.sha256()
    for package in _PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            source.update(file.relative_to(root).as_posix().encode() + file.read_bytes())
    devices = [(d.id, d.platform, d.device_kind) for d in jax.devices()]
    backend = jax.extend.backend.get_backend()
    return "\n".join(map(str, [source.hexdigest(), jax.__version__, jaxlib.__version__, backend.platform_version,
                               devices, os.environ.get("XLA_FLAGS", ""), jax.config.jax_enable_x64]))


def _store(path: pathlib.Path, kept: tuple) -> bool:
    """Write `kept` (a serialized program and the ids of the devices it was made for: loaded
    without them, a program runs on every device) to `path` atomically, then trim the directory to
    `MAX_BYTES`. False where it could not be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as file:
            file.write(pickle.dumps(kept))
        os.replace(file.name, path)
        _trim(path.parent)
        return True
    except Exception as error:  # a full disk, a read-only folder: keep serving
        if path.parent not in _warned:
            _warned.add(path.parent)
            logger.warning("compiled programs not kept in %s (%s)", path.parent, error)
        return False


_warned: set[pathlib.Path] = set()  # folders whose write failure was logged


def _trim(directory: pathlib.Path) -> None:
    files = sorted(directory.iterdir(), key=lambda f: f.stat().st_mtime, reverse=True)
    total = 0
    for file in files:
        total += file.stat().st_size
        if total > MAX_BYTES:
            file.unlink(missing_ok=True)
