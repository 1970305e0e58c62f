"""Rows of a q or k projection reordered from RoPE's interleaved pairing to rotate-half.

RoPE rotates pairs of a head's dims. Interleaved checkpoints (GLM's, ERNIE 4.5's, and GGUF files,
whose converter reorders Llama's) pair dims 2i and 2i + 1; HF Llama and the model here pair dims i
and i + d/2 (rotate-half), with the same frequency for pair i. Reordering a head's q and k rows
alike leaves every q . k unchanged, so a checkpoint of either pairing runs on rotate-half RoPE
once its rows (weights, biases, LoRA B factors) are reordered when read. Plain numpy.
"""

from __future__ import annotations

import numpy as np

from jpaged.config import ModelConfig


def interleaved_to_rotate_half(rows: np.ndarray, num_heads: int, rotary_dim: int | None = None) -> np.ndarray:
    """`rows` `[num_heads * head_dim, ...]` (a q or k projection's output rows, or its bias) with
    the first `rotary_dim` rows of each head (None: all) reordered from interleaved pairs
    `[x0, y0, x1, y1, ...]` to rotate-half `[x0, x1, ..., y0, y1, ...]`; the rest stay."""
    head_dim = rows.shape[0] // num_heads
    rotary = rotary_dim or head_dim
    heads = rows.reshape(num_heads, head_dim, *rows.shape[1:])
    pairs = heads[:, :rotary].reshape(num_heads, rotary // 2, 2, *rows.shape[1:]).swapaxes(1, 2)
    return np.concatenate([pairs.reshape(num_heads, rotary, *rows.shape[1:]), heads[:, rotary:]], axis=1
                          ).reshape(rows.shape)


def as_rotate_half(rows: np.ndarray, projection: str, cfg: ModelConfig) -> np.ndarray:
    """The output rows of a layer's `projection` ("q_proj", "k_proj"; any other passes as it is)
    as the model reads them: reordered by `interleaved_to_rotate_half` where `cfg.rope_interleaved`."""
    if not cfg.rope_interleaved or projection not in ("q_proj", "k_proj"):
        return rows
    return interleaved_to_rotate_half(rows, cfg.num_heads if projection == "q_proj" else cfg.num_kv_heads,
                                      cfg.rotary_dim)
