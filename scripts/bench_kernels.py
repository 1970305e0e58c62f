"""Paged-attention kernels on a GPU: ours against jax's built-in Pallas `paged_attention` and the
jnp reference, in achieved bandwidth and against the device's measured copy bandwidth.

For each batch x context x GQA ratio (bfloat16, head_dim 128, 8 KV heads, block size 16):

- ours, decode: the flash-decoding kernel (`paged_decode_attention_kernel`);
- ours, ragged: the ragged kernel alone on the same decode batch;
- ours, mixed: the same decodes plus one 256-token prefill chunk at the same context, through the
  Pallas backend (decodes by flash-decoding, the chunk by the ragged kernel); "ragged mixed" is
  the ragged kernel alone on that batch;
- jax: `jax.experimental.pallas.ops.gpu.paged_attention` on the same cache in its layout
  `[kv_heads, pages, page_size, head_dim]`, best of a small sweep of its tiling;
- reference: the jnp reference (skipped where its float32 gather would not fit comfortably);
- mosaic: the Mosaic GPU decode kernel (`mosaic_paged_decode_attention`), on Hopper GPUs.

Times are device times: after a warm-up, `--reps` calls chained inside one jitted loop (each
call's input depends on the previous output, so none is hoisted or overlapped), timed to
`block_until_ready`, median over `--trials`. GB/s counts the KV bytes each batch must read once.

    python scripts/bench_kernels.py [--out bench_results/kernels.json] [--batches 1 8 64 256]
        [--contexts 512 2048 8192] [--groups 4 8] [--reps 20] [--trials 5] [--tune]
    python scripts/bench_kernels.py --cpu-check   # the default without a GPU: a tiny
        correctness-only pass of the kernels in interpret mode against both references

The full sweep compiles about a dozen kernels per case (Triton compiles take seconds each); split
it with --batches / --contexts to fit a time limit. The biggest case (256 x 8192) holds about
35 GB: our cache and jax's transposed copy of it.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import positive_int, save_json  # noqa: E402

from pallas_kernels.backend import pallas_paged_attention  # noqa: E402
from pallas_kernels.decode_attention import paged_decode_attention_kernel  # noqa: E402
from pallas_kernels.mosaic_decode_attention import mosaic_paged_decode_attention, runs_here  # noqa: E402
from pallas_kernels.paged_attention import AttentionMetadata, ragged_paged_attention  # noqa: E402
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_kernel  # noqa: E402

try:
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged_attention
except ImportError:  # moved or removed in a later jax: the baseline column stays empty
    jax_paged_attention = None

NUM_KV_HEADS = 8
HEAD_DIM = 128
BLOCK_SIZE = 16
DTYPE = jnp.bfloat16
PREFILL_CHUNK = 256
REFERENCE_GATHER_LIMIT = 8 * 2**30  # bytes of float32 K+V the reference may gather at once
# Our decode kernel's tilings tried with --tune: (chunk_tokens, num_warps).
OURS_SWEEP = [(chunk, warps) for chunk in (64, 128) for warps in (4, 8)]
CPU_CHECK_TOLERANCE = 1e-4  # float32, interpret mode
JAX_SWEEP = [(pages, splits) for pages in (8, 16) for splits in (1, 4, 16)]  # (pages_per_compute_block, k_splits)


@dataclass
class Result:
    batch: int
    context: int
    group: int
    kv_bytes: int
    seconds: dict  # variant -> median seconds per call
    jax_best_tiling: dict | None
    ours_best_tiling: dict | None  # with --tune: our decode kernel's best of OURS_SWEEP
    max_abs_diff_vs_jax: float | None
    max_abs_diff_mosaic_vs_ours: float | None = None


# --- inputs --------------------------------------------------------------------------------------

def patterned(shape, dtype, phase: float):
    """Cheap non-constant data for huge arrays (random generation would need 2x the memory)."""
    return jnp.sin(lax.iota(jnp.float32, int(np.prod(shape))) * 0.0137 + phase).reshape(shape).astype(dtype)


def build_cache(batch: int, context: int):
    """Stacked caches `[1, blocks, block_size, kv_heads, head_dim]`, shuffled block tables, lengths."""
    pages_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * pages_per_seq
    shape = (1, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = jax.jit(patterned, static_argnums=(0, 1))(shape, DTYPE, 0.0)
    v_cache = jax.jit(patterned, static_argnums=(0, 1))(shape, DTYPE, 1.0)
    order = np.random.default_rng(0).permutation(batch * pages_per_seq).astype(np.int32)
    block_tables = jnp.asarray(order.reshape(batch, pages_per_seq))
    context_lens = jnp.full((batch,), context, jnp.int32)
    return k_cache, v_cache, block_tables, context_lens


def decode_metadata(block_tables, context_lens) -> AttentionMetadata:
    batch = block_tables.shape[0]
    return AttentionMetadata(
        slot_mapping=jnp.full((batch,), -1, jnp.int32), block_tables=block_tables, context_lens=context_lens,
        query_start=jnp.arange(batch, dtype=jnp.int32), query_lens=jnp.ones((batch,), jnp.int32))


def mixed_metadata(block_tables, context_lens, context: int, chunk: int = PREFILL_CHUNK) -> AttentionMetadata:
    """The decodes plus one prefill chunk of `chunk` tokens ending at `context` (on row 0's pages)."""
    batch = block_tables.shape[0]
    return AttentionMetadata(
        slot_mapping=jnp.full((batch + chunk,), -1, jnp.int32),
        block_tables=jnp.concatenate([block_tables, block_tables[:1]]),
        context_lens=jnp.concatenate([context_lens, jnp.array([context], jnp.int32)]),
        query_start=jnp.arange(batch + 1, dtype=jnp.int32),
        query_lens=jnp.concatenate([jnp.ones((batch,), jnp.int32), jnp.array([chunk], jnp.int32)]))


# --- timing --------------------------------------------------------------------------------------

def device_seconds(step, q, *rest, reps: int, trials: int) -> float:
    """Median seconds per call of `step(q, *rest)`, `reps` chained calls per timed trial."""
    @jax.jit
    def repeated(q, *rest):
        def body(_, carry):
            out = step(q + carry, *rest)
            return (out.reshape(-1)[0] * 0).astype(q.dtype)  # a real dependence on the output
        return lax.fori_loop(0, reps, body, jnp.zeros((), q.dtype))

    repeated(q, *rest).block_until_ready()
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        repeated(q, *rest).block_until_ready()
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def copy_bandwidth(reps: int, trials: int, num_elements: int = 2**30) -> float:
    """Bytes/s of reading and writing a bfloat16 array once (x + 1; 2 GiB by default), the device's
    practical ceiling."""
    x = jnp.zeros((num_elements,), jnp.bfloat16)
    # the loop carries the whole array, so every iteration must read and write all of it
    repeated = jax.jit(lambda x: lax.fori_loop(0, reps, lambda _, y: y + 1, x))
    repeated(x).block_until_ready()
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        repeated(x).block_until_ready()
        times.append((time.perf_counter() - start) / reps)
    return 2 * x.nbytes / statistics.median(times)


# --- one case ------------------------------------------------------------------------------------

def jax_kernel_best(q, k_pages, v_pages, block_tables, context_lens, reps, trials):
    """(seconds, tiling) of jax's kernel at the best tiling of `JAX_SWEEP` it accepts for this shape."""
    pages_per_seq = block_tables.shape[1]
    best = (float("inf"), None)
    for pages, splits in JAX_SWEEP:
        if pages_per_seq % splits or (pages_per_seq // splits) % min(pages, pages_per_seq // splits):
            continue
        tiling = {"pages_per_compute_block": pages, "k_splits": splits}
        step = lambda q, k, v, bt, lens, tiling=tiling: jax_paged_attention.paged_attention(  # noqa: E731
            q, k, v, bt, lens, **tiling)
        try:
            seconds = device_seconds(step, q, k_pages, v_pages, block_tables, context_lens, reps=reps, trials=trials)
        except Exception as error:  # noqa: BLE001 - one rejected tiling must not end the sweep
            print(f"    jax {tiling}: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        if seconds < best[0]:
            best = (seconds, tiling)
    return best


def ours_decode_best(q, k_cache, v_cache, block_tables, context_lens, scale, reps, trials):
    """(seconds, tiling) of our decode kernel at the best tiling of `OURS_SWEEP`."""
    best = (float("inf"), None)
    for chunk, warps in OURS_SWEEP:
        tiling = {"chunk_tokens": chunk, "num_warps": warps}
        step = lambda q, k, v, bt, cl, tiling=tiling: paged_decode_attention_kernel(  # noqa: E731
            q, k, v, jnp.int32(0), bt, cl, scale, **tiling)
        seconds = device_seconds(step, q, k_cache, v_cache, block_tables, context_lens, reps=reps, trials=trials)
        if seconds < best[0]:
            best = (seconds, tiling)
    return best


def run_case(batch, context, group, cache, reps, trials, jax_layout, tune: bool) -> Result:
    k_cache, v_cache, block_tables, context_lens = cache
    num_heads = group * NUM_KV_HEADS
    scale = HEAD_DIM**-0.5
    q = patterned((batch, num_heads, HEAD_DIM), DTYPE, 2.0)
    q_mixed = patterned((batch + PREFILL_CHUNK, num_heads, HEAD_DIM), DTYPE, 3.0)
    layer = jnp.int32(0)
    decode_md = decode_metadata(block_tables, context_lens)
    mixed_md = mixed_metadata(block_tables, context_lens, context)
    timed = lambda step, *args: device_seconds(step, *args, reps=reps, trials=trials)  # noqa: E731

    seconds = {
        "ours_decode": timed(lambda q, k, v, bt, cl: paged_decode_attention_kernel(q, k, v, layer, bt, cl, scale),
                             q, k_cache, v_cache, block_tables, context_lens),
        "ours_ragged_decode": timed(lambda q, k, v, md: ragged_paged_attention_kernel(q, k, v, layer, md, scale),
                                    q, k_cache, v_cache, decode_md),
        "ours_mixed": timed(lambda q, k, v, md: pallas_paged_attention(q, k, v, layer, md, scale),
                            q_mixed, k_cache, v_cache, mixed_md),
        "ours_ragged_mixed": timed(lambda q, k, v, md: ragged_paged_attention_kernel(q, k, v, layer, md, scale),
                                   q_mixed, k_cache, v_cache, mixed_md),
    }
    if 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * 4 <= REFERENCE_GATHER_LIMIT:
        seconds["reference_decode"] = timed(lambda q, k, v, md: ragged_paged_attention(q, k, v, layer, md, scale),
                                            q, k_cache, v_cache, decode_md)
    mosaic_diff = None
    if runs_here():
        try:
            seconds["mosaic_decode"] = timed(
                lambda q, k, v, bt, cl: mosaic_paged_decode_attention(q, k, v, layer, bt, cl, scale),
                q, k_cache, v_cache, block_tables, context_lens)
            ours = paged_decode_attention_kernel(q, k_cache, v_cache, layer, block_tables, context_lens, scale)
            mosaic = mosaic_paged_decode_attention(q, k_cache, v_cache, layer, block_tables, context_lens, scale)
            mosaic_diff = float(jnp.abs(ours.astype(jnp.float32) - mosaic.astype(jnp.float32)).max())
        except Exception as error:  # noqa: BLE001 - a kernel that fails to build must not end the sweep
            print(f"    mosaic: {type(error).__name__}: {error}", file=sys.stderr)
    ours_tiling = None
    if tune:
        seconds["ours_decode_tuned"], ours_tiling = ours_decode_best(q, k_cache, v_cache, block_tables, context_lens,
                                                                     scale, reps, trials)
    jax_tiling, diff = None, None
    if jax_layout is not None:
        k_pages, v_pages = jax_layout
        jax_seconds, jax_tiling = jax_kernel_best(q * scale, k_pages, v_pages, block_tables, context_lens,
                                                  reps, trials)
        if jax_tiling:
            seconds["jax"] = jax_seconds
            ours = paged_decode_attention_kernel(q, k_cache, v_cache, layer, block_tables, context_lens, scale)
            theirs = jax_paged_attention.paged_attention(q * scale, k_pages, v_pages, block_tables, context_lens,
                                                         **jax_tiling)
            diff = float(jnp.abs(ours.astype(jnp.float32) - theirs.astype(jnp.float32)).max())
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * jnp.dtype(DTYPE).itemsize
    return Result(batch, context, group, kv_bytes, seconds, jax_tiling, ours_tiling, diff, mosaic_diff)


# --- report --------------------------------------------------------------------------------------

def print_row(result: Result, copy_bytes_per_s: float) -> None:
    s = result.seconds
    us = lambda name: f"{s[name] * 1e6:9.1f}" if name in s else f"{'-':>9}"  # noqa: E731
    gbps = result.kv_bytes / s["ours_decode"] / 1e9
    vs_jax = f"{s['jax'] / s['ours_decode']:6.2f}x" if "jax" in s else f"{'-':>7}"
    print(f"{result.batch:5d} {result.context:6d} {result.group:3d}:1 |{us('ours_decode')} {gbps:8.0f} "
          f"{100 * gbps * 1e9 / copy_bytes_per_s:5.0f}% |{us('jax')} {vs_jax} |{us('ours_ragged_decode')}"
          f"{us('ours_mixed')}{us('ours_ragged_mixed')}{us('reference_decode')}{us('ours_decode_tuned')}"
          f"{us('mosaic_decode')}", flush=True)


HEADER = (f"{'batch':>5} {'ctx':>6} {'gqa':>5} |{'decode us':>9} {'GB/s':>8} {'%copy':>6} |"
          f"{'jax us':>9} {'jax/us':>7} |{'ragged':>9}{'mixed':>9}{'rg-mixed':>9}{'ref':>9}{'tuned':>9}{'mosaic':>9}")


def run_gpu(args, on_result=None) -> dict:
    """The sweep of `args` (batches, contexts, groups, reps, trials, tune): prints the table, returns the
    report; `on_result(report so far)` after each case, where given."""
    device = jax.devices()[0]
    copy_bytes_per_s = copy_bandwidth(args.reps, args.trials)
    print(f"device: {device.device_kind}; jax {jax.__version__}; copy bandwidth {copy_bytes_per_s / 1e9:.0f} GB/s "
          f"(read + write); bf16, head_dim {HEAD_DIM}, {NUM_KV_HEADS} KV heads, block size {BLOCK_SIZE}")
    print(HEADER)
    results = []
    for batch in args.batches:
        for context in args.contexts:
            cache = build_cache(batch, context)
            jax_layout = None
            if jax_paged_attention is not None:
                jax_layout = tuple(jnp.transpose(c[0], (2, 0, 1, 3)) for c in cache[:2])
            for group in args.groups:
                result = run_case(batch, context, group, cache, args.reps, args.trials, jax_layout, args.tune)
                print_row(result, copy_bytes_per_s)
                results.append(asdict(result))
                if on_result:
                    on_result(report(device, copy_bytes_per_s, args, results))
            del cache, jax_layout
            gc.collect()
    return report(device, copy_bytes_per_s, args, results)


def report(device, copy_bytes_per_s: float, args, results: list[dict]) -> dict:
    return {"device": device.device_kind, "jax": jax.__version__, "python": platform.python_version(),
            "copy_bytes_per_s": copy_bytes_per_s, "head_dim": HEAD_DIM, "num_kv_heads": NUM_KV_HEADS,
            "block_size": BLOCK_SIZE, "dtype": jnp.dtype(DTYPE).name, "prefill_chunk": PREFILL_CHUNK,
            "reps": args.reps, "trials": args.trials, "results": results}


# --- CPU: correctness only -----------------------------------------------------------------------

def run_cpu_check() -> dict:
    """Tiny shapes in interpret mode: our kernels against the jnp reference and jax's reference.

    Returns `{"max_abs_error": {check: error}, "tolerance": ..., "ok": bool}`.
    """
    rng = np.random.default_rng(0)
    contexts, num_kv_heads, group, head_dim, block_size = [5, 40, 97], 2, 4, 64, 16
    pages = -(-max(contexts) // block_size)
    num_blocks = len(contexts) * pages
    cache_shape = (1, num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal(cache_shape), jnp.float32) for _ in range(2))
    block_tables = jnp.asarray(rng.permutation(num_blocks).reshape(len(contexts), pages).astype(np.int32))
    context_lens = jnp.asarray(contexts, jnp.int32)
    md = mixed_metadata(block_tables, context_lens, context=60, chunk=20)
    q = jnp.asarray(rng.standard_normal((len(contexts) + 20, group * num_kv_heads, head_dim)), jnp.float32)
    layer, scale = jnp.int32(0), head_dim**-0.5

    expected = ragged_paged_attention(q, k_cache, v_cache, layer, md, scale)
    checks = {
        "decode kernel": paged_decode_attention_kernel(q[:len(contexts)], k_cache, v_cache, layer, block_tables,
                                                       context_lens, scale, num_splits=2, interpret=True),
        "ragged kernel": ragged_paged_attention_kernel(q, k_cache, v_cache, layer, md, scale, interpret=True),
        "pallas backend": pallas_paged_attention(q, k_cache, v_cache, layer, md, scale, interpret=True),
    }
    errors = {}
    for name, out in checks.items():
        errors[f"{name} vs jnp reference"] = float(jnp.abs(out - expected[: out.shape[0]]).max())
    if jax_paged_attention is not None:
        keys = k_cache[0][block_tables].reshape(len(contexts), -1, num_kv_heads, head_dim)
        values = v_cache[0][block_tables].reshape(len(contexts), -1, num_kv_heads, head_dim)
        theirs = jax_paged_attention.paged_attention_reference(q[:len(contexts)] * scale, keys, values, context_lens)
        errors["decode kernel vs jax reference"] = float(jnp.abs(checks["decode kernel"] - theirs).max())
    for name, error in errors.items():
        print(f"{name:>34}: max |difference| = {error:.2e}")
    ok = all(error <= CPU_CHECK_TOLERANCE for error in errors.values())
    print("cpu check:", "ok" if ok else "FAILED")
    return {"max_abs_error": errors, "tolerance": CPU_CHECK_TOLERANCE, "ok": ok}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-check", action="store_true", help="correctness-only pass in interpret mode")
    parser.add_argument("--out", default="bench_results/kernels.json")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--groups", type=positive_int, nargs="+", default=[4, 8], help="query heads per KV head")
    parser.add_argument("--reps", type=positive_int, default=20, help="chained calls per timed trial")
    parser.add_argument("--trials", type=positive_int, default=5)
    parser.add_argument("--tune", action="store_true", help="also sweep our decode kernel's tiling (OURS_SWEEP)")
    args = parser.parse_args()
    if args.cpu_check or jax.default_backend() == "cpu":  # no GPU to time: the correctness pass, saved too
        result = run_cpu_check()
        save_json({"backend": jax.default_backend(), "cpu_check": result}, args.out)
        sys.exit(0 if result["ok"] else 1)
    save_json(run_gpu(args), args.out)


if __name__ == "__main__":
    main()
