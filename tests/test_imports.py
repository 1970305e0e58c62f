"""Every module of jpaged/, pallas_kernels/ and sharding/ imports on its own in a fresh interpreter
(no import cycles, no reliance on another module having been imported first), the host-side
modules (the engine's plain Python + numpy half) import without starting jax, and the kernels and
the mesh never import the engine (jpaged may import pallas_kernels and sharding, not the reverse).

Modules are found by walking the package folders, so a new module is checked without being listed
here. One fresh interpreter per host module; the others in children forked from one interpreter
that has imported only jax, flax and numpy (see `imports`).
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jpaged", "pallas_kernels", "sharding")

# The host side of the engine: scheduling, block bookkeeping, requests and their parameters, detokenizing, and
# the packages' own __init__ files. None of these may pull in jax.
HOST_MODULES = {
    "jpaged", "jpaged.__main__", "jpaged.cli", "jpaged.config", "jpaged.sampling_params", "jpaged.sequence",
    "jpaged.block_manager", "jpaged.scheduler", "jpaged.outputs", "jpaged.beam_search", "jpaged.engine_client",
    "jpaged.detokenizer", "jpaged.structured_output", "jpaged.reasoning", "jpaged.pooling", "jpaged.chat_template", "jpaged.interrupts", "jpaged.lora",
    "jpaged.images", "jpaged.image_tiles",
    "jpaged.prompt_inputs", "jpaged.metrics",
    "jpaged.loader", "jpaged.loader.default_model", "jpaged.models", "jpaged.parallel", "jpaged.padding",
    "pallas_kernels", "sharding",
    # the HTTP server runs the engine it is given, and imports none of it itself
    "jpaged.server", "jpaged.server.errors", "jpaged.server.protocol", "jpaged.server.params",
    "jpaged.server.prompts", "jpaged.server.async_engine", "jpaged.server.logprobs",
    "jpaged.server.serving", "jpaged.server.completions", "jpaged.server.chat", "jpaged.server.app",
    "jpaged.server.launch", "jpaged.server.tools", "jpaged.server.tool_parsers", "jpaged.server.embeddings",
    "jpaged.server.scoring", "jpaged.server.batch", "jpaged.scoring",
}

def discover() -> list[str]:
    modules = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


MODULES = discover()


# Imports a module and prints what it loaded (on stdout's last line) or its traceback (on stderr).
_PROBE = """
import importlib, json, sys, traceback
def probe(module):
    try:
        importlib.import_module(module)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    print(json.dumps({"jax": "jax" in sys.modules, "jpaged": "jpaged" in sys.modules}), flush=True)
"""

# One interpreter that has imported the third-party libraries the device modules use (and none of
# ours) forks a child per module: each child still imports that module and all of jpaged it needs
# on its own, without paying again for starting jax.
_FORKING_PROBE = _PROBE + """
import os, jax, jax.numpy, flax.nnx, numpy
for module in sys.argv[1:]:
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        print(f"BEGIN {module}", flush=True); print(f"BEGIN {module}", file=sys.stderr, flush=True)
        code = 0
        try:
            probe(module)
        except SystemExit as exit:
            code = exit.code
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    print(f"END {module} {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}", flush=True)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _import_alone(module: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of importing `module` in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", _PROBE + "probe(sys.argv[1])", module], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def _import_each_after_fork(modules: list[str]) -> dict[str, tuple[int, str, str]]:
    """`_import_alone` of each module, in children forked from one interpreter that has imported
    jax, flax and numpy."""
    result = subprocess.run([sys.executable, "-c", _FORKING_PROBE, *modules], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stdout, stderr = _split(result.stdout), _split(result.stderr)
    codes = dict(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("END "))
    return {module: (int(codes[module]), stdout[module], stderr.get(module, "")) for module in modules}


def _split(text: str) -> dict[str, str]:
    """Each child's output, by module: the lines after its BEGIN marker up to the next marker."""
    parts: dict[str, str] = {}
    current = None
    for line in text.splitlines(keepends=True):
        if line.startswith("BEGIN "):
            current = line.split()[1]
            parts[current] = ""
        elif line.startswith("END "):
            current = None
        elif current:
            parts[current] += line
    return parts


@pytest.fixture(scope="module")
def imports() -> dict[str, tuple[int, str, str]]:
    """Each host module imported in its own fresh interpreter, a few at a time; each other module
    in a child of one interpreter that has only jax, flax and numpy imported (a fresh interpreter
    costs seconds of jax start-up per module; a host module must not find jax imported)."""
    host = [m for m in MODULES if m in HOST_MODULES]
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        found = dict(zip(host, pool.map(_import_alone, host)))
    return {**found, **_import_each_after_fork([m for m in MODULES if m not in HOST_MODULES])}


def test_discovery_finds_every_host_module():
    assert HOST_MODULES <= set(MODULES), sorted(HOST_MODULES - set(MODULES))
    assert len(MODULES) > len(HOST_MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(imports, module):
    code, stdout, stderr = imports[module]
    assert code == 0, f"`import {module}` failed when imported on its own:\n{stderr}"
    loaded = json.loads(stdout.strip().splitlines()[-1])
    if module in HOST_MODULES:
        assert not loaded["jax"], f"`import {module}` imported jax"
    if not module.startswith("jpaged"):
        assert not loaded["jpaged"], f"`import {module}` imported jpaged"
