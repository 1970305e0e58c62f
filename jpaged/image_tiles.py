"""LLaVA-NeXT's tiled images ("AnyRes"): how an image of any shape becomes its embeddings.

LLaVA-NeXT (Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge", 2024) reads an
image twice: once resized whole into one tile of the vision tower's input size, and once resized
into the best of a few larger resolutions (`image_grid_pinpoints`, each a grid of tiles), each
tile through the tower on its own. The engine sizes each image's run of placeholder tokens with
`num_image_tokens` when the request is added, and `pack_tiles` arranges the projected tiles' patch
embeddings as the model reads them: the whole image's patches, then the grid's patches row by
row, cut back to the image's aspect ratio (the resize padded it), each row closed by the model's
learned `image_newline` embedding. The image processor (transformers') makes the tiles' pixels.

LLaVA-OneVision (Li et al., "LLaVA-OneVision: Easy Visual Task Transfer", 2024) packs a single
image the same way, with a cap on the grid ("anyres_max_N", `max_tiles` = N): a kept grid of more
than about N tiles' patches is scaled down (bilinear, as torch's `interpolate` without corner
alignment) before the newlines are added. Every image is tiled, one among several in a prompt too,
as vLLM and transformers' processor (given a prompt's images as a flat list) read them.
Host side: no jax.
"""

from __future__ import annotations

import math

import numpy as np

Resolution = tuple[int, int]  # (height, width) in pixels


def best_resolution(height: int, width: int, pinpoints: tuple[Resolution, ...]) -> Resolution:
    """The pinpoint an image of `height` x `width` pixels is resized into (its aspect ratio
    kept): the one that keeps the most of its pixels, then the one that pads least, then the
    first listed."""

    def merit(pinpoint: Resolution) -> tuple[int, int]:
        pin_height, pin_width = pinpoint
        scale = min(pin_width / width, pin_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        return kept, kept - pin_height * pin_width

    return max(pinpoints, key=merit)


def tile_grid(height: int, width: int, pinpoints: tuple[Resolution, ...], tile_size: int) -> tuple[int, int]:
    """`(rows, cols)` of `tile_size`-pixel tiles the image's best resolution holds."""
    pin_height, pin_width = best_resolution(height, width, pinpoints)
    return pin_height // tile_size, pin_width // tile_size


def kept_region(height: int, width: int, rows: int, cols: int) -> tuple[slice, slice]:
    """The rows and columns of a `rows` x `cols` patch grid that hold the image, not the resize's
    padding (the padding was split between both sides)."""
    if width / height > cols / rows:  # wider than the grid: padded above and below
        padding = (rows - int(round(height * (cols / width), 7))) // 2
        return slice(padding, rows - padding), slice(0, cols)
    padding = (cols - int(round(width * (rows / height), 7))) // 2
    return slice(0, rows), slice(padding, cols - padding)


def capped_grid(rows: int, cols: int, patches_per_side: int, max_tiles: int) -> tuple[int, int]:
    """The `rows` x `cols` of a kept patch grid after LLaVA-OneVision's cap of `max_tiles` tiles
    (0: no cap): a grid over 1.1 times that many tiles' patches shrinks, aspect ratio kept."""
    ratio = math.sqrt(rows * cols / (max_tiles * patches_per_side ** 2)) if max_tiles else 0.0
    return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)


def num_image_tokens(height: int, width: int, pinpoints: tuple[Resolution, ...], tile_size: int,
                     patches_per_side: int, max_tiles: int = 0) -> int:
    """How many embeddings an image of `height` x `width` pixels becomes: the whole image's
    `patches_per_side`² patches, then the grid's kept patches (capped at `max_tiles` tiles'
    worth, see `capped_grid`) and a newline per kept row."""
    rows, cols = tile_grid(height, width, pinpoints, tile_size)
    kept_rows, kept_cols = kept_region(height, width, rows * patches_per_side, cols * patches_per_side)
    num_rows, num_cols = capped_grid(kept_rows.stop - kept_rows.start, kept_cols.stop - kept_cols.start,
                                     patches_per_side, max_tiles)
    return patches_per_side ** 2 + num_rows * (num_cols + 1)


def bilinear_resize(grid: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """`grid` `[H, W, dim]` resized to `[rows, cols, dim]` by bilinear interpolation with
    half-pixel centres and no antialiasing, as torch's `interpolate(mode="bilinear")` computes it."""

    def weights(size: int, new_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(new_size) + 0.5) * (size / new_size) - 0.5, 0.0)
        low = np.minimum(source.astype(np.int64), size - 1)
        return low, np.minimum(low + 1, size - 1), source - low

    top, bottom, dy = weights(grid.shape[0], rows)
    left, right, dx = weights(grid.shape[1], cols)
    dx, dy = dx[None, :, None], dy[:, None, None]
    upper = grid[top][:, left] * (1 - dx) + grid[top][:, right] * dx
    lower = grid[bottom][:, left] * (1 - dx) + grid[bottom][:, right] * dx
    return (upper * (1 - dy) + lower * dy).astype(grid.dtype)


def pack_tiles(tiles: np.ndarray, newline: np.ndarray, height: int, width: int,
               pinpoints: tuple[Resolution, ...], tile_size: int, max_tiles: int = 0) -> np.ndarray:
    """One image's embeddings `[num_image_tokens, dim]` from its tiles' `[1 + rows * cols,
    patches_per_side², dim]` (the whole image first, then the grid's tiles row by row, as the
    image processor orders them) and `newline` `[dim]`; `max_tiles` as in `num_image_tokens`."""
    rows, cols = tile_grid(height, width, pinpoints, tile_size)
    side = int(round(tiles.shape[1] ** 0.5))
    if tiles.shape[0] != 1 + rows * cols or side * side != tiles.shape[1]:
        raise ValueError(f"an image of {height}x{width} pixels takes 1 + {rows}x{cols} tiles of square patch grids, "
                         f"got tiles of shape {tiles.shape}")
    dim = tiles.shape[2]
    grid = tiles[1:].reshape(rows, cols, side, side, dim).transpose(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)
    kept_rows, kept_cols = kept_region(height, width, rows * side, cols * side)
    grid = grid[kept_rows, kept_cols]
    capped = capped_grid(grid.shape[0], grid.shape[1], side, max_tiles)
    if capped != grid.shape[:2]:
        grid = bilinear_resize(grid, *capped)
    lines = np.broadcast_to(newline.astype(grid.dtype), (grid.shape[0], 1, dim))
    return np.concatenate([tiles[0], np.concatenate([grid, lines], axis=1).reshape(-1, dim)])
