"""Multimodal RoPE positions (Qwen2-VL's M-RoPE): where each token of a prompt with images sits.

A model with `RopeConfig.mrope_section` gives each token three positions, time, height and width,
each turning its own share of every head's rotary frequencies (`models/llama.py`'s `rope_angles`).
A text token's three are equal: its index, shifted by the images before it. An image's merged
patches, a `rows x columns` grid, all take the time position where the image starts, and add
their row to the height one and their column to the width one; the text after the image goes on
from the largest of those plus one, so an image takes `max(rows, columns)` positions however
many tokens it fills. As HF's `Qwen2VLModel.get_rope_index` for still images (Wang et al.,
"Qwen2-VL", 2024).

The engine computes a prompt's positions once, when its request is added (`prompt_positions`);
tokens past the prompt continue its text, at their index plus the prompt's `delta`
(`step_positions`). Host side: no jax.
"""

from __future__ import annotations

import numpy as np


def prompt_positions(num_tokens: int, offsets: list[int], grids: list[tuple[int, int]]) -> tuple[np.ndarray, int]:
    """`(positions, delta)`: int32 `[num_tokens, 3]` (time, height, width) positions of a prompt
    whose images' embeddings start at `offsets` (ascending), each a grid of `grids[i]` = (rows,
    columns) embeddings row by row; and what to add to a later token's index for its position."""
    positions = np.empty((num_tokens, 3), np.int64)
    done = start = 0  # tokens placed, and the position the next token takes
    for offset, (rows, cols) in zip(offsets, grids):
        positions[done:offset] = start + np.arange(offset - done)[:, None]
        start += offset - done
        row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        positions[offset:offset + rows * cols] = start + np.stack([np.zeros(rows * cols, np.int64), row.ravel(),
                                                                   col.ravel()], axis=1)
        start += max(rows, cols)
        done = offset + rows * cols
    positions[done:] = start + np.arange(num_tokens - done)[:, None]
    return positions.astype(np.int32), start - done


def step_positions(indices: np.ndarray, prompt: np.ndarray | None, delta: int) -> np.ndarray:
    """int32 `[len(indices), 3]` positions of a sequence's tokens at `indices` (int, ascending):
    the prompt's own (`prompt`, from `prompt_positions`; None: a prompt without images, whose
    positions are the indices) and past it each index plus `delta`."""
    positions = np.repeat(np.asarray(indices, np.int32)[:, None], 3, axis=1)
    if prompt is None:
        return positions
    in_prompt = indices < len(prompt)
    positions[in_prompt] = prompt[indices[in_prompt]]
    positions[~in_prompt] += delta
    return positions
