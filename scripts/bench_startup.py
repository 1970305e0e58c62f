"""Start-up time: `jpaged generate "What is the capital of France?"` as a fresh process, the first
run (after the one-time download of the default model, with empty caches) and the second.

Two measurements, each run twice on a fresh cache directory holding only the downloaded GGUF:

- the CLI itself (`python -m jpaged generate ...`), wall time of the whole process;
- the same steps in a probe process with timers: import (`jpaged.engine` and what it pulls in),
  model load (`LLM()`), the first token (a 1-token request: prefill, sampling, and their
  compilation) and the rest of the answer (128 tokens at most); the seconds jax spent compiling
  or loading compiled programs in each phase come from jax's own monitoring events.

    python scripts/bench_startup.py [--data-parallel-size N] [--out bench_results/startup.json]

`--data-parallel-size N` starts N replicas (on CPU, N emulated devices: `XLA_FLAGS=
--xla_force_host_platform_device_count=N`), which compile each program once between them; the
probe then asks the question N times at once, so that every replica runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from bench_common import save_json

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"
PROBE = """
import json, time
started = time.perf_counter()
from jax import monitoring
compile_seconds = [0.0]
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **_: compile_seconds.__setitem__(0, compile_seconds[0] + duration)
    if event.startswith(("/jax/core/compile/", "/jax/compilation_cache/cache_retrieval")) else None)
import jpaged.engine
from jpaged import LLM, SamplingParams, compile_cache
marks = {"import": (time.perf_counter(), compile_seconds[0])}
llm = LLM(data_parallel_size=%d)
marks["load"] = (time.perf_counter(), compile_seconds[0])
messages = [{"role": "user", "content": %r}]
llm.chat([messages] * %d, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)  # one per replica
marks["first token"] = (time.perf_counter(), compile_seconds[0])
answer = llm.chat([messages] * %d, SamplingParams(temperature=0.0, max_tokens=128), use_tqdm=False)[0].outputs[0].text
marks["rest of answer"] = (time.perf_counter(), compile_seconds[0])
phases, last = {}, (started, 0.0)
for name, mark in marks.items():
    phases[name] = {"seconds": mark[0] - last[0], "compile_seconds": mark[1] - last[1]}
    last = mark
print(json.dumps({"phases": phases, "answer": answer, "compile_cache": compile_cache.counts(),
                  "programs": llm.engine.stats().num_compilations}))
"""


def fresh_cache(gguf: Path, parent: Path, name: str) -> Path:
    """A cache directory holding only the downloaded default model (as after the one-time download)."""
    folder = parent / name
    folder.mkdir()
    for file in (gguf, gguf.with_name(gguf.name + ".sha256")):
        os.link(file, folder / file.name) if file.stat().st_dev == folder.stat().st_dev else shutil.copy(file, folder)
    return folder


def timed(command: list[str], cache: Path, devices: int) -> tuple[float, str]:
    env = dict(os.environ, JPAGED_CACHE_DIR=str(cache))
    if devices > 1:  # emulated on CPU; ignored by other backends
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-parallel-size", type=int, default=1, help="engine replicas (default 1)")
    parser.add_argument("--out", default="bench_results/startup.json")
    args = parser.parse_args()
    if args.data_parallel_size < 1:
        parser.error(f"--data-parallel-size must be at least 1, got {args.data_parallel_size}")

    from jpaged.loader.default_model import default_model_path

    gguf = default_model_path()  # the one-time download, outside the timings
    replicas = args.data_parallel_size
    cli = [sys.executable, "-m", "jpaged", "generate", QUESTION, "--data-parallel-size", str(replicas)]
    probe = [sys.executable, "-c", PROBE % (replicas, QUESTION, replicas, replicas)]
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "jax": metadata.version("jax"),
              "transformers": metadata.version("transformers"), "question": QUESTION,
              "data_parallel_size": replicas, "cli": {}, "probe": {}}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        cli_cache, probe_cache = fresh_cache(gguf, Path(tmp), "cli"), fresh_cache(gguf, Path(tmp), "probe")
        for run in ("first", "second"):
            seconds, answer = timed(cli, cli_cache, replicas)
            result["cli"][run] = {"seconds": seconds, "answer": answer}
            print(f"CLI, {run} run: {seconds:.1f} s -> {answer!r}", flush=True)
        for run in ("first", "second"):
            _, output = timed(probe, probe_cache, replicas)
            result["probe"][run] = json.loads(output.splitlines()[-1])
    print_table(result)
    save_json(result, args.out)


def print_table(result: dict) -> None:
    phases = list(result["probe"]["first"]["phases"])
    print(f"\n{'':<28}{'first run':>18}{'second run':>18}")
    print(f"{'CLI process, wall':<28}" + "".join(f"{result['cli'][r]['seconds']:>16.1f} s" for r in ("first", "second")))
    for phase in phases:
        cells = []
        for run in ("first", "second"):
            p = result["probe"][run]["phases"][phase]
            cells.append(f"{p['seconds']:>7.2f} s ({p['compile_seconds']:.2f} jit)")
        print(f"{'  ' + phase:<28}" + "".join(f"{c:>18}" for c in cells))
    counts = [result["probe"][r]["compile_cache"] for r in ("first", "second")]
    print(f"{'  compile cache hits/misses':<28}" + "".join(f"{c['hits']:>12}/{c['misses']:<5}" for c in counts))
    print(f"{'  programs made ready':<28}" + "".join(f"{result['probe'][r]['programs']:>18}" for r in ("first", "second")))


if __name__ == "__main__":
    main()
