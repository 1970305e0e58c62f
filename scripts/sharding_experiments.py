"""Tensor-parallel sharding experiment: what each device holds and what one decode step sends.

For one model and each tensor-parallel degree TP in {1, 2, 4, 8} (those that divide the model's
heads and fit the available devices) this measures:

- per-device weight bytes: the addressable shards of `llm.engine.runner.state`, summed per device;
- per-device KV-cache bytes: the same over `llm.engine.runner.kv_cache`;
- the collectives of one decode step (batch of 8 decode sequences), read from the compiled HLO
  text of the runner's jitted step: count and result bytes of all-reduce, all-gather,
  reduce-scatter, all-to-all and collective-permute. The layers run in a `while` loop (scan), so
  ops inside the loop body appear once in the text but run once per layer; both the as-written
  figures and the per-step totals (loop-body ops x layers + the rest) are reported;
- decode step time: median of timed `llm.engine.step()` calls on a steady batch of 8 decoding
  sequences, after warm-up.

It prints a table, writes JSON (`--out`) and a PNG plot (`--plot`) of per-device bytes and step
time vs TP.

Without a multi-device accelerator it runs on 8 emulated CPU devices (it sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before importing jax). Those devices share
the same CPU cores, so step times there show sharding overheads, not scaling; on a machine with
several GPUs the same script measures real scaling.

Run (from the repository root):

    python scripts/sharding_experiments.py                      # random 8-head Llama, TP 1/2/4/8
    python scripts/sharding_experiments.py --model FOLDER_OR_ID --tp 1 3
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
from bench_common import save_json  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "c64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}
# `%name = <result type> all-reduce(` (or the async `-start` form; `-done` is not counted twice).
OP_RE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
SHAPE_RE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
# A computation's header: unindented, `[ENTRY] %name (params) -> type {` (params may hold `/*index=5*/`).
COMPUTATION_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")


def random_model_folder(root: str, layers: int) -> str:
    """A random-weight Llama: 8 heads over 2 KV heads, hidden 512, intermediate 1536, vocab 4096."""
    import transformers
    from hf_models import save_random_model

    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=1024)
    folder = os.path.join(root, "llama-random")
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


def loop_body_names(hlo: str) -> set[str]:
    """Computations used as a `while` body (the layer scan), and what they call, transitively."""
    bodies = set(re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo))
    calls: dict[str, set[str]] = {}
    computation = None
    for line in hlo.splitlines():
        header = COMPUTATION_RE.match(line)
        if header:
            computation = header.group(1)
            continue
        if computation:
            calls.setdefault(computation, set()).update(
                re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", line))
    seen, todo = set(), list(bodies)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(calls.get(name, ()))
    return seen


def summarize(ops: list[dict], in_loop: set[str], num_layers: int) -> dict:
    summary = {}
    for kind in COLLECTIVES:
        mine = [op for op in ops if op["kind"] == kind]
        loop = [op for op in mine if op["computation"] in in_loop]
        rest = [op for op in mine if op["computation"] not in in_loop]
        summary[kind] = {
            "in_hlo": len(mine), "in_hlo_bytes": sum(op["bytes"] for op in mine),
            "in_layer_loop": len(loop), "outside_loop": len(rest),
            "per_step": len(loop) * num_layers + len(rest),
            "per_step_bytes": sum(op["bytes"] for op in loop) * num_layers + sum(op["bytes"] for op in rest),
            "results": sorted({op["result"] for op in mine}),
        }
    return summary


def measure(folder: str, tp: int, args) -> dict:
    llm = LLM(folder, tensor_parallel_size=tp, dtype="float32", num_blocks=args.num_blocks,
              max_num_batched_tokens=args.batch * args.prompt_len)
    engine, runner = llm.engine, llm.engine.runner
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

    def capture(state, kv_cache, batch, sampling, **static):
        if "hlo" not in captured:
            captured["decode_seqs"] = batch.attention.num_decode_seqs
            captured["tokens"] = int(batch.token_ids.shape[0])
            captured["hlo"] = jitted.lower(state, kv_cache, batch, sampling, **static).compile().as_text()
        return jitted(state, kv_cache, batch, sampling, **static)

    runner._step = capture
    engine.step()
    runner._step = jitted

    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)

    hlo = captured["hlo"]
    num_layers = runner.model_config.num_layers
    summary = summarize(collectives_in_hlo(hlo), loop_body_names(hlo), num_layers)
    weights, kv = per_device_bytes(runner.state), per_device_bytes(runner.kv_cache)
    used = [d for d in range(len(weights)) if weights[d] or kv[d]]
    return {
        "tp": tp, "devices_used": len(used),
        "weight_bytes_per_device": max(weights), "kv_bytes_per_device": max(kv),
        "weight_bytes_total": sum(weights), "kv_bytes_total": sum(kv),
        "num_blocks": runner.num_blocks, "num_layers": num_layers,
        "decode_batch": {"seqs": captured["decode_seqs"], "padded_tokens": captured["tokens"]},
        "collectives": summary,
        "step_ms_median": 1e3 * statistics.median(times), "step_ms_all": [1e3 * t for t in times],
    }


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tps = [r["tp"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(tps, [r["weight_bytes_per_device"] / 2**20 for r in results], "o-", label="weights")
    left.plot(tps, [r["kv_bytes_per_device"] / 2**20 for r in results], "s-", label="KV cache")
    left.set(xlabel="tensor-parallel size", ylabel="MiB per device", xscale="log", xticks=tps,
             title="per-device memory")
    left.set_xticklabels(tps)
    left.minorticks_off()
    left.legend()
    right.plot(tps, [r["step_ms_median"] for r in results], "o-", color="C2")
    right.set(xlabel="tensor-parallel size", ylabel="ms (median)", xscale="log", xticks=tps,
              title="decode step time, batch 8")
    right.set_xticklabels(tps)
    right.minorticks_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or id (default: a random 8-head Llama)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model")
    parser.add_argument("--batch", type=int, default=8, help="decode sequences")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="bench_results/sharding.json")
    parser.add_argument("--plot", default="bench_results/sharding.png")
    args = parser.parse_args()

    devices = jax.devices()
    emulated = jax.default_backend() == "cpu"
    device_note = (f"{len(devices)} emulated CPU devices sharing the same {os.cpu_count()} cores: step times "
                   "show sharding overheads, not scaling" if emulated else
                   f"{len(devices)} x {devices[0].device_kind}")
    print(f"backend: {jax.default_backend()}, {device_note}")
    tps = [tp for tp in args.tp if tp <= len(devices)]

    with tempfile.TemporaryDirectory() as root:
        folder = args.model or random_model_folder(root, args.layers)
        results = []
        for tp in tps:
            try:
                results.append(measure(folder, tp, args))
            except ValueError as error:  # TP does not divide the heads
                print(f"TP {tp} skipped: {error}")
    model_name = args.model or (f"random Llama: 8 heads / 2 KV heads, hidden 512, intermediate 1536, "
                                f"{args.layers} layers, vocab 4096")

    print(f"\nmodel: {model_name}; float32; decode batch {args.batch} seqs; {args.num_blocks} KV blocks")
    print("collectives: 'per step' = ops in the layer-loop body x layers + ops outside the loop "
          "(the HLO text shows the loop body once; see JSON for as-written counts and result shapes)")
    kinds = [k for k in COLLECTIVES if any(r["collectives"][k]["in_hlo"] for r in results)]
    header = f"{'TP':>3} {'weights/dev MiB':>15} {'KV/dev MiB':>10} " + " ".join(
        f"{k + ' (n, KiB)':>24}" for k in kinds) + f" {'step ms':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        cells = " ".join(f"{c['per_step']:>9d} ({c['in_layer_loop']}/loop), {c['per_step_bytes'] / 1024:6.1f}"
                         .rjust(24) for c in (r["collectives"][k] for k in kinds))
        print(f"{r['tp']:>3} {r['weight_bytes_per_device'] / 2**20:>15.2f} {r['kv_bytes_per_device'] / 2**20:>10.2f} "
              f"{cells} {r['step_ms_median']:>8.2f}")
    if emulated:
        print(f"note: {device_note}.")

    save_json({"model": model_name, "backend": jax.default_backend(), "devices": device_note,
               "batch": args.batch, "results": results}, args.out)
    plot(results, args.plot, f"{model_name}\n{device_note}")


if __name__ == "__main__":
    main()
