"""The CPU attention kernel against the jnp reference, as the model runs them: 30 layers in a
`lax.scan` over a paged cache of the default model's shape (9 query heads, 3 KV heads, head_dim 64,
16-token blocks, float32), each row with its own shuffled blocks.

Cases: decode batches (one query per row) and prefill chunks (a prompt chunk over a long
context). Prints a table and saves JSON with the median of the timed runs; the live K/V bytes
read per step give the kernel's achieved bandwidth.

    python scripts/bench_cpu_attention.py [--out bench_results/cpu_attention.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import positive_int

from jpaged.cache_dir import cache_dir
from pallas_kernels import cpu_kernels, cpu_paged_attention
from pallas_kernels.paged_attention import AttentionMetadata, ragged_paged_attention

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16
# (name, [(context after the step, new tokens)] per row)
CASES = [
    ("decode 1 x 280", [(280, 1)]),
    ("decode 8 x 100", [(100, 1)] * 8),
    ("decode 16 x 810", [(810, 1)] * 16),
    ("decode 64 x 280", [(280, 1)] * 64),
    ("prefill 512 at 1000", [(1000, 512)]),
    ("decode 8 x 300 + prefill 256", [(300, 1)] * 8 + [(256, 256)]),
]


def make_case(rows: list[tuple[int, int]], rng):
    widths = [-(-context // BLOCK) for context, _ in rows]
    num_blocks = sum(widths) + 1
    shape = (LAYERS, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = jnp.asarray(rng.standard_normal(shape, np.float32))
    v_cache = jnp.asarray(rng.standard_normal(shape, np.float32))
    free = rng.permutation(num_blocks)
    tables = np.zeros((len(rows), max(widths)), np.int32)
    for i, width in enumerate(widths):
        tables[i, :width], free = free[:width], free[width:]
    query_lens = np.array([new for _, new in rows], np.int32)
    md = AttentionMetadata(
        slot_mapping=jnp.full(int(query_lens.sum()), -1, jnp.int32), block_tables=jnp.asarray(tables),
        context_lens=jnp.asarray([context for context, _ in rows], jnp.int32),
        query_start=jnp.asarray(np.concatenate([[0], np.cumsum(query_lens)[:-1]]).astype(np.int32)),
        query_lens=jnp.asarray(query_lens))
    q = jnp.asarray(rng.standard_normal((int(query_lens.sum()), HEADS, HEAD_DIM), np.float32))
    live_bytes = 2 * LAYERS * sum(context for context, _ in rows) * KV_HEADS * HEAD_DIM * 4
    return (q, k_cache, v_cache, md), live_bytes


def all_layers(attend):
    def run(q, k_cache, v_cache, md):
        def body(total, layer):
            return total + attend(q, k_cache, v_cache, layer, md, HEAD_DIM**-0.5), None
        return jax.lax.scan(body, jnp.zeros_like(q), jnp.arange(LAYERS))[0]
    return jax.jit(run)


def median_ms(fn, args, repeats: int) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--out", default="bench_results/cpu_attention.json")
    args = parser.parse_args()
    library = cpu_paged_attention.attention_library(jnp.float32)
    cpu_kernels.start_build(cache_dir() / "kernels", library)
    if reason := cpu_kernels.wait(library):
        raise SystemExit(reason)
    kernel, reference = all_layers(cpu_paged_attention.cpu_ragged_paged_attention), all_layers(ragged_paged_attention)
    rng = np.random.default_rng(0)
    results = []
    print(f"{'case (30 layers)':32} {'reference ms':>13} {'kernel ms':>10} {'speed-up':>9} {'kernel GB/s':>12} "
          f"{'max |diff|':>11}")
    for name, rows in CASES:
        case, live_bytes = make_case(rows, rng)
        diff = float(jnp.max(jnp.abs(kernel(*case) - reference(*case))))
        ref_ms, kernel_ms = median_ms(reference, case, args.repeats), median_ms(kernel, case, args.repeats)
        results.append(dict(case=name, rows=rows, reference_ms=ref_ms, kernel_ms=kernel_ms,
                            live_kv_bytes=live_bytes, kernel_gb_per_s=live_bytes / kernel_ms / 1e6,
                            max_abs_diff=diff))
        print(f"{name:32} {ref_ms:13.1f} {kernel_ms:10.1f} {ref_ms / kernel_ms:8.1f}x "
              f"{live_bytes / kernel_ms / 1e6:12.1f} {diff:11.1e}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=platform.processor() or platform.machine(), cpu_count=jax.device_count(),
                                   jax=jax.__version__, results=results), indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
