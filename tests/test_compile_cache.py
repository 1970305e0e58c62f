"""Compiled programs kept in jpaged's cache directory: a second process loads the step programs
the first one compiled without tracing them (`program_cache.py`), compiles nothing (jax's
persistent cache serves the small programs), and gives the same tokens (on whatever device jax
finds: the GPU check runs this file on the GPU image's jax too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")


ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("_step_fn_", "_sample_")  # the jitted names of the model step and sampler programs

RUN = """
import json, sys
from jax import monitoring
traced = []
monitoring.register_event_duration_secs_listener(
    lambda event, duration, fun_name=None, **_: traced.append(fun_name) if event.endswith("jaxpr_trace_duration") else None)
from jpaged import LLM, SamplingParams, compile_cache
llm = LLM(sys.argv[1], num_blocks=16, max_num_seqs=2, compilation_cache=sys.argv[2] == "on")
outs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": [9, 3]}],
                    SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
print(json.dumps({"tokens": [o.outputs[0].token_ids for o in outs], "counts": compile_cache.counts(),
                  "programs": llm.engine.stats().num_compilations, "traced": traced}))
"""


def run(folder: Path, cache: Path, setting: str = "on", script: str = RUN, **environ: str) -> dict:
    env = dict(os.environ, **environ, JPAGED_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script, str(folder), setting], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_process_traces_and_compiles_nothing_again(tiny_llama_folder, tmp_path, link_built_kernels):
    link_built_kernels(tmp_path)
    first = run(tiny_llama_folder, tmp_path)
    second = run(tiny_llama_folder, tmp_path)
    assert first["counts"]["misses"] >= first["programs"] > 0
    assert sum(name.startswith(PROGRAMS) for name in first["traced"]) == first["programs"]
    assert second["counts"]["misses"] == 0
    assert second["counts"]["hits"] > 0
    assert not any(name.startswith(PROGRAMS) for name in second["traced"])
    assert second["programs"] == first["programs"]
    assert second["tokens"] == first["tokens"]
    assert any((tmp_path / "xla").iterdir())
    # jax's own eviction, which rescans the folder at every write, is off: it keeps `-atime` files
    assert not any(file.name.endswith("-atime") for file in (tmp_path / "xla").iterdir())
    assert len(list((tmp_path / "programs").iterdir())) == first["programs"]

    for file in (tmp_path / "programs").iterdir():  # damaged files are compiled afresh
        file.write_bytes(b"not a program")
    third = run(tiny_llama_folder, tmp_path)
    assert sum(name.startswith(PROGRAMS) for name in third["traced"]) == first["programs"]
    assert third["tokens"] == first["tokens"]
    # jax's persistent cache served them: used, but not kept (such a copy would not load whole)
    assert third["counts"]["hits"] >= first["programs"]
    assert not any((tmp_path / "programs").iterdir())


def test_a_single_device_program_loads_among_many_devices(tiny_llama_folder, tmp_path, link_built_kernels):
    """A process with several (emulated) devices runs a one-device engine from a kept program on
    the device it was compiled for, not spread over all of them."""
    link_built_kernels(tmp_path)
    flags = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    first = run(tiny_llama_folder, tmp_path, **flags)
    second = run(tiny_llama_folder, tmp_path, **flags)
    assert not any(name.startswith(PROGRAMS) for name in second["traced"])
    assert second["tokens"] == first["tokens"]


REPLICAS = """
import json, sys
from jax import monitoring
compiled = []
monitoring.register_event_duration_secs_listener(
    lambda event, duration, fun_name=None, **_: compiled.append(fun_name) if event.endswith("backend_compile_duration")
    and fun_name.startswith(("jit(_step_fn_", "jit(_sample_")) else None)
import logging
from jpaged import LLM, SamplingParams
not_moved = []
handler = logging.Handler()
handler.emit = lambda record: not_moved.append(record.getMessage()) if "could not be moved" in record.getMessage() else None
logging.getLogger("jpaged").addHandler(handler)
logging.getLogger("jpaged").setLevel(logging.INFO)
prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9]}] * 4  # one per replica: each runs the same programs
params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
report = {}
for layout in ({}, {"data_parallel_size": 4}, {"tensor_parallel_size": 2, "data_parallel_size": 2}):
    compiled.clear()
    llm = LLM(sys.argv[1], num_blocks=16, max_num_seqs=2, compilation_cache=sys.argv[2] == "on", **layout)
    outs = llm.generate(prompts, params, use_tqdm=False)
    report[json.dumps(layout)] = {"tokens": [o.outputs[0].token_ids for o in outs], "compiled": len(compiled),
                                  "ready": llm.engine.stats().num_compilations, "not_moved": not_moved[:]}
    not_moved.clear()
    del llm
print(json.dumps(report))
"""


def run_replicas(folder: Path, cache: Path, setting: str) -> dict:
    return run(folder, cache, setting, REPLICAS,
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")


def test_data_parallel_replicas_compile_each_program_once(tiny_llama_folder, tmp_path, link_built_kernels):
    """Replicas on other devices load the program their first replica compiled, in the same
    process and from the folder in the next, and give one device's tokens."""
    link_built_kernels(tmp_path)
    alone, data_parallel, with_tensors = run_replicas(tiny_llama_folder, tmp_path, "off").values()
    for replicas, report in ((4, data_parallel), (2, with_tensors)):
        assert report["tokens"] == alone["tokens"]
        assert report["ready"] == replicas * report["compiled"] > 0
    first = run_replicas(tiny_llama_folder, tmp_path, "on")
    second = run_replicas(tiny_llama_folder, tmp_path, "on")
    assert [r["compiled"] for r in first.values()] == [alone["compiled"], data_parallel["compiled"],
                                                       with_tensors["compiled"]]
    assert [r["compiled"] for r in second.values()] == [0, 0, 0]
    assert all(r["not_moved"] == [] for run_ in (first, second) for r in run_.values())
    assert [r["ready"] for r in second.values()] == [r["ready"] for r in first.values()]
    assert all(r["tokens"] == alone["tokens"] for r in second.values())


MOVED = """
import json, logging, sys
import jax, jax.numpy as jnp, numpy as np
from jax import monitoring
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jpaged.program_cache import ProgramCache
compiled, messages = [], []
monitoring.register_event_duration_secs_listener(
    lambda event, duration, fun_name=None, **_: compiled.append(fun_name) if event.endswith("backend_compile_duration")
    and "ranks" in fun_name else None)
handler = logging.Handler()
handler.emit = lambda record: messages.append(record.getMessage())
logging.getLogger("jpaged").addHandler(handler)
logging.getLogger("jpaged").setLevel(logging.INFO)

def ranks(x):  # a sort: on CPU its program no longer serializes once it has run
    return jnp.argsort(x, axis=-1)

x = np.random.default_rng(int(sys.argv[2] == "on")).random((4, 16)).astype(np.float32)
caches, results = [], []
for device in jax.devices():  # each on its own one-device mesh, as data-parallel replicas are
    caches.append(ProgramCache(ranks, (), 0, "ranks", None))
    placed = jax.device_put(x, NamedSharding(Mesh(np.array([device]), ("tp",)), PartitionSpec()))
    out = caches[-1](placed)
    results.append([np.asarray(out).tolist(), [d.id for d in out.devices()]])
print(json.dumps({"compiled": len(compiled), "results": results, "expected": np.argsort(x, axis=-1).tolist(),
                  "moved": sum("loaded from the one made for devices [0]" in m for m in messages)}))
"""


def test_a_program_that_has_run_moves_to_other_devices(tmp_path):
    """A program another device's engine has already run (one holding a sort, which on CPU no
    longer serializes once run) is handed to each other device, not compiled again."""
    report = run(tmp_path, tmp_path, "off", MOVED,
                 XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=3")
    assert report["compiled"] == 1 and report["moved"] == 2
    assert report["results"] == [[report["expected"], [device]] for device in range(3)]


def test_the_cache_can_be_turned_off(tiny_llama_folder, tmp_path, link_built_kernels):
    link_built_kernels(tmp_path)
    off = run(tiny_llama_folder, tmp_path, setting="off")
    assert off["counts"] == {"hits": 0, "misses": 0}
    assert not (tmp_path / "xla").exists() and not (tmp_path / "programs").exists()


def test_an_unwritable_cache_folder_is_logged_once_and_not_used(tmp_path, caplog):
    from jpaged import compile_cache

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with caplog.at_level("WARNING", logger="jpaged"):
        assert not compile_cache._writable(not_a_folder / "xla")
    assert [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert compile_cache._writable(tmp_path / "xla")


def read_only(monkeypatch, folder: Path):
    """Every write under `folder` fails as on a read-only mount (root ignores file modes); other
    paths (jax's own cache, pytest's) are untouched."""
    import errno
    import pathlib
    import tempfile

    def refusing(original, where):
        def call(*args, **kwargs):
            target = where(args, kwargs)
            if target is not None and Path(target).resolve().is_relative_to(folder.resolve()):
                raise OSError(errno.EROFS, "Read-only file system", str(target))
            return original(*args, **kwargs)

        return call

    monkeypatch.setattr(os, "utime", refusing(os.utime, lambda args, kwargs: args[0]))
    monkeypatch.setattr(pathlib.Path, "unlink", refusing(pathlib.Path.unlink, lambda args, kwargs: args[0]))
    monkeypatch.setattr(tempfile, "NamedTemporaryFile",
                        refusing(tempfile.NamedTemporaryFile, lambda args, kwargs: kwargs.get("dir")))


def test_a_read_only_cache_still_serves_its_programs(tmp_path, monkeypatch, caplog):
    """Programs kept by an earlier process load from a folder that can no longer be written; a
    damaged one is compiled afresh and left in place; what cannot be kept is logged once."""
    import gc

    import jax.numpy as jnp

    from jpaged.program_cache import ProgramCache

    factor = int.from_bytes(os.urandom(3)) + 2  # a program new to jax's own cache, if this process has one on

    def scale(x):
        return factor * x

    def cache():
        return ProgramCache(scale, (), 0, "read-only test", tmp_path)

    x, y = jnp.arange(6.0), jnp.arange(3, dtype=jnp.int32)
    writer = cache()
    writer(x), writer(y)
    del writer  # with its programs: this process can no longer hand them over itself
    gc.collect()
    kept = sorted(tmp_path.iterdir())
    assert len(kept) == 2
    kept[1].write_bytes(b"damaged")
    read_only(monkeypatch, tmp_path)
    with caplog.at_level("INFO", logger="jpaged"):
        reader = cache()
        results = [reader(x), reader(y), reader(jnp.ones((2, 2)))]  # a new shape cannot be kept either
    assert [r.tolist() for r in results] == [(factor * x).tolist(), (factor * y).tolist(), [[factor] * 2] * 2]
    messages = [r.getMessage() for r in caplog.records]
    assert sum(" loaded from " + str(tmp_path) in m for m in messages) == 1
    assert sum("could not be loaded" in m for m in messages) == 1
    assert sum("compiled programs not kept in" in m for m in messages) == 1
    assert sorted(tmp_path.iterdir()) == kept


def test_programs_of_one_context_are_told_apart_by_their_function():
    """Two functions of one context and argument shapes (the model's layer and head programs share
    theirs) each run their own program, whether made here or handed over by this process."""
    import jax.numpy as jnp

    from jpaged.program_cache import ProgramCache

    def double(x):
        return 2 * x

    def negate(x):
        return -x

    x = jnp.arange(4.0)
    doubles, negates = ProgramCache(double, (), 0, "shared", None), ProgramCache(negate, (), 0, "shared", None)
    assert doubles(x).tolist() == [0.0, 2.0, 4.0, 6.0] and negates(x).tolist() == [-0.0, -1.0, -2.0, -3.0]
    assert ProgramCache(double, (), 0, "shared", None)(x).tolist() == [0.0, 2.0, 4.0, 6.0]


def test_the_folder_is_trimmed_least_recently_used_first(tmp_path):
    from jpaged import compile_cache

    times = {i: (1000 + i, 1000 + i) for i in range(6)}  # (access, modification) s: 100 bytes each
    times[1] = (1001, 5000)  # written late
    times[2] = (6000, 1002)  # read late
    for i, (accessed, modified) in times.items():
        file = tmp_path / f"entry{i}-cache"
        file.write_bytes(bytes(100))
        os.utime(file, (accessed, modified))
    compile_cache.trim(tmp_path, max_bytes=350)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["entry1-cache", "entry2-cache", "entry5-cache"]
    compile_cache.trim(tmp_path, max_bytes=1000)
    assert len(list(tmp_path.iterdir())) == 3
