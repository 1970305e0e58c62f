"""Sharding experiment: what each device holds, what one decode step sends, and how long it takes,
for a dense and a mixture-of-experts model across tensor / pipeline / expert / data parallel layouts.

For each model and each layout `tp x pp x ep x dp` that fits the model and the devices:

- per-device weight bytes: the addressable shards of every replica's `runner.state`, per device;
- per-device KV-cache bytes: the same over the replicas' `runner.kv_cache`;
- the collectives of one decode step (a steady batch of decoding sequences), read from the
  compiled HLO of (the first replica's) jitted step: count and result bytes of all-reduce,
  all-gather, reduce-scatter, all-to-all and collective-permute. Ops inside loops (the layer
  scan, the pipeline's tick loop) appear once in the HLO text; each is multiplied by the trip
  counts of the loops around it (XLA's `known_trip_count`), so the per-step figures count every
  execution. Ops inside the pipeline's `cond` are counted as if every tick were busy (an upper
  bound: idle ticks skip them);
- decode step time: median of timed `engine.step()` calls after warm-up, and the decode
  throughput it gives (tokens generated per timed step / step time: the rows that ran, which is
  fewer than `--batch` when the KV blocks cannot hold every sequence);
- for pipeline layouts, a sweep over the decode micro-batch count M: step time and the idle share
  of the schedule, `(S - 1) / (M + S - 1)` (the busy trace that `tests/test_parallel_layouts.py`
  checks against the run).

It prints tables, writes JSON (`--out`) and a PNG plot (`--plot`).

Without accelerators it runs on 8 emulated CPU devices (it sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before importing jax). Those devices share
the machine's CPU cores, so step times there show sharding overheads, not scaling; on a machine
with several GPUs the same script measures real scaling.

Run (from the repository root):

    python scripts/sharding_experiments.py                          # both models, default layouts
    python scripts/sharding_experiments.py --models dense --layouts 1x1x1x1 2x2x1x1
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only affects the host (CPU) platform: harmless when GPUs are present.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import non_negative_int, positive_int, pyplot, save_json  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "c64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}
# `%name = <result type> all-reduce(` (or the async `-start` form; `-done` is not counted twice).
OP_RE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
SHAPE_RE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
# A computation's header: unindented, `[ENTRY] %name (params) -> type {` (params may hold `/*index=5*/`).
COMPUTATION_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")


MODELS = {
    "dense": "random Llama: 8 heads / 2 KV heads, hidden 512, intermediate 1536, 4 layers, vocab 4096",
    "moe": "random Mixtral: 8 heads / 2 KV heads, hidden 512, 8 experts of 768 (top 2), 4 layers, vocab 4096",
}
DEFAULT_LAYOUTS = {
    "dense": ["1x1x1x1", "2x1x1x1", "4x1x1x1", "8x1x1x1", "1x2x1x1", "1x4x1x1", "2x2x1x1", "2x4x1x1",
              "1x1x1x2", "1x1x1x4", "1x1x1x8", "2x1x1x4"],
    "moe": ["1x1x1x1", "2x1x1x1", "8x1x1x1", "1x1x2x1", "1x1x4x1", "1x1x8x1", "2x1x2x1", "2x1x4x1", "1x2x2x1",
            "2x2x2x1", "1x1x1x4", "1x1x2x4"],
}


def random_model_folder(root: str, kind: str) -> str:
    import transformers
    from hf_models import save_random_model

    common = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=1024)
    if kind == "dense":
        config = transformers.LlamaConfig(intermediate_size=1536, **common)
    else:
        config = transformers.MixtralConfig(intermediate_size=768, num_local_experts=8, num_experts_per_tok=2,
                                            sliding_window=None, **common)
    folder = os.path.join(root, kind)
    save_random_model(folder, config, seed=0)
    return folder


def per_device_bytes(tree) -> list[int]:
    totals = {d.id: 0 for d in jax.devices()}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device.id] += shard.data.nbytes
    return [totals[d.id] for d in jax.devices()]


def result_bytes(result_type: str) -> int:
    total = 0
    for dtype, dims in SHAPE_RE.findall(result_type):
        if dtype not in DTYPE_BYTES:
            continue
        total += DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def collectives_in_hlo(hlo: str) -> list[dict]:
    """Every collective op in the HLO text: kind, result type, result bytes, enclosing computation."""
    ops, computation = [], None
    for line in hlo.splitlines():
        header = COMPUTATION_RE.match(line)
        if header:
            computation = header.group(1)
            continue
        match = OP_RE.search(line)
        if match:
            result_type, kind = match.group(1), match.group(2)
            ops.append({"kind": kind, "result": result_type.strip(), "bytes": result_bytes(result_type),
                        "computation": computation})
    return ops


def computation_runs(hlo: str) -> dict[str, float]:
    """How often each computation runs in one execution: summed over its call sites, each the
    caller's runs times the trip count of the `while` it is the body of, or over the branches of
    a `conditional` (one runs per call: a `lax.switch` over the layers in their scan runs each
    branch once per as many trips, so each counts 1 / branches; the same for a data-dependent
    choice, an average), 1 for other calls."""
    callers: dict[str, list[tuple[str, float]]] = {}
    entry, computation = None, None
    for line in hlo.splitlines():
        header = COMPUTATION_RE.match(line)
        if header:
            computation = header.group(1)
            entry = computation if line.startswith("ENTRY") else entry
            continue
        if computation is None:
            continue
        body = re.search(r"\bwhile\(.*?body=%?([\w.\-]+)", line)
        if body:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            callers.setdefault(body.group(1), []).append((computation, int(trips.group(1)) if trips else 1))
        for callee in re.findall(r"(?:calls|to_apply|condition)=%?([\w.\-]+)", line):
            callers.setdefault(callee, []).append((computation, 1))
        branches = re.findall(r"(?:true_computation|false_computation)=%?([\w.\-]+)", line)
        for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
            branches += re.findall(r"%?([\w.\-]+)", group)
        for branch in branches:
            callers.setdefault(branch, []).append((computation, 1 / len(branches)))
    runs: dict[str, float] = {}

    def count(name: str, seen: frozenset = frozenset()) -> float:
        if name == entry:
            return 1
        if name not in runs:
            runs[name] = sum(count(caller, seen | {name}) * trips
                             for caller, trips in callers.get(name, ()) if caller not in seen)
        return runs[name]

    return {name: count(name) for name in set(callers) | {entry}}


def summarize(ops: list[dict], runs: dict[str, float]) -> dict:
    summary = {}
    for kind in COLLECTIVES:
        mine = [op for op in ops if op["kind"] == kind]
        summary[kind] = {
            "in_hlo": len(mine), "in_hlo_bytes": sum(op["bytes"] for op in mine),
            "per_step": round(sum(runs.get(op["computation"], 1) for op in mine), 2),
            "per_step_bytes": round(sum(runs.get(op["computation"], 1) * op["bytes"] for op in mine)),
            "results": sorted({op["result"] for op in mine}),
        }
    return summary


def parse_layout(text: str) -> dict:
    tp, pp, ep, dp = (int(x) for x in text.split("x"))
    return dict(tensor_parallel_size=tp, pipeline_parallel_size=pp, expert_parallel_size=ep, data_parallel_size=dp)


def layout_arg(text: str) -> str:
    """An argparse type: `tp x pp x ep x dp`, four integers >= 1 joined by x (e.g. 2x2x1x1)."""
    parts = text.split("x")
    if len(parts) != 4 or not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a layout tp x pp x ep x dp of integers >= 1, e.g. 2x2x1x1")
    return text


def measure(folder: str, layout: str, args, decode_micro_batches: int = 1) -> dict:
    llm = LLM(folder, dtype="float32", num_blocks=args.num_blocks, max_num_batched_tokens=args.batch * args.prompt_len,
              decode_micro_batches=decode_micro_batches, **parse_layout(layout))
    engine = llm.engine
    replicas = getattr(engine, "replicas", [engine])
    runner = replicas[0].runner
    vocab = runner.model_config.vocab_size
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.warmup + args.iters + 8, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", {"prompt_token_ids": rng.integers(3, vocab, args.prompt_len).tolist()}, params)
    for _ in range(args.warmup):  # prefill, then decode steps that compile the decode shape
        engine.step()

    # Lower the next (decode) step from its real arguments, before the jitted call donates the cache.
    captured = {}
    jitted = runner._step

    def capture(state, kv_cache, batch, **static):
        if "hlo" not in captured:
            captured["decode_seqs"] = int((np.asarray(batch.attention.query_lens) == 1).sum())
            captured["tokens"] = list(batch.token_ids.shape)
            captured["hlo"] = jitted.lower(state, kv_cache, batch, **static).compile().as_text()
        return jitted(state, kv_cache, batch, **static)

    capture.prefetch = jitted.prefetch  # the engine makes the next decode program ready in the background
    runner._step = capture
    engine.step()
    runner._step = jitted

    times, generated_before = [], engine.stats().num_generated_tokens
    for _ in range(args.iters):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    tokens_per_step = (engine.stats().num_generated_tokens - generated_before) / args.iters  # rows that ran

    hlo = captured["hlo"]
    summary = summarize(collectives_in_hlo(hlo), computation_runs(hlo))
    weights = np.sum([per_device_bytes(r.runner.state) for r in replicas], axis=0)
    kv = np.sum([per_device_bytes(r.runner.kv_cache) for r in replicas], axis=0)
    step_ms = 1e3 * statistics.median(times)
    return {
        "layout": layout, **parse_layout(layout), "devices_used": int(np.count_nonzero(weights + kv)),
        "decode_micro_batches": runner.parallel.decode_micro_batches,
        "weight_bytes_per_device": int(weights.max()), "kv_bytes_per_device": int(kv.max()),
        "weight_bytes_total": int(weights.sum()), "kv_bytes_total": int(kv.sum()),
        "num_blocks_per_replica": runner.num_blocks, "num_layers": runner.model_config.num_layers,
        "decode_batch": {"seqs": args.batch, "replica_decode_rows": captured["decode_seqs"],
                         "replica_padded_tokens": captured["tokens"]},
        "collectives": summary,
        "step_ms_median": step_ms, "step_ms_all": [1e3 * t for t in times],
        "decode_tokens_per_step": tokens_per_step, "decode_tokens_per_s": tokens_per_step / (step_ms / 1e3),
    }


def print_table(model: str, results: list[dict]) -> None:
    print(f"\n{model}: {MODELS[model]}")
    kinds = [k for k in COLLECTIVES if any(r["collectives"][k]["in_hlo"] for r in results)]
    header = (f"{'tp x pp x ep x dp':>17} {'weights/dev MiB':>15} {'KV/dev MiB':>10} "
              + " ".join(f"{k + ' n, KiB':>24}" for k in kinds) + f" {'step ms':>8} {'tok/s':>7}")
    print(header)
    print("-" * len(header))
    for r in results:
        cells = " ".join(f"{c['per_step']:>6g}, {c['per_step_bytes'] / 1024:8.1f}".rjust(24)
                         for c in (r["collectives"][k] for k in kinds))
        print(f"{r['layout']:>17} {r['weight_bytes_per_device'] / 2**20:>15.2f} {r['kv_bytes_per_device'] / 2**20:>10.2f} "
              f"{cells} {r['step_ms_median']:>8.2f} {r['decode_tokens_per_s']:>7.0f}")


def plot(results: dict, sweeps: dict, path: str, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, key, label in ((axes[0], "weight_bytes_per_device", "weights MiB / device"),
                           (axes[1], "step_ms_median", "decode step ms (median)")):
        for i, (model, runs) in enumerate(results.items()):
            values = [r[key] / (2**20 if "bytes" in key else 1) for r in runs]
            ax.barh([f"{model} {r['layout']}" for r in runs], values, color=f"C{i}", label=model)
        ax.set(xlabel=label)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.legend()
    ax = axes[2]
    twin = ax.twinx()
    for i, (layout, runs) in enumerate(sweeps.items()):
        stages = runs[0]["pipeline_parallel_size"]
        ms = [r["decode_micro_batches"] for r in runs]
        ax.plot(ms, [r["step_ms_median"] for r in runs], "o-", color=f"C{i}", label=f"step ms, {layout}")
        twin.plot(ms, [(stages - 1) / (m + stages - 1) for m in ms], "x--", color=f"C{i}", alpha=0.6,
                  label=f"idle share, S={stages}")
    ax.set(xlabel="decode micro-batches M", ylabel="step ms (median)", xscale="log", title="pipeline micro-batches")
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.minorticks_off()
    if sweeps:
        twin.set(ylabel="idle share (S-1)/(M+S-1)", ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=7)
        twin.legend(loc="upper right", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--layouts", nargs="+", type=layout_arg, help="tp x pp x ep x dp layouts such as 2x2x1x1 "
                        "(default: a set per model)")
    parser.add_argument("--micro-batch-sweep", nargs="*", type=layout_arg, default=["1x2x1x1", "1x4x1x1"],
                        help="dense-model pipeline layouts to sweep the decode micro-batch count over")
    parser.add_argument("--batch", type=positive_int, default=8, help="decode sequences")
    parser.add_argument("--prompt-len", type=positive_int, default=16)
    parser.add_argument("--num-blocks", type=positive_int, default=64)
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--iters", type=positive_int, default=10)
    parser.add_argument("--out", default="bench_results/sharding.json")
    parser.add_argument("--plot", default="bench_results/sharding.png")
    args = parser.parse_args()

    devices = jax.devices()
    emulated = jax.default_backend() == "cpu"
    device_note = (f"{len(devices)} emulated CPU devices sharing the same {os.cpu_count()} cores: step times "
                   "show sharding overheads, not scaling" if emulated else
                   f"{len(devices)} x {devices[0].device_kind}")
    print(f"backend: {jax.default_backend()}, {device_note}")

    results, sweeps, ran = {}, {}, set()
    with tempfile.TemporaryDirectory() as root:
        for model in args.models:
            folder = random_model_folder(root, model)
            results[model] = []
            for layout in args.layouts or DEFAULT_LAYOUTS[model]:
                try:
                    results[model].append(measure(folder, layout, args))
                    ran.add(str(layout))
                except ValueError as error:  # the layout does not fit the model or the devices
                    print(f"{model} {layout} skipped: {error}")
            if model == "dense":
                for layout in args.micro_batch_sweep:
                    sweeps[layout] = [measure(folder, layout, args, m) for m in (1, 2, 4, 8) if m <= args.batch]

    print(f"\nfloat32; decode batch {args.batch} seqs; {args.num_blocks} KV blocks per replica")
    print("collectives per decode step: each op x the trip counts of the loops around it (see JSON for "
          "as-written counts and result shapes)")
    for model, runs in results.items():
        print_table(model, runs)
    for layout, runs in sweeps.items():
        stages = runs[0]["pipeline_parallel_size"]
        print(f"\npipeline {layout} (S = {stages}), decode micro-batches M:")
        for r in runs:
            m = r["decode_micro_batches"]
            print(f"  M={m}: step {r['step_ms_median']:.2f} ms, idle share (S-1)/(M+S-1) = "
                  f"{(stages - 1) / (m + stages - 1):.2f}, collective-permutes "
                  f"{r['collectives']['collective-permute']['per_step']}")
    if emulated:
        print(f"note: {device_note}.")

    save_json({"models": MODELS, "backend": jax.default_backend(), "devices": device_note, "batch": args.batch,
               "results": results, "micro_batch_sweeps": sweeps}, args.out)
    plot(results, sweeps, args.plot, device_note)
    if not_run := [str(layout) for layout in args.layouts or () if str(layout) not in ran]:
        sys.exit(f"layouts asked for that no model ran (see above): {', '.join(not_run)}")


if __name__ == "__main__":
    main()
