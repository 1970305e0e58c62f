"""Every module of jpaged/, pallas_kernels/ and sharding/ imports on its own in a fresh interpreter
(no import cycles, no reliance on another module having been imported first), the host-side
modules (the engine's plain Python + numpy half) import without starting jax, and the kernels and
the mesh never import the engine (jpaged may import pallas_kernels and sharding, not the reverse).

Modules are found by walking the package folders, so a new module is checked without being listed
here. One subprocess per module, a few at a time.
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
    "jpaged.detokenizer", "jpaged.structured_output", "jpaged.chat_template", "jpaged.interrupts",
    "jpaged.loader", "jpaged.loader.default_model", "jpaged.models", "jpaged.parallel", "jpaged.padding",
    "pallas_kernels", "sharding",
    # the HTTP server runs the engine it is given, and imports none of it itself
    "jpaged.server", "jpaged.server.errors", "jpaged.server.protocol", "jpaged.server.params",
    "jpaged.server.prompts", "jpaged.server.async_engine", "jpaged.server.metrics", "jpaged.server.logprobs",
    "jpaged.server.serving", "jpaged.server.completions", "jpaged.server.chat", "jpaged.server.app",
    "jpaged.server.launch", "jpaged.server.tools", "jpaged.server.tool_parsers",
}

_PROBE = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
          "print(json.dumps({'jax': 'jax' in sys.modules, 'jpaged': 'jpaged' in sys.modules}))")


def discover() -> list[str]:
    modules = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


MODULES = discover()


def _import_alone(module: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", _PROBE, module], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def imports() -> dict[str, subprocess.CompletedProcess]:
    """Each module imported in its own fresh interpreter, run a few at a time."""
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        return dict(zip(MODULES, pool.map(_import_alone, MODULES)))


def test_discovery_finds_every_host_module():
    assert HOST_MODULES <= set(MODULES), sorted(HOST_MODULES - set(MODULES))
    assert len(MODULES) > len(HOST_MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(imports, module):
    result = imports[module]
    assert result.returncode == 0, f"`import {module}` failed in a fresh interpreter:\n{result.stderr}"
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    if module in HOST_MODULES:
        assert not loaded["jax"], f"`import {module}` imported jax"
    if not module.startswith("jpaged"):
        assert not loaded["jpaged"], f"`import {module}` imported jpaged"
