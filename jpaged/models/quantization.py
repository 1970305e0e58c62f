"""Weight-only quantization at load time: which parameters are quantized and how.

`quantization="gguf"` keeps instead a GGUF file's own quantized blocks (Q4_0, Q4_1, Q8_0 and the
K-quants Q4_K, Q5_K, Q6_K) on the device as the file stores them (`gguf_packed`), uint8 rows of
blocks `[out, row bytes]`, and multiplies through `pallas_kernels.quantized_matmul.block_matmul`
(or its CPU kernel).

Place in the data flow: the loader (`loader/weights.py`) passes each checkpoint tensor of a
quantized parameter through `quantize` as it arrives, so the host holds one tensor at a time;
the model keeps the values `[..., out, in]` (the checkpoint's layout, one row per output channel)
with float32 scales `[..., out, groups]` beside them (`<name>_scale`), and multiplies through
`pallas_kernels.quantized_matmul` (or its CPU kernel).

Schemes (weight-only int8 and fp8, symmetric): one scale per output channel and group of
`GROUP_SIZE` (32) consecutive inputs, as llama.cpp's Q8_0 and the group-wise weight-only schemes
vLLM serves; a row whose length is not a multiple of 32 has one scale. A scale is its group's
largest magnitude over the format's largest value (127 for int8, 448 for float8_e4m3fn); values
are rounded to nearest (int8) or converted (fp8). Why groups: with one scale per output channel
(vLLM's per-channel int8 / fp8), the default 135M model's perplexity rose 1.6% (int8) and 3.4%
(fp8); with groups of 32, -1.2% and +0.2% (docs/BENCHMARKS.md), for 1/8 more bytes than the
values.
The token embeddings and the LM head are quantized too (per vocabulary row: the embedding table
`[vocab, hidden]` is already `[out, in]` for the LM head it ties to; a looked-up row is widened
with its scales), since a small model's LM head is a large share of what a decode step reads.
Norms, biases and MoE routers stay in the compute dtype.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from fractions import Fraction

import ml_dtypes
import numpy as np

from pallas_kernels.quantized_matmul import BLOCK_FORMATS, bytes_per_weight, num_groups

logger = logging.getLogger("jpaged")

QUANTIZATIONS = ("int8", "fp8")  # chosen at load; "gguf" keeps a GGUF file's own blocks instead
STORAGE_DTYPES = {"int8": np.dtype(np.int8), "fp8": np.dtype(ml_dtypes.float8_e4m3fn)}
_LARGEST = {"int8": 127.0, "fp8": 448.0}
QUANTIZED_PARAMS = frozenset({
    "qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "gate_proj", "up_proj", "down_proj",
    "shared_gate_proj", "shared_up_proj", "shared_down_proj",
    "expert_gate_proj", "expert_up_proj", "expert_down_proj", "lm_head", "embed_tokens",
})


_PACKABLE = re.compile(r"model\.embed_tokens\.weight|lm_head\.weight|model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
_logged_unpacked: set[str] = set()


def gguf_packed(block_types: dict[str, str], model: str = "this model") -> dict[str, str]:
    """Which of a GGUF file's quantized tensors (`block_types`: HF name -> GGML type) stay packed
    on the device (`quantization="gguf"`): the projections, embeddings and LM head stored in one
    of `BLOCK_FORMATS`. Others are dequantized at load; each such type is logged once.

    The model tells a packed tensor's format by its row size, so of two formats with rows of the
    same size (Q4_0 and Q4_K, for K a multiple of 256) only the one with more tensors stays
    packed. ValueError when the file has no quantized tensor."""
    if not block_types:
        raise ValueError(f"quantization='gguf' keeps a GGUF file's quantized tensors packed, and {model} has none "
                         "(an HF folder, or a GGUF file of float tensors)")
    kept = {name: kind for name, kind in block_types.items() if kind in BLOCK_FORMATS and _PACKABLE.fullmatch(name)}
    for kind in sorted(set(block_types.values()) - set(BLOCK_FORMATS) - _logged_unpacked):
        logger.warning("GGUF tensors of type %s cannot stay packed (kept: %s); dequantized at load", kind,
                       ", ".join(BLOCK_FORMATS))
        _logged_unpacked.add(kind)
    by_size: dict[Fraction, str] = {}  # bytes per weight: the format kept packed
    for kind, _ in Counter(kept.values()).most_common():
        if (other := by_size.setdefault(bytes_per_weight(kind), kind)) != kind:
            logger.warning("GGUF tensors of type %s have rows the size of the %s tensors kept packed; "
                           "dequantized at load", kind, other)
    return {name: kind for name, kind in kept.items() if kind in by_size.values()}


def scale_name(param: str) -> str:
    return f"{param}_scale"


def scheme_of(dtype) -> str | None:
    """The scheme whose storage dtype `dtype` is, or None for a float dtype."""
    for scheme, storage in STORAGE_DTYPES.items():
        if np.dtype(dtype) == storage:
            return scheme
    return None


def quantize(weight: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """`weight [..., out, in]` (float) as `(values [..., out, in] in the scheme's storage dtype,
    scale [..., out, groups] float32)`, groups = `num_groups(in)`, with each group of values
    times its scale about `weight` (`quantized_matmul.dequantize`).

    ValueError for an unknown scheme or a weight that is not finite."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(map(repr, QUANTIZATIONS))}, got {scheme!r}")
    weight = np.asarray(weight, dtype=np.float32)
    if not np.isfinite(weight).all():
        raise ValueError("cannot quantize a weight holding inf or nan")
    *lead, out, k = weight.shape
    groups = num_groups(k)
    grouped = weight.reshape(*lead, out, groups, k // groups)
    largest = np.abs(grouped).max(axis=-1)
    scale = np.where(largest > 0, largest / _LARGEST[scheme], 1.0).astype(np.float32)
    scaled = (grouped / scale[..., None]).reshape(weight.shape)
    if scheme == "int8":
        return np.clip(np.rint(scaled), -127, 127).astype(np.int8), scale
    return np.clip(scaled, -448.0, 448.0).astype(STORAGE_DTYPES[scheme]), scale
