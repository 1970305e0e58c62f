"""Streaming decoder layers onto the device (`offload_weights`): decode step time against the share of
layers offloaded and the batch size, from host memory and from memory-mapped files, with the
platform's own copy bandwidth beside what the streaming achieved.

    python scripts/bench_offload.py [--model PATH] [--batches 1,8,32] [--shares 0,0.5,1] [--out bench_results/offload.json]

For each batch size B: B requests of 16 prompt tokens decode 17 tokens together (best of 3 runs
after a warm-up); the decode step time is (time of 17 output tokens - time of 1) / 16. Rows: the
one-program step with every weight on the device ("resident"), then per mode ("host", "disk")
and share s of the layers streamed (a `device_weight_budget_gib` that keeps the first (1 - s) of
them): the per-layer programs' step time, its overhead against "resident", the bytes streamed
per step, and the bandwidth that implies if the whole overhead were copying. "copy" is the
platform's own `jax.device_put` of one layer's bytes from pinned host memory / a memory-mapped
file (after a first read, so the file is in the page cache). Prints a table, saves JSON and a
plot beside it.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from bench_common import positive_int, pyplot, save_json

from jpaged import LLM, SamplingParams  # noqa: E402
from jpaged.loader.host_store import HostStore  # noqa: E402

PROMPT_TOKENS, DECODE_TOKENS, REPEATS = 16, 17, 3


def step_time(llm: LLM, batch: int) -> float:
    """Seconds per decode step of `batch` sequences decoding together."""
    rng = np.random.default_rng(batch)
    vocab = llm.engine.model_config.vocab_size
    requests = [{"prompt_token_ids": rng.integers(10, vocab, PROMPT_TOKENS).tolist()} for _ in range(batch)]
    times = {}
    for n in (1, DECODE_TOKENS):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        llm.generate(requests, params, use_tqdm=False)
        times[n] = min(timed(llm, requests, params) for _ in range(REPEATS))
    return (times[DECODE_TOKENS] - times[1]) / (DECODE_TOKENS - 1)


def timed(llm: LLM, requests: list[dict], params: SamplingParams) -> float:
    started = time.perf_counter()
    llm.generate(requests, params, use_tqdm=False)
    return time.perf_counter() - started


def copy_bandwidth(num_bytes: int, mode: str) -> float:
    """Bytes per second of `jax.device_put` of `num_bytes` of float32 kept as `mode` keeps a layer."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    array = np.random.default_rng(0).standard_normal(num_bytes // 4).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        kept = HostStore(folder if mode == "disk" else None).put(("layer",), array)
        if mode == "host":
            kept = jax.device_put(kept, device.with_memory_kind("pinned_host"))
        jax.block_until_ready(jax.device_put(kept, device))
        started, repeats = time.perf_counter(), 10
        for _ in range(repeats):
            jax.block_until_ready(jax.device_put(kept, device))
        seconds = (time.perf_counter() - started) / repeats
    return array.nbytes / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: the built-in model)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--shares", default="0,0.5,1", help="shares of the layers streamed")
    parser.add_argument("--out", default="bench_results/offload.json")
    args = parser.parse_args()
    try:
        batches = [positive_int(b) for b in args.batches.split(",")]
        shares = [float(s) for s in args.shares.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(f"--batches takes integers >= 1 and --shares numbers in [0, 1], comma-separated: {error}")
    if not all(0 <= share <= 1 for share in shares):
        parser.error(f"--shares must lie in [0, 1], got {args.shares}")
    common = dict(dtype="float32", max_num_seqs=max(batches), max_model_len=64)
    rows = []
    probe = LLM(args.model, offload_weights="host", num_blocks=1, **common).engine.stats()
    layers, other_bytes = probe.num_streamed_layers, probe.weight_bytes
    layer_bytes = probe.offloaded_weight_bytes // layers
    del probe
    gc.collect()
    copy = {mode: copy_bandwidth(layer_bytes, mode) for mode in ("host", "disk")}
    llm = LLM(args.model, **common)
    resident = {b: step_time(llm, b) for b in batches}
    rows.append({"mode": "resident", "share": 0.0, "streamed_mib": 0.0, "step_ms": {b: 1e3 * t for b, t in resident.items()}})
    print(rows[-1], flush=True)
    del llm
    gc.collect()
    for mode in ("host", "disk"):
        for share in shares:
            keep = layers - round(share * layers)
            # no budget streams every layer (a budget under one layer's bytes would be refused)
            budget = (other_bytes + keep * layer_bytes + 1) / 2**30 if keep else None
            llm = LLM(args.model, offload_weights=mode, device_weight_budget_gib=budget, **common)
            stats = llm.engine.stats()
            times = {b: step_time(llm, b) for b in batches}
            rows.append({"mode": mode, "share": stats.num_streamed_layers / layers,
                         "streamed_mib": stats.streamed_bytes_per_step / 2**20,
                         "step_ms": {b: 1e3 * t for b, t in times.items()},
                         "overhead": {b: times[b] / resident[b] - 1 for b in batches},
                         "implied_gb_s": {b: stats.streamed_bytes_per_step / max(times[b] - resident[b], 1e-9) / 1e9
                                          for b in batches}})
            print(rows[-1], flush=True)
            del llm
            gc.collect()
    print_table(rows, batches, copy)
    out = Path(args.out)
    save_json({"rows": rows, "copy_gb_s": {m: bw / 1e9 for m, bw in copy.items()}, "batches": batches,
               "model": args.model or "default", "device": str(jax.devices()[0])}, out)
    plot(rows, batches, out.with_suffix(".png"))


def print_table(rows: list[dict], batches: list[int], copy: dict) -> None:
    print(f"\ncopy bandwidth: host {copy['host'] / 1e9:.1f} GB/s, disk (page cache) {copy['disk'] / 1e9:.1f} GB/s\n")
    head = " | ".join(f"B={b} ms (overhead)" for b in batches)
    print(f"| mode | layers streamed | MiB per step | {head} |\n|---|---|---|{'---|' * len(batches)}")
    for r in rows:
        cells = " | ".join(f"{r['step_ms'][b]:.1f}" + (f" ({100 * r['overhead'][b]:+.0f}%)" if "overhead" in r else "")
                           for b in batches)
        print(f"| {r['mode']} | {100 * r['share']:.0f}% | {r['streamed_mib']:.1f} | {cells} |")


def plot(rows: list[dict], batches: list[int], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    resident = rows[0]
    for ax, b in zip(axes[0], batches):
        for mode, style in (("host", "o-"), ("disk", "s--")):
            mine = [r for r in rows if r["mode"] == mode]
            ax.plot([100 * r["share"] for r in mine], [r["step_ms"][b] for r in mine], style, label=mode)
        ax.axhline(resident["step_ms"][b], color="gray", linestyle=":", label="resident, one program")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("layers streamed (%)")
        ax.set_ylabel("decode step (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
