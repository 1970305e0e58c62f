"""The step's batch: the scheduled sequences' new tokens as padded arrays for the jitted step.

Between the scheduler (Python lists) and the model (jax arrays): flattened `token_ids` and
`positions`, the `slot_mapping` where each new token's K/V goes, and per sequence its
`block_tables` row, `context_lens`, `query_start` and `query_lens`. Decode sequences come first.
Every dimension is padded to a bucket (see `bucket`) so the step compiles for a small, logged
set of shapes. For a pipeline the step's tokens are cut into micro-batches of one shape, stacked
on a leading axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from jpaged.scheduler import ScheduledSequence
from jpaged.sequence import Sequence
from pallas_kernels.paged_attention import AttentionMetadata


def bucket(n: int) -> int:
    """The padded size for `n`: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (0 stays 0).

    Powers of two and their halfway points waste at most a third of a dimension while
    keeping the number of distinct shapes, and so of compilations, logarithmic.
    """
    if n <= 2:
        return n
    power = 1 << (n - 1).bit_length()
    return power * 3 // 4 if n <= power * 3 // 4 else power


@dataclass(frozen=True)
class StepBatch:
    token_ids: jax.Array  # [T], or [M, T] for M pipeline micro-batches
    positions: jax.Array  # like token_ids
    logits_indices: jax.Array  # [S] each row's last new token in the flattened tokens
    attention: AttentionMetadata


jax.tree_util.register_dataclass(
    StepBatch, data_fields=["token_ids", "positions", "logits_indices", "attention"], meta_fields=[]
)


def build_step_batch(scheduled: list[ScheduledSequence], block_size: int, num_micro_batches: int = 1,
                     stacked: bool = False) -> tuple[StepBatch, np.ndarray]:
    """Padded arrays for `scheduled` (decodes first); also each sequence's row, in the order given.

    Flat arrays by default; with `stacked` (a pipeline) they gain a leading `[M]` axis, each
    micro-batch holding a contiguous share of the step's tokens, all padded to one shape. A
    sequence's row (for its sampling parameters and logits) is `m * rows_per_batch + r` of its
    last piece.
    """
    groups = split_micro_batches(scheduled, num_micro_batches)
    shape = _BatchShape.of(groups)
    filled = [_fill(group, shape, block_size) for group in groups]
    rows = np.empty(len(scheduled), np.int64)
    for m, (group, (_, piece_rows)) in enumerate(zip(groups, filled)):
        for piece, row in zip(group, piece_rows):
            rows[piece.index] = m * shape.num_rows + row  # a later piece's row wins
    arrays = {name: np.stack([f[name] for f, _ in filled]) for name in filled[0][0]}
    logits_indices = (np.arange(len(groups))[:, None] * shape.num_tokens + np.maximum(
        arrays["query_start"] + arrays["query_lens"] - 1, 0)).reshape(-1)
    if not stacked:
        arrays = {name: array[0] for name, array in arrays.items()}
    token_ids, positions = arrays.pop("token_ids"), arrays.pop("positions")
    attention = AttentionMetadata(**arrays, num_decode_seqs=shape.decode_rows, max_query_len=shape.max_query_len)
    return StepBatch(token_ids, positions, logits_indices, attention), rows


@dataclass(frozen=True)
class _Piece:
    """New tokens `[first, first + count)` of the step's `index`-th scheduled sequence."""

    index: int
    seq: Sequence
    first: int
    count: int


def split_micro_batches(scheduled: list[ScheduledSequence], num_groups: int) -> list[list[_Piece]]:
    """The step's new tokens, decodes first, cut into `num_groups` runs of about equal length
    (never more runs than tokens). A prefill chunk may be cut between micro-batches: at every
    stage its later piece finds the earlier piece's KV already written."""
    total = sum(item.num_new_tokens for item in scheduled)
    num_groups = min(num_groups, total)
    bounds = [round(g * total / num_groups) for g in range(1, num_groups + 1)]
    groups: list[list[_Piece]] = [[] for _ in range(num_groups)]
    group, position = 0, 0
    for index in sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens > 1):
        item = scheduled[index]
        first, remaining = item.seq.num_computed_tokens, item.num_new_tokens
        while remaining:
            group += position == bounds[group]
            take = min(remaining, bounds[group] - position)
            groups[group].append(_Piece(index, item.seq, first, take))
            first, remaining, position = first + take, remaining - take, position + take
    return groups


@dataclass(frozen=True)
class _BatchShape:
    """The padded sizes every micro-batch of a step shares."""

    decode_rows: int
    num_rows: int
    num_tokens: int
    max_blocks: int
    max_query_len: int

    @classmethod
    def of(cls, groups: list[list[_Piece]]) -> _BatchShape:
        decodes = [sum(1 for p in group if p.count == 1) for group in groups]
        prefill_tokens = [[p.count for p in group if p.count > 1] for group in groups]
        decode_rows = bucket(max(decodes))
        return cls(
            decode_rows=decode_rows,
            num_rows=decode_rows + bucket(max(len(p) for p in prefill_tokens)),
            num_tokens=bucket(decode_rows + max(sum(p) for p in prefill_tokens)),
            max_blocks=bucket(max(len(p.seq.block_table) for group in groups for p in group)),
            max_query_len=bucket(max((n for p in prefill_tokens for n in p), default=0)),
        )


def _fill(pieces: list[_Piece], shape: _BatchShape, block_size: int) -> tuple[dict, np.ndarray]:
    """One micro-batch's arrays at `shape`, and each piece's row in them.

    Single-token pieces (decodes) take the first rows, row `i` with its token at flat index `i`;
    the other pieces' tokens start after the padded decode rows.
    """
    ordered = sorted(range(len(pieces)), key=lambda i: pieces[i].count > 1)
    num_decode = sum(1 for p in pieces if p.count == 1)
    prefill_counts = [pieces[i].count for i in ordered[num_decode:]]
    ordered_rows = np.concatenate([np.arange(num_decode), shape.decode_rows + np.arange(len(prefill_counts))])
    first_tokens = np.concatenate([np.arange(num_decode), shape.decode_rows + np.cumsum([0] + prefill_counts)[:-1]])
    arrays = dict(
        token_ids=np.zeros(shape.num_tokens, np.int32),
        positions=np.zeros(shape.num_tokens, np.int32),
        slot_mapping=np.full(shape.num_tokens, -1, np.int32),
        block_tables=np.zeros((shape.num_rows, shape.max_blocks), np.int32),
        context_lens=np.zeros(shape.num_rows, np.int32),
        query_start=np.zeros(shape.num_rows, np.int32),
        query_lens=np.zeros(shape.num_rows, np.int32),
    )
    arrays["query_start"][: shape.decode_rows] = np.arange(shape.decode_rows)
    rows = np.empty(len(pieces), np.int64)
    for i, row, start in zip(ordered, ordered_rows, first_tokens):
        piece = pieces[i]
        rows[i] = row
        span = slice(start, start + piece.count)
        positions = np.arange(piece.first, piece.first + piece.count)
        arrays["token_ids"][span] = piece.seq.token_ids(piece.first, piece.first + piece.count)
        arrays["positions"][span] = positions
        table = np.asarray(piece.seq.block_table, np.int64)
        arrays["slot_mapping"][span] = table[positions // block_size] * block_size + positions % block_size
        arrays["block_tables"][row, : len(table)] = table
        arrays["context_lens"][row] = piece.first + piece.count
        arrays["query_start"][row], arrays["query_lens"][row] = start, piece.count
    return arrays, rows
