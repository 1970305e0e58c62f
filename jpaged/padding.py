"""Padding rules: the sizes that host-built arrays are rounded up to before a jitted function sees them.

A jitted function compiles once per input shape, so every dimension that changes from step to step
is rounded up to a few sizes fixed by the configuration alone (`StepShapes`): the step's token,
row and block-table dimensions and the sampling arrays' widths (`jpaged/step_batch.py`), and the
index lists of the KV cache's block moves (`jpaged/kv_cache_ops.py`). The step then compiles
once per token count, whatever the requests ask, and a warm-up can compile them all before the
first request. Plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_LIST_WIDTH = 8


def power_of_two(n: int) -> int:
    """The smallest power of two >= `n` (1 for 0)."""
    return 1 << max(n - 1, 0).bit_length()


def list_width(longest: int) -> int:
    """Width of a padded per-row token list: a power of two >= ``longest`` (at least 8), so a
    growing output recompiles the step only log-many times."""
    return max(MIN_LIST_WIDTH, power_of_two(longest))


MAX_BIASED_TOKENS = 1024
"""Most token ids one request may bias per step: its ``logit_bias`` entries, plus its stop token ids
and the model's EOS ids while it is under ``min_tokens``."""

MAX_PROGRAMS = 16
"""Most token counts (so compiled step programs) a configuration has."""

_THREE_QUARTERS_FROM = 24  # the 3/4 points between powers of two from here: 24, 48, 96, ...


@dataclass(frozen=True)
class StepShapes:
    """The padded sizes of every step a configuration can run (vLLM's and tpu-inference's fixed
    token buckets, compiled ahead of the first request).

    A step of `n` new tokens from `r` sequences is padded to `num_tokens(n)` tokens (one of
    `token_counts`) and `num_rows(...)` logits rows (with speculative decoding and a
    `max_num_seqs` below `num_speculative_tokens + 1`, `num_draft_rows` more, so that one
    sequence can draft); every row's block table to `max_blocks_per_seq` entries (the most a
    sequence of `max_model_len` tokens holds); the sampling arrays' penalty lists to
    `penalty_width` ids and bias lists to `MAX_BIASED_TOKENS`.

    Token counts are the powers of two below `max_num_batched_tokens`, that limit itself, and the
    3/4 points between powers of two from 24 up (24, 48, 96, 192, 384, ...), which keep the
    padding of a step of more than 16 tokens under a third of it: decode batches are
    weight-bound, but a step with prompt chunks is compute-bound in its matmuls, so its padding
    costs in proportion. Where that would make more than `MAX_PROGRAMS` counts, the largest 3/4
    points are left out (decode-only steps, of any row count up to `max_num_seqs`, are most
    steps; prompt chunks mostly fill the limit).
    """

    token_counts: tuple[int, ...]
    max_num_seqs: int
    max_blocks_per_seq: int
    penalty_width: int
    num_draft_rows: int = 0  # rows beyond max_num_seqs for the greedy choices that check draft tokens

    @classmethod
    def for_limits(cls, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                   block_size: int, vocab_size: int, num_draft_rows: int = 0) -> StepShapes:
        limit = max_num_batched_tokens
        counts = {1 << k for k in range(limit.bit_length()) if 1 << k < limit} | {limit}
        quarters = [3 << k for k in range(3, limit.bit_length()) if _THREE_QUARTERS_FROM <= 3 << k < limit]
        counts.update(quarters[:max(0, MAX_PROGRAMS - len(counts))])
        return cls(tuple(sorted(counts)), max_num_seqs, -(-max_model_len // block_size), min(max_model_len, vocab_size),
                   num_draft_rows)

    def num_tokens(self, n: int) -> int:
        """The padded token count of a step (or micro-batch) of `n` tokens; ValueError past the limit."""
        for count in self.token_counts:
            if n <= count:
                return count
        raise ValueError(f"a step of {n} tokens exceeds max_num_batched_tokens {self.token_counts[-1]}")

    @property
    def max_rows(self) -> int:
        """Most logits rows a step has: one per sequence and one per draft token together."""
        return self.max_num_seqs + self.num_draft_rows

    def num_rows(self, num_tokens: int) -> int:
        """Logits rows of a step padded to `num_tokens` tokens: `max_rows` at most, no more than
        its tokens."""
        return min(num_tokens, self.max_rows)
