"""Padding rules: the sizes that host-built arrays are rounded up to before a jitted function sees them.

A jitted function compiles once per input shape, so every dimension that changes from step to step
is rounded up to a few sizes: the step's token, row and block-table dimensions
(`jpaged/step_batch.py`), the per-row token lists of the sampling arrays (`jpaged/step_batch.py`)
and the index lists of the KV cache's block moves (`jpaged/kv_cache_ops.py`). Plain Python.
"""

from __future__ import annotations

MIN_LIST_WIDTH = 8


def bucket(n: int) -> int:
    """The padded size for `n`: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (0 stays 0).

    Powers of two and their halfway points waste at most a third of a dimension while
    keeping the number of distinct shapes, and so of compilations, logarithmic.
    """
    if n <= 2:
        return n
    power = 1 << (n - 1).bit_length()
    return power * 3 // 4 if n <= power * 3 // 4 else power


def power_of_two(n: int) -> int:
    """The smallest power of two >= `n` (1 for 0)."""
    return 1 << max(n - 1, 0).bit_length()


def list_width(longest: int) -> int:
    """Width of a padded per-row token list: a power of two >= ``longest`` (at least 8), so a
    growing output recompiles the step only log-many times."""
    return max(MIN_LIST_WIDTH, power_of_two(longest))
