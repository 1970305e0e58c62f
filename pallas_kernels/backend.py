"""The attention-backend switch: which implementation computes the engine's paged attention.

`select_attention(backend, head_dim)` returns a function with the signature of the reference
`ragged_paged_attention(q, k_cache, v_cache, layer, md, scale)`:

- "reference": the pure-jnp reference;
- "cpu": the C++ kernel called through XLA's FFI (`cpu_paged_attention.py`), CPUs only, built
  once per machine for the step's query and cache dtypes into the folder `kernel_dir` names (in
  the background: the caller waits with `cpu_kernels.wait(attention_library(...))` before its
  first step);
- "pallas": the Pallas kernels, the decode rows (one new token each) by the flash-decoding kernel
  and the prefill rows by the ragged kernel (skipped at run time in a step without any). On a
  machine without a GPU they run only in interpret mode (`interpret=True`, for tests);
- "auto": "pallas" on a GPU; on a CPU "cpu" where a C++ compiler is found and `kernel_dir` is
  given, else "reference" (interpret mode is only ever asked for).

The decode rows run on the Triton flash-decoding kernel unless the environment variable
`JPAGED_DECODE_KERNEL=mosaic` asks for the Mosaic GPU kernel (`mosaic_decode_attention.py`,
Hopper sm_90+ only), which then takes the shapes it supports (16-bit dtypes, head_dim a
multiple of 64). It becomes the default on Hopper once a GPU run has measured it. Interpret mode
always runs the Triton kernels.

A shape the kernels cannot run (a head_dim that is not a multiple of 16, such as stories260K's
8) falls back to the reference, and the reason is logged once on the `jpaged` logger.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import AttentionMetadata, decode_rows, ragged_paged_attention

# The kernel modules import Pallas (and Mosaic GPU), which costs a start-up that only the Pallas
# backend needs: they are imported where that backend is chosen or traced.

logger = logging.getLogger("jpaged")

BACKENDS = ("auto", "pallas", "cpu", "reference")
GPU_PLATFORMS = ("cuda", "rocm", "gpu")
DECODE_KERNELS = ("auto", "triton", "mosaic")
DECODE_KERNEL_ENV = "JPAGED_DECODE_KERNEL"
_logged_fallbacks: set[str] = set()

AttentionFn = Callable[..., jax.Array]


def select_attention(backend: str, head_dim: int, interpret: bool = False, *,
                     platform: str | None = None, kernel_dir: str | os.PathLike | None = None,
                     dtype=jnp.float32, kv_cache_dtype: str = "auto") -> AttentionFn:
    """The attention function for `backend` and this model's `head_dim`.

    `platform` is where the step will run (default: jax's default backend); naming "cuda" lets a
    CPU-only machine build the Pallas path for cross-lowering. `kernel_dir` is where the CPU
    kernel is built and kept, for queries of `dtype` over a cache of `kv_cache_dtype`
    (`CacheConfig.kv_cache_dtype`). Raises ValueError for an unknown backend, or one this
    platform cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    platform = platform or jax.default_backend()
    on_gpu = platform in GPU_PLATFORMS
    if backend == "cpu" or (backend == "auto" and platform == "cpu" and kernel_dir is not None):
        return _cpu_attention(backend, platform, kernel_dir, dtype, kv_cache_dtype)
    if backend == "reference" or (backend == "auto" and not on_gpu):
        return ragged_paged_attention
    if not on_gpu and not interpret:
        raise ValueError(f"attention backend 'pallas' needs a GPU or interpret=True (the engine's "
                         f"attention_interpret, for tests); this platform is {platform!r}")
    from pallas_kernels.ragged_paged_attention import unsupported_reason

    reason = unsupported_reason(head_dim)
    if reason:
        _log_fallback_once(f"Pallas attention cannot run this model ({reason}); using the jnp reference")
        return ragged_paged_attention
    if not interpret and choose_decode_kernel(platform) == "mosaic":
        return functools.partial(pallas_paged_attention, interpret=False, decode_kernel="mosaic")
    return functools.partial(pallas_paged_attention, interpret=interpret)


def _cpu_attention(backend: str, platform: str, kernel_dir, dtype, kv_cache_dtype: str) -> AttentionFn:
    from pallas_kernels import cpu_kernels, cpu_paged_attention

    library = cpu_paged_attention.attention_library(dtype, kv_cache_dtype)
    if platform != "cpu" or kernel_dir is None or cpu_kernels.compiler() is None or library is None:
        reason = (f"this platform is {platform!r}" if platform != "cpu" else
                  "no folder to build it in" if kernel_dir is None else
                  f"it does not take {jnp.dtype(dtype).name} queries" if library is None else
                  "no C++ compiler was found (set CXX)")
        if backend == "cpu":
            raise ValueError(f"attention backend 'cpu' cannot run: {reason}")
        _log_fallback_once(f"the CPU attention kernel cannot run ({reason}); using the jnp reference")
        return ragged_paged_attention
    cpu_kernels.start_build(kernel_dir, library)
    return cpu_paged_attention.cpu_ragged_paged_attention


def choose_decode_kernel(platform: str, requested: str | None = None) -> str:
    """"mosaic" or "triton": which kernel computes the decode rows on `platform`.

    `requested` (default: `$JPAGED_DECODE_KERNEL`, else "auto") is one of `DECODE_KERNELS`.
    "auto" is Triton everywhere until the GPU check (`scripts/gpu_check.py`) has shown the Mosaic
    GPU kernel correct and faster on a Hopper GPU; "mosaic" asks for it (sm_90+ only). Raises
    ValueError for an unknown name, or for "mosaic" where this jax has no Mosaic GPU.
    """
    requested = requested or os.environ.get(DECODE_KERNEL_ENV) or "auto"
    if requested not in DECODE_KERNELS:
        raise ValueError(f"{DECODE_KERNEL_ENV} must be one of {', '.join(map(repr, DECODE_KERNELS))}, "
                         f"got {requested!r}")
    if requested == "mosaic" and _mosaic_module().plgpu is None:
        raise ValueError(f"{DECODE_KERNEL_ENV}='mosaic' needs jax.experimental.pallas.mosaic_gpu, "
                         f"which jax {jax.__version__} does not have")
    return "triton" if requested == "auto" else requested


def _mosaic_module():
    from pallas_kernels import mosaic_decode_attention

    return mosaic_decode_attention


def _log_fallback_once(message: str) -> None:
    if message not in _logged_fallbacks:
        _logged_fallbacks.add(message)
        logger.warning(message)


def pallas_paged_attention(q, k_cache, v_cache, layer, md: AttentionMetadata, scale: float, window=None,
                           softcap: float | None = None, sinks=None, *, interpret: bool = False,
                           decode_kernel: str = "triton") -> jax.Array:
    """`ragged_paged_attention` by the Pallas kernels: flash-decoding for the decode rows, then
    the ragged kernel for the prefill rows, the latter writing into the former's output.

    `decode_kernel="mosaic"` computes the decode rows with the Mosaic GPU kernel where it
    supports the shape and the model has no sliding window, soft cap or attention sinks (the
    Triton kernel otherwise, logged once).
    """
    from pallas_kernels.ragged_paged_attention import ragged_attention_rows

    num_rows = md.block_tables.shape[0]
    decodes = decode_rows(md)
    attended = _decode_rows(q[:num_rows], k_cache, v_cache, layer, md.block_tables,
                            jnp.where(decodes, md.context_lens, 0), scale, window, softcap, sinks, interpret,
                            decode_kernel)
    out = jnp.zeros(q.shape, q.dtype).at[:num_rows].set(jnp.where(decodes[:, None, None], attended, 0))
    prefills = dataclasses.replace(md, query_lens=jnp.where(md.query_lens > 1, md.query_lens, 0))

    def attend_prefills(out):
        return ragged_attention_rows(out, q, k_cache, v_cache, layer, prefills, scale, (0, num_rows),
                                     q.shape[0], interpret=interpret, window=window, softcap=softcap, sinks=sinks)

    return jax.lax.cond(jnp.any(prefills.query_lens > 0), attend_prefills, lambda out: out, out)


def _decode_rows(q, k_cache, v_cache, layer, block_tables, context_lens, scale, window, softcap, sinks, interpret,
                 decode_kernel):
    """Flash-decoding of one query per row, `q [S, heads, head_dim]`, over `context_lens [S]` keys."""
    args = (q, k_cache, v_cache, layer, block_tables, context_lens, scale)
    if decode_kernel == "mosaic":
        _, _, block_size, num_kv_heads, _ = k_cache.shape
        mosaic = _mosaic_module()
        reason = mosaic.mosaic_unsupported_reason(q.shape[1], num_kv_heads, q.shape[2], block_size, q.dtype)
        reason = reason or ("cache dtype differs" if k_cache.dtype != q.dtype else None)
        reason = reason or ("it has no sliding window" if window is not None else None)
        reason = reason or ("it has no soft cap" if softcap is not None else None)
        reason = reason or ("it has no attention sinks" if sinks is not None else None)
        if reason is None:
            return mosaic.mosaic_paged_decode_attention(*args)
        _log_fallback_once(f"Mosaic GPU decode cannot run this model ({reason}); using the Triton decode kernel")
    from pallas_kernels.decode_attention import paged_decode_attention_kernel

    return paged_decode_attention_kernel(*args, window=window, softcap=softcap, sinks=sinks, interpret=interpret)
