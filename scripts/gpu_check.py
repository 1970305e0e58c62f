"""The whole GPU story in one command: environment, kernels compiled for real, greedy tokens against
HF transformers, kernel speed and end-to-end throughput, summarised on one page.

    python scripts/gpu_check.py --prepare          # here, once: copy stories260K into .gpu_assets/
    PYTHONPATH=. python scripts/gpu_check.py OUT_DIR [--cpu] [--budget-s 585] [--skip kernels,...]

Each part (`scripts/gpu_check_sections.py`) runs in a process of its own, in order, under what is
left of `--budget-s` (a part that cannot get its minimum is skipped; one that overruns is killed
with its process group). A part that fails or times out is recorded and the next one runs.
After every part the summary is rewritten, so what finished survives a later failure or a kill
of the whole command. `OUT_DIR` receives three files: `summary.json`, `summary.md` and
`gpu_check.log` (every part's output). Nothing else is written there, so it fits the few files
that come back from a GPU machine.

Without a GPU (none found by `nvidia-smi`, or `--cpu`) it runs the same parts at small sizes with
the Pallas kernels in interpret mode; `python -m pytest --full` runs it that way so that it cannot rot. It needs
only what a GPU image has (jax, flax, transformers, torch): nothing is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from gpu_check_sections import die_with_parent

ROOT = Path(__file__).resolve().parents[1]
SECTIONS_SCRIPT = Path(__file__).with_name("gpu_check_sections.py")
ASSETS = ROOT / ".gpu_assets"
SHARED_STORIES = ROOT.parent / "shared" / "models" / "stories260K"

class Interrupted(Exception):
    """SIGTERM or SIGINT reached the check."""


def gpu_present() -> bool:
    """A GPU as `nvidia-smi` sees it (jax is not imported here: each part owns the device)."""
    if not shutil.which("nvidia-smi"):
        return False
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return result.returncode == 0 and "GPU" in result.stdout


def prepare() -> None:
    """Copy stories260K into the ignored `.gpu_assets/` folder, which travels with the checkout."""
    target = ASSETS / "stories260K"
    if not (SHARED_STORIES / "model.safetensors").is_file():
        sys.exit(f"stories260K not found at {SHARED_STORIES}")
    shutil.copytree(SHARED_STORIES, target, dirs_exist_ok=True, copy_function=shutil.copyfile)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"copied {SHARED_STORIES} to {target} ({size / 1e6:.1f} MB); name '.gpu_assets' in the run's carry")


def child_env(cpu: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if cpu:
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    return env


def run_part(name: str, work: Path, log, cpu: bool, timeout: float, on_start=lambda pid: None) -> dict:
    """Run one part in its own process group (which dies with this process); its status,
    seconds, and result, or error with what it found so far and its own last lines of output."""
    log.write(f"\n===== {name} (limit {timeout:.0f} s) =====\n")
    log.flush()
    log_start = log.tell()
    command = [sys.executable, str(SECTIONS_SCRIPT), name, str(work)] + (["--cpu"] if cpu else [])
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=child_env(cpu), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=die_with_parent)
    on_start(process.pid)
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:  # on a timeout, and on an interrupt of the check itself
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = time.perf_counter() - started
    result_file = work / f"{name}.json"
    if returncode == 0 and result_file.is_file():
        return {"status": "ok", "seconds": seconds, "result": json.loads(result_file.read_text())}
    failure = {"status": "timeout" if returncode is None else "failed", "seconds": seconds,
               "error": f"killed after {timeout:.0f} s" if returncode is None else f"exit code {returncode}",
               "log_tail": tail(log.name, log_start, 25)}
    partial = work / f"{name}.partial.json"
    if partial.is_file():
        failure["partial"] = json.loads(partial.read_text())
    return failure


def tail(path: str, offset: int, lines: int) -> str:
    """The last `lines` lines of `path` after byte `offset`, progress-bar redraws dropped."""
    with open(path, errors="replace") as f:
        f.seek(offset)
        text = f.read()
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(kept[-lines:])


def on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def run(out: Path, cpu: bool, budget_s: float, skip: frozenset[str] | set[str] = frozenset()) -> dict:
    if out.exists() and not out.is_dir():
        sys.exit(f"OUT_DIR {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    summary = {"mode": "cpu" if cpu else "gpu", "budget_s": budget_s,
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "parts": {name: {"status": "pending", "seconds": 0.0} for name in PARTS}}
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    name = next(iter(PARTS))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work, open(out / "gpu_check.log", "w") as log:
        try:
            for name, plan in PARTS.items():
                summary["parts"][name] = ({"status": "skipped", "seconds": 0.0, "error": "left out (--skip)"}
                                          if name in skip else
                                          next_part(name, plan, deadline, summary, Path(work), log, cpu, out))
                part = summary["parts"][name]
                print(f"{name:>20}: {part['status']} in {part['seconds']:.1f} s", flush=True)
                write_summary(out, summary)
        except Interrupted as signal_name:
            summary["interrupted"] = f"{signal_name} while {name} ran"
            summary["parts"][name] = {"status": "interrupted", "seconds": 0.0, "error": summary["interrupted"]}
            write_summary(out, summary)
            raise SystemExit(130) from None
    return summary


def next_part(name: str, plan: Part, deadline: float, summary: dict, work: Path, log, cpu: bool, out: Path) -> dict:
    """Run part `name` if the budget allows and what it needs worked; else say why not."""
    env = summary["parts"]["env"]
    if name != "env" and summary["mode"] == "gpu" and env.get("result", {}).get("platform") not in (None, "gpu"):
        return {"status": "skipped", "seconds": 0.0,
                "error": f"nvidia-smi sees a GPU but jax runs on {env['result']['platform']}"}
    if name.startswith("throughput_") and name != "throughput_model" \
            and summary["parts"]["throughput_model"]["status"] != "ok":
        return {"status": "skipped", "seconds": 0.0, "error": "the throughput model was not built"}
    left = deadline - time.monotonic()
    if left < plan.least_s:
        return {"status": "skipped", "seconds": 0.0,
                "error": f"{max(left, 0):.0f} s left of the {summary['budget_s']:.0f} s budget, {plan.least_s} s needed"}
    def on_start(pid: int) -> None:
        summary["parts"][name] = {"status": "running", "seconds": 0.0, "pid": pid}
        write_summary(out, summary)

    return run_part(name, work, log, cpu, min(left, plan.most_s if not cpu else max(plan.most_s, 300)), on_start)


# --- the summary ---------------------------------------------------------------------------------

def write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(render_markdown(summary))


def render_markdown(summary: dict) -> str:
    lines = [f"# jpaged GPU check ({summary['mode']} mode, {summary['started']})", ""]
    if summary.get("interrupted"):
        lines += [f"**Interrupted: {summary['interrupted']}.**", ""]
    lines += ["| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {p['status']} | {p['seconds']:.1f} |" for name, p in summary["parts"].items()]
    for name, part in summary["parts"].items():
        lines += ["", f"## {PARTS[name].title}", ""]
        if part["status"] == "ok":
            lines += PARTS[name].render(part["result"])
            continue
        lines.append(f"{part['status']}" + (f": {part['error']}" if part.get("error") else ""))
        if part.get("partial"):
            lines += ["", "What it found before it stopped:", ""] + render_partial(name, part["partial"])
        if part.get("log_tail"):
            lines += ["", "Its last lines of output:", "", "```", part["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def render_partial(name: str, partial: dict) -> list[str]:
    try:
        return PARTS[name].render(partial)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return ["```", json.dumps(partial)[:1500], "```"]


def md_env(r: dict) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
    return [f"- device: {r['device_kind']} x {r['num_devices']} ({r['platform']}, compute capability "
            f"{r['compute_capability']}), driver {r['driver']}, memory {r['gpu_memory']}",
            f"- Python {r['python']}; {versions}",
            f"- copy bandwidth (read + write of {r['copy_bytes'] / 2**30:.2f} GiB): "
            f"{r['copy_bytes_per_s'] / 1e9:.0f} GB/s"]


def md_tests(r: dict) -> list[str]:
    counts = ", ".join(f"{n} {kind}" for kind, n in r["counts"].items())
    line = f"`pytest {' '.join(r['files'])}`: **{counts}**"
    if "summary_line" in r:
        line += f" ({r['summary_line']}; exit {r['returncode']})"
    details = r.get("details", {})

    def described(failure: str) -> str:
        error = details.get(failure.split(" ", 1)[-1])
        return f"- {failure}" + (f": `{error[:200]}`" if error else "")

    return [line] + [described(failure) for failure in r["failures"][:40]]


def md_greedy(r: dict) -> list[str]:
    lines = [] if r.get("stories260K_found", True) else ["stories260K not found: run `gpu_check.py --prepare` first.",
                                                          ""]
    lines += ["| model | dtype | backend | sequences identical to HF | tokens agreeing (prefix) | first text |",
              "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        for backend, b in row["backends"].items():
            if "error" in b:
                lines.append(f"| {row['model']} | {row['dtype']} | {backend} | failed: {b['error'][:80]} | | |")
                continue
            label = backend + (" (fell back: reference)" if "fell_back_to_reference" in b else "")
            text = b["first_text"].replace("|", "\\|").replace("\n", " ")[:60]
            lines.append(f"| {row['model']} | {row['dtype']} | {label} | {b['identical_sequences']}/{row['prompts']} "
                         f"| {b['tokens_agreeing']}/{b['tokens']} | {text} |")
    return lines


def md_kernels(r: dict) -> list[str]:
    quantized = md_quantized(r["quantized_matmul"]) if "quantized_matmul" in r else []
    if "cpu_check" in r:
        check = r["cpu_check"]
        lines = [f"Interpret-mode check: {'ok' if check['ok'] else 'FAILED'} (tolerance {check['tolerance']:g})"]
        return lines + [f"- {name}: {error:.2e}" for name, error in check["max_abs_error"].items()] + quantized
    copy = r["copy_bytes_per_s"]
    lines = [f"{r['device']}, jax {r['jax']}, {r['dtype']}, head_dim {r['head_dim']}, {r['num_kv_heads']} KV heads, "
             f"block {r['block_size']}; microseconds per call", "",
             "| batch | context | GQA | ours decode | GB/s | % copy | jax best | jax / ours | ours ragged | ours mixed "
             "| reference | mosaic decode |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in r["results"]:
        s = case["seconds"]
        us = lambda k: f"{s[k] * 1e6:.1f}" if k in s else "-"  # noqa: E731
        gbps = case["kv_bytes"] / s["ours_decode"] / 1e9
        ratio = f"{s['jax'] / s['ours_decode']:.2f}x" if "jax" in s else "-"
        lines.append(f"| {case['batch']} | {case['context']} | {case['group']}:1 | {us('ours_decode')} | {gbps:.0f} | "
                     f"{100 * gbps * 1e9 / copy:.0f}% | {us('jax')} | {ratio} | {us('ours_ragged_decode')} | "
                     f"{us('ours_mixed')} | {us('reference_decode')} | {us('mosaic_decode')} |")
    return lines + quantized


def md_quantized(r: dict) -> list[str]:
    """The quantized matmul's cases: error against the reference and, on a GPU, microseconds a call."""
    cases = r.get("cases", [])
    ok = all(case["ok"] for case in cases)
    lines = ["", f"Quantized matmul ({'interpret mode, ' if r['interpret'] else ''}bfloat16 activations, kernel up to "
             f"{r['max_kernel_rows']} rows): {'ok' if ok else 'FAILED'} against the reference "
             f"(rtol {r['tolerance'][0]:g}, atol {r['tolerance'][1]:g} x RMS)", "",
             "| shape | K x N | M | weight | splits | max error | kernel us | GB/s | no split-K us | XLA dequantized us "
             "| XLA / kernel |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        s = case.get("seconds", {})
        us = lambda k: f"{s[k] * 1e6:.1f}" if k in s else "-"  # noqa: E731
        gbps = f"{case['weight_gb_per_s']['kernel']:.0f}" if s else "-"
        ratio = f"{case['xla_over_kernel']:.2f}x" if s else "-"
        lines.append(f"| {case['shape']} | {case['k']} x {case['n']} | {case['rows']} | {case['weight']} | "
                     f"{case['tiling']['splits']} | {case['max_abs_error']['kernel']:.2e} | {us('kernel')} | {gbps} | "
                     f"{us('kernel_no_split')} | {us('xla_dequantized')} | {ratio} |")
    return lines


def md_throughput_model(r: dict) -> list[str]:
    return [f"random Llama, {r['parameters'] / 1e6:,.1f}M parameters ({r['config']}), saved in bfloat16 in "
            f"{r['seconds']:.1f} s; {r['requests']} requests, prompts {r['prompt_lens']} tokens, outputs "
            f"{r['output_lens']} tokens ({r['output_tokens']} in all), EOS ignored"]


def md_throughput_offload(r: dict) -> list[str]:
    runs = r.get("runs", {})
    lines = [f"| run | MB streamed per step | {' | '.join(f'batch {b} ms' for b in r.get('batches', []))} |",
             f"|---|---|{'---|' * len(r.get('batches', []))}"]
    for label, run in runs.items():
        step_ms = {int(b): ms for b, ms in run["step_ms"].items()}  # keys are text after JSON
        cells = " | ".join(f"{step_ms[b]:.1f}" if b in step_ms else "-" for b in r["batches"])
        lines.append(f"| {label} | {run['streamed_bytes_per_step'] / 1e6:.1f} | {cells} |")
    if "copy_gb_s" in r:
        lines.append(f"pinned host to device copy: {r['copy_gb_s']:.1f} GB/s")
    return lines


def md_memory(r: dict) -> list[str]:
    """Weights, KV cache and the device's peak bytes, where the part measured them."""
    if not r.get("peak_bytes_in_use") or "kv_cache_bytes" not in r:
        return []
    working = r["peak_bytes_in_use"] - r["weight_bytes"] - r["kv_cache_bytes"]
    return [f"- device memory: weights {r['weight_bytes'] / 2**30:.2f} GiB, KV cache "
            f"{r['kv_cache_bytes'] / 2**30:.2f} GiB, peak in use {r['peak_bytes_in_use'] / 2**30:.2f} GiB: "
            f"{working / 2**30:.2f} GiB beyond both (one K or V array is {r['kv_cache_bytes'] / 2**31:.2f} GiB)"]


def md_default_memory(r: dict) -> list[str]:
    lines = [f"KV cache as sized by default: {r['num_blocks']} blocks"]
    if "output_tokens" in r:
        lines[0] += f"; {r['requests']} requests of 8 tokens gave {r['output_tokens']} tokens"
    if "step_temp_bytes" in r:
        lines.append(f"- step programs' working memory (XLA): {r['step_temp_bytes'] / 2**30:.2f} GiB")
    lines += [f"- large allocation: {line}" for line in r.get("large_allocations", [])]
    return lines + md_memory(r)


def md_throughput_jpaged(r: dict) -> list[str]:
    lines = [f"bfloat16, max_num_seqs {r['max_num_seqs']}, max_num_batched_tokens {r['max_num_batched_tokens']}; "
             f"load {r['load_seconds']:.1f} s"] if "max_num_seqs" in r else []
    lines += md_memory(r)
    for label, p in zip(("cold pass (compiles each new shape)", "warm pass"), r["passes"]):
        state = "" if p.get("finished", True) else ", stopped before the end"
        lines.append(f"- {label}: **{p['tokens_per_s']:.1f} output tokens/s** ({p['output_tokens']} tokens in "
                     f"{p['seconds']:.2f} s; {p.get('compilations_so_far', '?')} step programs compiled so far{state})")
    return lines


def md_throughput_hf(r: dict) -> list[str]:
    how = f"static batches of {r['batch_size']}" if "batch_size" in r else "continuous batching"
    same = r["identical_to_jpaged"]
    same = ("not compared (jpaged's part did not finish)" if same is None else
            f"{same}/{r['requests']} (random weights in bfloat16: near-tied logits make some differences expected)")
    lines = [f"{r['requests']} requests, {how}, {r['dtype']}: **{r['tokens_per_s']:.1f} output tokens/s** "
             f"({r['output_tokens']} tokens in {r['seconds']:.2f} s)", f"- sequences identical to jpaged's: {same}"]
    if r.get("incomplete"):
        lines.append(f"- {r['incomplete']} requests came back with fewer tokens than asked (counted as they came)")
    return lines


class Part(NamedTuple):
    title: str
    render: Callable[[dict], list[str]]  # its result (or partial result) as markdown lines
    most_s: float  # most seconds on a GPU
    least_s: float  # least seconds worth starting it with


# In the order they run (each a section of gpu_check_sections.py). The most add up to the default
# budget, so no part is squeezed out by an earlier one running to its limit.
PARTS = {
    "env": Part("Environment", md_env, 25, 10),
    "tests": Part("Kernel and engine-backend tests", md_tests, 110, 30),
    "greedy": Part("Greedy tokens against HF transformers on the same device", md_greedy, 90, 20),
    "kernels": Part("Paged-attention kernels", md_kernels, 65, 30),
    "throughput_model": Part("Throughput: the model", md_throughput_model, 30, 15),
    "throughput_jpaged": Part("Throughput: jpaged", md_throughput_jpaged, 120, 40),
    "throughput_hf": Part("Throughput: HF generate", md_throughput_hf, 35, 20),
    "throughput_hf_batch": Part("Throughput: HF continuous batching", md_throughput_hf, 35, 20),
    "throughput_offload": Part("Weight streaming: decode steps with every layer streamed", md_throughput_offload,
                               45, 30),
    "default_memory": Part("The KV cache as sized by default", md_default_memory, 30, 20),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path)
    parser.add_argument("--cpu", action="store_true", help="small sizes, kernels interpreted (the default without a GPU)")
    parser.add_argument("--budget-s", type=float, default=585, help="seconds for all parts together")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out (a rerun after a fix)")
    parser.add_argument("--prepare", action="store_true", help="copy stories260K into .gpu_assets/ and stop")
    args = parser.parse_args()
    if args.prepare:
        prepare()
        return
    if args.out_dir is None:
        parser.error("OUT_DIR is required")
    skip = {name for name in args.skip.split(",") if name}
    if skip - PARTS.keys():
        parser.error(f"--skip names unknown parts {sorted(skip - PARTS.keys())}; the parts are {list(PARTS)}")
    summary = run(args.out_dir, args.cpu or not gpu_present(), args.budget_s, skip)
    print((args.out_dir / "summary.md").read_text())
    failed = [name for name, part in summary["parts"].items() if part["status"] != "ok"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
