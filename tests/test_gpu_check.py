"""The GPU check (`scripts/gpu_check.py`) in its CPU mode: every part runs and the summary holds
each one's findings, so the command is ready the day a GPU is lent.

It runs as on the GPU image, where the `gguf` package is missing: a stand-in `gguf` that fails to
import sits first on the path, so a GPU run cannot die on an import the check does not need.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["env", "tests", "greedy", "kernels", "throughput_model", "throughput_jpaged", "throughput_hf",
         "throughput_hf_batch", "throughput_offload", "default_memory"]


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    hidden = tmp_path_factory.mktemp("no_gguf")
    (hidden / "gguf").mkdir()
    (hidden / "gguf" / "__init__.py").write_text("raise ImportError('gguf is not on the GPU image')\n")
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hidden), str(ROOT)]))
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(out), "--cpu"],
                            capture_output=True, text=True, env=env, timeout=900)
    return result, out


@pytest.mark.full  # the check's CPU mode (about 3 minutes): before a GPU run
def test_every_part_finishes_and_writes_the_summary(check):
    result, out = check
    summary = json.loads((out / "summary.json").read_text())
    failed = {name: part.get("log_tail") for name, part in summary["parts"].items() if part["status"] != "ok"}
    assert not failed, failed
    assert result.returncode == 0, result.stdout[-3000:]
    assert list(summary["parts"]) == PARTS
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "summary.json", "summary.md"]
    markdown = (out / "summary.md").read_text()
    for title in ("Environment", "Kernel and engine-backend tests", "Greedy tokens", "Paged-attention kernels",
                  "Throughput: the model", "Throughput: jpaged", "Throughput: HF generate",
                  "Throughput: HF continuous batching", "Weight streaming", "The KV cache as sized by default"):
        assert f"## {title}" in markdown


@pytest.mark.full  # the check's CPU mode (about 3 minutes): before a GPU run
def test_parts_report_what_they_measured(check):
    _, out = check
    parts = {name: part["result"] for name, part in json.loads((out / "summary.json").read_text())["parts"].items()}
    assert parts["env"]["platform"] == "cpu" and parts["env"]["copy_bytes_per_s"] > 0
    assert parts["tests"]["counts"].get("passed", 0) > 0 and not parts["tests"]["failures"]
    assert parts["kernels"]["cpu_check"]["ok"]
    cold, warm = parts["throughput_jpaged"]["passes"]
    expected = parts["throughput_model"]["output_tokens"]
    assert warm["output_tokens"] == parts["throughput_hf"]["output_tokens"] == expected > 0
    assert parts["throughput_hf_batch"]["output_tokens"] == expected
    assert 0 < cold["compilations_so_far"] == warm["compilations_so_far"]  # the warm pass compiles nothing
    offload = parts["throughput_offload"]
    assert offload["runs"]["resident"]["streamed_bytes_per_step"] == 0 < offload["copy_gb_s"]
    assert offload["runs"]["host, every layer"]["streamed_bytes_per_step"] > 0
    assert all(len(run["step_ms"]) == len(offload["batches"]) for run in offload["runs"].values())
    default = parts["default_memory"]
    assert default["output_tokens"] == 8 * default["requests"] > 0 and default["num_blocks"] > 0
    assert default["kv_cache_bytes"] > 0 and default["step_temp_bytes"] > 0
    assert any("_step_fn" in line and "preallocated-temp" in line for line in default["large_allocations"])


@pytest.mark.full  # the check's CPU mode (about 3 minutes): before a GPU run
def test_greedy_tokens_match_hf(check):
    """The oracle is HF transformers: float32 greedy tokens of both backends equal its own."""
    _, out = check
    greedy = json.loads((out / "summary.json").read_text())["parts"]["greedy"]["result"]
    models = {row["model"] for row in greedy["rows"]}
    assert "llama-hd128-gqa4" in models
    for row in greedy["rows"]:
        assert row["dtype"] == "float32"
        for backend in ("reference", "pallas"):
            assert row["backends"][backend]["identical_sequences"] == row["prompts"], (row["model"], backend)
        assert ("fell_back_to_reference" in row["backends"]["pallas"]) == (row["model"] == "stories260K")


def test_a_killed_check_leaves_no_part_running_and_says_where_it_stopped(tmp_path):
    """SIGTERM in the middle: the running part's processes die with it and the summary says so."""
    import signal
    import time

    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(out), "--cpu"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _running_part(out)[0]:
        time.sleep(0.5)
    part, pid = _running_part(out)
    assert part, "no part started within two minutes"
    time.sleep(2)  # well inside the part
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parts"][part]["status"] == "interrupted" and part in summary["interrupted"]
    assert "pending" in {p["status"] for p in summary["parts"].values()}
    time.sleep(1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _running_part(out: Path) -> tuple[str | None, int | None]:
    try:
        parts = json.loads((out / "summary.json").read_text())["parts"]
    except (OSError, ValueError):
        return None, None
    return next(((name, p["pid"]) for name, p in parts.items() if p["status"] == "running" and name != "env"),
                (None, None))
