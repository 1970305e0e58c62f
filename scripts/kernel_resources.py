"""What the Pallas kernels ask of a GPU, read off Triton's compiler without one.

For common model shapes, the kernels the engine launches in a step with decodes and a prefill
chunk (flash-decoding for the decodes, the ragged kernel for the chunk) are lowered for CUDA,
compiled by Triton for sm_80 (A100), sm_89 (L4, RTX 4090) and sm_90 (H100), and ptxas reports
each one's registers per thread and spilled bytes; Triton reports its shared memory. From those
follow the resident blocks per SM and whether the kernel can launch at all; the PTX tells whether
matmuls run on tensor cores (mma / wgmma instructions) and whether K/V arrive in 16-byte loads.
The weight-only quantized matmul (`pallas_quantized_matmul.py`) is compiled the same way for the
projections of a few models at decode sizes (M = 1 and 16 rows), bfloat16 activations times int8
and fp8 weights (fp8 widened by integer arithmetic on sm_80, which has no fp8 conversion) and
float32 times int8, with grouped scales (one per output channel and 32 inputs). `--sweep` compiles alternative tilings of a few shapes too, the evidence
behind the kernels' default tiling.

    python scripts/kernel_resources.py [--out docs/results/kernel_resources.json] [--sweep]

Needs the `triton` package (installed with the test extra). Speed is not measured here: that
takes a GPU and `scripts/bench_kernels.py`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import asdict
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import save_json  # noqa: E402

from jpaged.model_runner import matmul_precision  # noqa: E402
from pallas_kernels.backend import pallas_paged_attention  # noqa: E402
from pallas_kernels.decode_attention import paged_decode_attention_kernel  # noqa: E402
from pallas_kernels.paged_attention import AttentionMetadata  # noqa: E402
from pallas_kernels.pallas_quantized_matmul import pallas_quantized_matmul  # noqa: E402
from pallas_kernels.quantized_matmul import num_groups  # noqa: E402
from pallas_kernels.ragged_paged_attention import ragged_attention_rows  # noqa: E402
from pallas_kernels.triton_compile import capture_triton_kernels, compile_kernel  # noqa: E402

CAPABILITIES = (80, 89, 90)
# name -> (dtype, head_dim, num_heads, num_kv_heads, block_size)
SHAPES = {
    "SmolLM2-135M f32": (jnp.float32, 64, 9, 3, 16),
    "SmolLM2-135M bf16": (jnp.bfloat16, 64, 9, 3, 16),
    "Llama-3-8B bf16": (jnp.bfloat16, 128, 32, 8, 16),
    "Llama-3-8B bf16 b32": (jnp.bfloat16, 128, 32, 8, 32),
    "Llama-3-8B f32": (jnp.float32, 128, 32, 8, 16),
    "Qwen2.5-7B bf16": (jnp.bfloat16, 128, 28, 4, 16),
    "Phi-2 f32": (jnp.float32, 80, 32, 32, 16),
    "head_dim 256 bf16": (jnp.bfloat16, 256, 16, 8, 16),
}
SWEEP_SHAPES = ("SmolLM2-135M f32", "Llama-3-8B bf16", "Llama-3-8B f32")
NUM_DECODES, CONTEXT, PREFILL_CHUNK = 8, 8192, 256
# name -> (K, N) of a projection `[M, K] @ [N, K]^T`
QUANTIZED_SHAPES = {
    "SmolLM2-135M up_proj": (576, 1536),
    "Llama-3-8B o_proj": (4096, 4096),
    "Llama-3-8B up_proj": (4096, 14336),
}
QUANTIZED_ROWS = (1, 16)
# (activation dtype, weight dtype); float32 on the small model only
QUANTIZED_DTYPES = ((jnp.bfloat16, jnp.int8), (jnp.bfloat16, jnp.float8_e4m3fn), (jnp.float32, jnp.int8))
QUANTIZED_SWEEP_SHAPE, QUANTIZED_SWEEP_ROWS = "Llama-3-8B o_proj", (1, 64)


def step_inputs(shape):
    """Abstract q, caches and metadata of a step: NUM_DECODES decodes and one prefill chunk."""
    dtype, head_dim, num_heads, num_kv_heads, block_size = shape
    pages = CONTEXT // block_size
    seqs, tokens = NUM_DECODES + 1, NUM_DECODES + PREFILL_CHUNK
    ints = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.int32)  # noqa: E731
    cache = jax.ShapeDtypeStruct((1, seqs * pages, block_size, num_kv_heads, head_dim), dtype)
    md = AttentionMetadata(slot_mapping=ints(tokens), block_tables=ints(seqs, pages), context_lens=ints(seqs),
                           query_start=ints(seqs), query_lens=ints(seqs))
    return jax.ShapeDtypeStruct((tokens, num_heads, head_dim), dtype), cache, md


def engine_kernels(shape):
    q, cache, md = step_inputs(shape)
    step = lambda q, k, v, md: pallas_paged_attention(q, k, v, 0, md, shape[1] ** -0.5)  # noqa: E731
    return capture_triton_kernels(trace(step, shape[0], q, cache, cache, md))


def tiled_kernels(shape, tiling: dict):
    """The ragged kernel on the prefill chunk, or (without target_rows) flash-decoding, with `tiling`."""
    q, cache, md = step_inputs(shape)
    scale = shape[1] ** -0.5
    if "target_rows" in tiling:
        def step(q, k, v, md):
            return ragged_attention_rows(jnp.zeros(q.shape, q.dtype), q, k, v, 0, md, scale,
                                         (NUM_DECODES, NUM_DECODES + 1), PREFILL_CHUNK, **tiling)
    else:
        def step(q, k, v, md):
            return paged_decode_attention_kernel(q[:NUM_DECODES], k, v, 0, md.block_tables[:NUM_DECODES],
                                                 md.context_lens[:NUM_DECODES], scale, **tiling)
    return capture_triton_kernels(trace(step, shape[0], q, cache, cache, md))


def quantized_kernels(shape, rows: int, x_dtype, w_dtype, tiling: dict | None = None):
    """`(kernel, capability)` pairs of the quantized matmul: fp8 widens in hardware from sm_89 on."""
    (k, n), tiling = QUANTIZED_SHAPES[shape], tiling or {}
    args = (jax.ShapeDtypeStruct((rows, k), x_dtype), jax.ShapeDtypeStruct((n, k), w_dtype),
            jax.ShapeDtypeStruct((n, num_groups(k)), jnp.float32))
    pairs, captured = [], {}
    for capability in CAPABILITIES:
        native = capability >= 89 or jnp.dtype(w_dtype) != jnp.float8_e4m3fn
        if native not in captured:
            step = functools.partial(pallas_quantized_matmul, native_fp8=native, **tiling)
            [captured[native]] = capture_triton_kernels(trace(step, x_dtype, *args))
        pairs.append((captured[native], capability))
    return pairs


def quantized_label(shape, rows: int, x_dtype, w_dtype) -> str:
    return f"{shape} M={rows} {jnp.dtype(x_dtype).name}x{jnp.dtype(w_dtype).name}"


def quantized_sweep_tilings() -> list[dict]:
    return [dict(block_n=n, block_k=k, num_warps=w, num_stages=s)
            for n, k, w, s in ((32, 256, 4, 3), (64, 256, 4, 3), (128, 128, 4, 3), (64, 128, 4, 4), (128, 256, 8, 3))]


def trace(step, dtype, *args):
    with matmul_precision(dtype):
        return jax.jit(step).trace(*args)


def sweep_tilings() -> list[dict]:
    decode = [dict(chunk_tokens=c, num_warps=w) for c in (16, 64) for w in (4, 8)]
    ragged = [dict(target_rows=r, chunk_tokens=c, num_warps=w) for r in (16, 64) for c in (16, 64) for w in (4, 8)]
    return decode + ragged


def report(label: str, tiling: dict | None, kernels) -> list[dict]:
    return report_pairs(label, tiling, [(kernel, capability) for kernel in kernels for capability in CAPABILITIES])


def report_pairs(label: str, tiling: dict | None, pairs) -> list[dict]:
    """Compile each `(kernel, capability)`, print its line and return its JSON row."""
    rows = []
    for kernel, capability in pairs:
        resources = compile_kernel(kernel, capability)
        row = {"shape": label, "tiling": tiling, **asdict(resources), "blocks_per_sm": resources.blocks_per_sm,
               "fits": resources.fits}
        rows.append(row)
        print(f"{label:<20} {kernel.name:<38} sm_{capability} {resources.num_warps:>5} {resources.num_stages:>6} "
              f"{resources.shared_bytes / 1024:>8.1f} {resources.registers:>5} {resources.spill_bytes:>6} "
              f"{resources.blocks_per_sm:>7} {'yes' if resources.fits else 'NO':>5} {resources.tensor_core_ops:>4} "
              f"{resources.wide_loads:>5}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/kernel_resources.json")
    parser.add_argument("--sweep", action="store_true", help="also compile alternative tilings of SWEEP_SHAPES")
    args = parser.parse_args()
    print(f"{'shape':<20} {'kernel':<38} {'arch':<5} {'warps':>5} {'stages':>6} {'smem KiB':>8} {'regs':>5} "
          f"{'spill':>6} {'blk/SM':>7} {'fits':>5} {'mma':>4} {'ld16B':>5}")
    rows = [row for label, shape in SHAPES.items() for row in report(label, None, engine_kernels(shape))]
    print("\nquantized matmul")
    quantized = [row for shape in QUANTIZED_SHAPES for m in QUANTIZED_ROWS for x_dtype, w_dtype in QUANTIZED_DTYPES
                 if x_dtype == jnp.bfloat16 or shape == next(iter(QUANTIZED_SHAPES))
                 for row in report_pairs(quantized_label(shape, m, x_dtype, w_dtype), None,
                                         quantized_kernels(shape, m, x_dtype, w_dtype))]
    if args.sweep:
        print("\nalternative tilings")
        for label in SWEEP_SHAPES:
            for tiling in sweep_tilings():
                rows += report(f"{label} {tiling}", tiling, tiled_kernels(SHAPES[label], tiling))
        for m in QUANTIZED_SWEEP_ROWS:
            for tiling in quantized_sweep_tilings():
                label = f"{quantized_label(QUANTIZED_SWEEP_SHAPE, m, jnp.bfloat16, jnp.int8)} {tiling}"
                quantized += report_pairs(label, tiling, quantized_kernels(QUANTIZED_SWEEP_SHAPE, m, jnp.bfloat16,
                                                                           jnp.int8, tiling))
    save_json({"jax": jax.__version__, "capabilities": CAPABILITIES, "decodes": NUM_DECODES, "context": CONTEXT,
               "prefill_chunk": PREFILL_CHUNK, "kernels": rows, "quantized_matmul": quantized}, args.out)


if __name__ == "__main__":
    main()
