"""Host-side step preparation: the scheduled sequences as the padded arrays the jitted step takes.

Between the scheduler (Python lists) and the device (`jpaged/model_runner.py`), all numpy:

- the token arrays (`StepBatch`): flattened `token_ids` and `positions`, the `slot_mapping` where
  each new token's K/V goes, and per sequence its `block_tables` row, `context_lens`,
  `query_start` and `query_lens`. Decode sequences come first. For a pipeline the step's tokens
  are cut into micro-batches of one shape, stacked on a leading axis;
- the logits rows: which row of the step's logits belongs to each scheduled sequence, which
  tokens' logits give prompt logprobs (for sequences whose request asks for them, in the chunks
  that compute their prompt), and which tokens' sampled choices check draft tokens (a sequence
  with drafts computes its last token and drafts as one row; the choice after its last token and
  each draft but the last checks the next draft, and the row's sampled token follows the last);
- the sampling arrays (`SamplingArrays`): each row's sampling controls, the token ids its
  penalties, bias and `min_tokens` touch, and the token bitmask of rows under a structured-output
  grammar (`jpaged/structured_output.py`), for the on-device sampler (`jpaged/sampler.py`).

Every dimension is padded by the rules in `jpaged/padding.py`, so the step compiles for a small,
logged set of shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import NamedTuple

import jax
import numpy as np

from jpaged.config import ParallelConfig
from jpaged.padding import MAX_BIASED_TOKENS, StepShapes, list_width
from jpaged.sampling_params import SEED_LIMIT, SamplingParams
from jpaged.scheduler import ScheduledSequence
from jpaged.sequence import Sequence
from jpaged.structured_output import Grammar, bitmask_width
from pallas_kernels.paged_attention import AttentionMetadata

PADDING_PARAMS = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class StepBatch:
    token_ids: jax.Array  # [T], or [M, T] for M pipeline micro-batches
    positions: jax.Array  # like token_ids
    logits_indices: jax.Array  # [S] each row's last new token in the flattened tokens
    attention: AttentionMetadata
    # Prompt logprobs, None when no scheduled sequence wants them (the model runner then passes
    # placeholders of the same shape): [T] flat indices of the prompt tokens whose logits predict
    # the next prompt token, and [T] those next tokens (padding rows: index -1, token 0).
    prompt_indices: jax.Array | None = None
    prompt_next_ids: jax.Array | None = None
    lora_slots: jax.Array | None = None  # [T] int32, each token's LoRA slot (-1: none); None: LoRA is off
    # An engine that reads images or embeds prompts: [T, hidden] float32 embeddings to take in
    # place of the token embeddings where `input_embeds_mask [T]` (bool) is set; None: it reads none
    input_embeds: jax.Array | None = None
    input_embeds_mask: jax.Array | None = None


jax.tree_util.register_dataclass(
    StepBatch, data_fields=["token_ids", "positions", "logits_indices", "attention", "prompt_indices",
                            "prompt_next_ids", "lora_slots", "input_embeds", "input_embeds_mask"], meta_fields=[]
)


class PromptRows(NamedTuple):
    """What each row of a step's prompt logprobs is about (unpadded, P rows)."""

    owner: np.ndarray  # [P] int64, the scheduled sequence's index in the step's list
    position: np.ndarray  # [P] int64, the prompt position whose logits predict token position + 1


def build_step_batch(scheduled: list[ScheduledSequence], block_size: int, shapes: StepShapes,
                     num_micro_batches: int = 1, stacked: bool = False
                     ) -> tuple[StepBatch, np.ndarray, PromptRows | None, np.ndarray | None]:
    """Padded arrays for `scheduled` (decodes first) at `shapes`' sizes; also each sequence's row,
    in the order given, the prompt-logprob rows (None when no sequence computes prompt
    logprobs; the step's prompt arrays are then None too), and the rows whose sampled tokens are
    the choices that check draft tokens (see `_draft_rows`; None when there are no drafts).

    Flat arrays by default; with `stacked` (a pipeline) they gain a leading `[M]` axis, each
    micro-batch holding a contiguous share of the step's tokens, all padded to one shape. A
    sequence's row (for its sampling parameters and logits) is `m * rows_per_batch + r` of its
    last piece.
    """
    groups = split_micro_batches(scheduled, num_micro_batches)
    num_tokens = shapes.num_tokens(max(sum(p.count for p in group) for group in groups))
    num_rows = shapes.num_rows(num_tokens)
    filled = [_fill(group, num_tokens, num_rows, shapes.max_blocks_per_seq, block_size) for group in groups]
    rows = np.empty(len(scheduled), np.int64)
    for m, (group, (_, piece_rows, _)) in enumerate(zip(groups, filled)):
        for piece, row in zip(group, piece_rows):
            rows[piece.index] = m * num_rows + row  # a later piece's row wins
    arrays = {name: np.stack([f[name] for f, _, _ in filled]) for name in filled[0][0]}
    logits_indices = (np.arange(len(groups))[:, None] * num_tokens + np.maximum(
        arrays["query_start"] + arrays["query_lens"] - 1, 0)).reshape(-1)
    prompt_indices, prompt_next_ids, prompt_rows = _prompt_rows(groups, [f[2] for f in filled], num_tokens)
    draft_rows = _draft_rows(scheduled, groups, [f[2] for f in filled], logits_indices)
    if not stacked:
        arrays = {name: array[0] for name, array in arrays.items()}
    token_ids, positions = arrays.pop("token_ids"), arrays.pop("positions")
    attention = AttentionMetadata(**arrays)
    batch = StepBatch(token_ids, positions, logits_indices, attention, prompt_indices, prompt_next_ids)
    return batch, rows, prompt_rows, draft_rows


def _draft_rows(scheduled: list[ScheduledSequence], groups: list[list[_Piece]], starts: list[np.ndarray],
                logits_indices: np.ndarray) -> np.ndarray | None:
    """Point padding rows of `logits_indices` at the tokens whose sampled choices check drafts (for
    each scheduled sequence with `d` drafts, in order, the first `d` tokens of its row;
    `prepare_step` gives each such row its sequence's sampling controls) and return those rows.
    The scheduler keeps rows and drafts within `StepShapes.num_rows`' limit, so within the
    padded rows."""
    if not any(item.num_draft_tokens for item in scheduled):
        return None
    if len(groups) != 1:
        raise ValueError("draft tokens are checked in steps of one micro-batch")
    first_token = {piece.index: start for piece, start in zip(groups[0], starts[0])}
    checked = np.concatenate([first_token[i] + np.arange(item.num_draft_tokens)
                              for i, item in enumerate(scheduled) if item.num_draft_tokens])
    rows = len(groups[0]) + np.arange(len(checked))
    if rows[-1] >= len(logits_indices):
        raise ValueError(f"{len(groups[0])} rows and {len(checked)} draft tokens exceed the step's "
                         f"{len(logits_indices)} rows")
    logits_indices[rows] = checked
    return rows


def _prompt_rows(groups: list[list[_Piece]], starts: list[np.ndarray], num_tokens: int
                 ) -> tuple[np.ndarray | None, np.ndarray | None, PromptRows | None]:
    """Flat token indices and next prompt tokens of every new prompt position of a sequence that
    computes prompt logprobs, padded to the step's whole token count, and what each row is about."""
    indices, next_ids, owners, positions = [], [], [], []
    for m, (group, group_starts) in enumerate(zip(groups, starts)):
        for piece, start in zip(group, group_starts):
            seq = piece.seq
            stop = min(piece.first + piece.count, len(seq.prompt_token_ids) - 1)
            if not seq.computes_prompt_logprobs or stop <= piece.first:
                continue
            span = np.arange(piece.first, stop)
            indices.append(m * num_tokens + start + span - piece.first)
            next_ids.append(np.asarray(seq.prompt_token_ids, np.int32)[span + 1])
            owners.append(np.full(len(span), piece.index))
            positions.append(span)
    if not indices:
        return None, None, None
    count = sum(len(i) for i in indices)
    padded = len(groups) * num_tokens
    flat_indices, flat_next = np.full(padded, -1, np.int32), np.zeros(padded, np.int32)
    flat_indices[:count], flat_next[:count] = np.concatenate(indices), np.concatenate(next_ids)
    return flat_indices, flat_next, PromptRows(np.concatenate(owners), np.concatenate(positions))


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


def _fill(pieces: list[_Piece], num_tokens: int, num_rows: int, max_blocks: int,
          block_size: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """One micro-batch's arrays, and each piece's row and first token index in them.

    Single-token pieces (decodes) take the first rows, row `i` with its token at flat index `i`;
    the other pieces' rows and tokens follow, in order.
    """
    ordered = sorted(range(len(pieces)), key=lambda i: pieces[i].count > 1)
    counts = [pieces[i].count for i in ordered]
    first_tokens = np.cumsum([0] + counts)[:-1]
    arrays = dict(
        token_ids=np.zeros(num_tokens, np.int32),
        positions=np.zeros(num_tokens, np.int32),
        slot_mapping=np.full(num_tokens, -1, np.int32),
        block_tables=np.zeros((num_rows, max_blocks), np.int32),
        context_lens=np.zeros(num_rows, np.int32),
        query_start=np.zeros(num_rows, np.int32),
        query_lens=np.zeros(num_rows, np.int32),
    )
    rows, starts = np.empty(len(pieces), np.int64), np.empty(len(pieces), np.int64)
    for row, (i, start) in enumerate(zip(ordered, first_tokens)):
        piece = pieces[i]
        rows[i], starts[i] = row, start
        span = slice(start, start + piece.count)
        positions = np.arange(piece.first, piece.first + piece.count)
        arrays["token_ids"][span] = piece.seq.step_token_ids(piece.first, piece.first + piece.count)
        arrays["positions"][span] = positions
        table = np.asarray(piece.seq.block_table, np.int64)
        arrays["slot_mapping"][span] = table[positions // block_size] * block_size + positions % block_size
        arrays["block_tables"][row, : len(table)] = np.maximum(table, 0)  # NO_BLOCK: behind every window, never read
        arrays["context_lens"][row] = piece.first + piece.count
        arrays["query_start"][row], arrays["query_lens"][row] = start, piece.count
    return arrays, rows, starts


PAD_TOKEN_ID = np.iinfo(np.int32).max
"""Padding id of the per-row token lists: out of range for any vocabulary, so the device drops it
(gathers read a fill value, scatters skip it). A negative pad would wrap around in jax indexing."""
TOP_K_KEEPS_ALL = np.iinfo(np.int32).max  # any top_k from the vocabulary's size up keeps every token


def _pack_rows(rows: dict[int, tuple[np.ndarray, np.ndarray]], pad_to: int, value_dtype: type,
               pad_value: float, width: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Pack per-row (ids, values) into ``[pad_to, width]`` arrays padded with PAD_TOKEN_ID
    (``width`` None: a power of two that fits the longest row)."""
    longest = max(len(ids) for ids, _ in rows.values())
    if width is None:
        width = list_width(longest)
    elif longest > width:
        raise ValueError(f"a row lists {longest} token ids, more than the width {width}")
    ids_out = np.full((pad_to, width), PAD_TOKEN_ID, dtype=np.int32)
    values_out = np.full((pad_to, width), pad_value, dtype=value_dtype)
    for row, (ids, values) in rows.items():
        ids_out[row, : len(ids)] = ids
        values_out[row, : len(ids)] = values
    return ids_out, values_out


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling controls for a batch of S rows (a jax pytree).

    Always present, shape [S]:
        temperature: float32; 0 marks a greedy row.
        top_k: int32; 0 disables top-k.
        top_p: float32 in (0, 1]; 1 disables top-p.
        min_p: float32 in [0, 1]; 0 disables min-p.
        seed: uint32 request seed.
        step: int32 number of tokens the sequence has generated so far.

    Always present when built here (a test may leave them None), shape [S]:
        repetition_penalty, frequency_penalty, presence_penalty: float32 (1, 0, 0 = off).
        logprobs_wanted: bool, the row wants logprobs of its sampled tokens.

    Present only when some row uses a penalty (else None):
        penalty_ids: int32 [S, L], each row's distinct token ids the penalties touch: the tokens
            of its output, plus those of its prompt when its repetition penalty is on; padded with
            ``PAD_TOKEN_ID``.
        output_counts: int32 [S, L], occurrences of ``penalty_ids`` in the row's output (0 for
            tokens seen only in the prompt).

    Present only when some row has a ``logit_bias``, ``allowed_token_ids`` or ``bad_words`` or is
    still under its ``min_tokens`` (else None):
        bias_ids: int32 [S, B], each row's distinct biased token ids, padded with PAD_TOKEN_ID.
        bias_values: float32 [S, B], added to those logits; -inf blocks a token (min_tokens, bad
            words).
        only_bias_ids: bool [S], the row may sample only its ``bias_ids`` (``allowed_token_ids``).

    Present only when some row samples under a structured-output grammar (else None):
        token_bitmask: int32 [S, ceil(V / 32)], bit ``t % 32`` of word ``t // 32`` set where token
            t may be sampled; all bits set (-1) in unconstrained rows.
    """

    temperature: jax.Array | np.ndarray
    top_k: jax.Array | np.ndarray
    top_p: jax.Array | np.ndarray
    min_p: jax.Array | np.ndarray
    seed: jax.Array | np.ndarray
    step: jax.Array | np.ndarray
    repetition_penalty: jax.Array | np.ndarray | None = None
    frequency_penalty: jax.Array | np.ndarray | None = None
    presence_penalty: jax.Array | np.ndarray | None = None
    logprobs_wanted: jax.Array | np.ndarray | None = None
    penalty_ids: jax.Array | np.ndarray | None = None
    output_counts: jax.Array | np.ndarray | None = None
    bias_ids: jax.Array | np.ndarray | None = None
    bias_values: jax.Array | np.ndarray | None = None
    only_bias_ids: jax.Array | np.ndarray | None = None
    token_bitmask: jax.Array | np.ndarray | None = None

    @property
    def has_penalties(self) -> bool:
        """True when the penalty arrays are present (static: part of the pytree structure)."""
        return self.penalty_ids is not None

    @property
    def has_grammar(self) -> bool:
        """True when the token bitmask is present (static: part of the pytree structure)."""
        return self.token_bitmask is not None

    @property
    def has_bias(self) -> bool:
        """True when the bias arrays are present (static: part of the pytree structure)."""
        return self.bias_ids is not None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        steps: list[int],
        pad_to: int,
        *,
        prompt_token_ids: SequenceABC[SequenceABC[int]] | None = None,
        output_token_ids: SequenceABC[SequenceABC[int]] | None = None,
        eos_token_ids: Iterable[int] | None = None,
        stop_ids_before_min: SequenceABC[SequenceABC[int]] | None = None,
        banned_ids: SequenceABC[SequenceABC[int]] | None = None,
        vocab_size: int | None = None,
        penalty_width: int | None = None,
        bias_width: int | None = None,
    ) -> SamplingArrays:
        """Pack one row per request into numpy arrays of ``pad_to`` rows; padding rows are greedy
        and unpenalised.

        ``seeds`` are already resolved (the engine draws one for requests without a seed) and
        ``steps`` count the tokens each sequence has generated so far (``min_tokens`` compares
        against them). The keyword arguments hold one entry per row and are needed only by the
        rows that use them; a missing one that a row needs is a ValueError:

        Args:
            prompt_token_ids: each row's prompt tokens; needed when a row has a repetition
                penalty.
            output_token_ids: each row's generated tokens; needed when a row has any penalty.
            eos_token_ids: the model's EOS ids, blocked (with the row's ``stop_token_ids``, and
                unless ``ignore_eos``) while a row has generated fewer than ``min_tokens``;
                needed when such a row exists, unless ``stop_ids_before_min`` is given.
            stop_ids_before_min: instead of ``eos_token_ids``, each row's ids to block, used as
                given for rows with ``steps < min_tokens`` and ignored for the others.
            banned_ids: each row's ids its ``bad_words`` block at this step (`banned_token_ids`).
            vocab_size: if given, ``logit_bias`` token ids must be below it.
            penalty_width, bias_width: fixed widths of the penalty and bias arrays (default:
                a power of two fitting the longest row); a row listing more ids is a ValueError.
        """
        num_rows = len(params)
        if len(seeds) != num_rows or len(steps) != num_rows:
            raise ValueError(
                f"params, seeds and steps must have one entry per row, got "
                f"{num_rows}, {len(seeds)} and {len(steps)}"
            )
        for name, rows in (("prompt_token_ids", prompt_token_ids),
                           ("output_token_ids", output_token_ids),
                           ("stop_ids_before_min", stop_ids_before_min), ("banned_ids", banned_ids)):
            if rows is not None and len(rows) != num_rows:
                raise ValueError(
                    f"{name} must have one entry per row ({num_rows}), got {len(rows)}"
                )
        if num_rows > pad_to:
            raise ValueError(f"pad_to must be >= the number of rows ({num_rows}), got {pad_to}")
        seed_values = np.asarray(seeds, dtype=np.int64)
        if np.any((seed_values < 0) | (seed_values >= SEED_LIMIT)):
            raise ValueError(f"seeds must be in [0, 2**32), got {list(seeds)}")

        def padded(values: list | np.ndarray, dtype: type, pad_value: float) -> np.ndarray:
            column = np.full(pad_to, pad_value, dtype=dtype)
            column[:num_rows] = values
            return column

        penalty_ids = output_counts = None
        penalty_rows = _penalty_rows(params, prompt_token_ids, output_token_ids)
        if penalty_rows:
            penalty_ids, output_counts = _pack_rows(penalty_rows, pad_to, np.int32, 0, penalty_width)
        bias_ids = bias_values = only_bias_ids = None
        bias_rows = _bias_rows(params, steps, eos_token_ids, stop_ids_before_min, banned_ids, vocab_size)
        if bias_rows:
            bias_ids, bias_values = _pack_rows(bias_rows, pad_to, np.float32, 0.0, bias_width)
            only_bias_ids = padded([p.allowed_token_ids is not None for p in params], bool, False)

        return cls(
            temperature=padded([p.temperature for p in params], np.float32, 0.0),
            top_k=padded([min(p.top_k, TOP_K_KEEPS_ALL) for p in params], np.int32, 0),
            top_p=padded([p.top_p for p in params], np.float32, 1.0),
            min_p=padded([p.min_p for p in params], np.float32, 0.0),
            seed=padded(seed_values, np.uint32, 0),
            step=padded(steps, np.int32, 0),
            repetition_penalty=padded([p.repetition_penalty for p in params], np.float32, 1.0),
            frequency_penalty=padded([p.frequency_penalty for p in params], np.float32, 0.0),
            presence_penalty=padded([p.presence_penalty for p in params], np.float32, 0.0),
            logprobs_wanted=padded([p.computes_logprobs for p in params], bool, False),
            penalty_ids=penalty_ids,
            output_counts=output_counts,
            bias_ids=bias_ids,
            bias_values=bias_values,
            only_bias_ids=only_bias_ids,
        )


def _penalty_rows(
    params: list[SamplingParams],
    prompt_token_ids: SequenceABC[SequenceABC[int]] | None,
    output_token_ids: SequenceABC[SequenceABC[int]] | None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per penalised row: its distinct touched token ids and their counts in the output."""
    rows = {}
    for row, p in enumerate(params):
        if not p.uses_penalties:
            continue
        if output_token_ids is None:
            raise ValueError(
                f"output_token_ids are needed: row {row} uses a repetition, frequency or "
                f"presence penalty"
            )
        output = np.asarray(output_token_ids[row], dtype=np.int64)
        ids, counts = np.unique(output, return_counts=True)
        if p.uses_repetition_penalty:
            if prompt_token_ids is None:
                raise ValueError(
                    f"prompt_token_ids are needed: row {row} uses a repetition penalty"
                )
            prompt_only = np.setdiff1d(np.asarray(prompt_token_ids[row], dtype=np.int64), ids)
            ids = np.concatenate([ids, prompt_only])
            counts = np.concatenate([counts, np.zeros(len(prompt_only), counts.dtype)])
        rows[row] = (ids, counts)
    return rows


def _bias_rows(
    params: list[SamplingParams],
    steps: list[int],
    eos_token_ids: Iterable[int] | None,
    stop_ids_before_min: SequenceABC[SequenceABC[int]] | None,
    banned_ids: SequenceABC[SequenceABC[int]] | None,
    vocab_size: int | None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per row with a logit bias, allowed or banned ids, or an unmet ``min_tokens``: its distinct
    ids and additive bias (a row with ``allowed_token_ids`` lists exactly those)."""
    eos = None if eos_token_ids is None else [int(t) for t in eos_token_ids]
    rows = {}
    for row, p in enumerate(params):
        bias = dict(p.logit_bias or {})
        if vocab_size is not None:
            outside = [t for t in bias if t >= vocab_size]
            if outside:
                raise ValueError(
                    f"logit_bias token ids must be in [0, vocab_size={vocab_size}), got {outside}"
                )
        blocked = list(banned_ids[row]) if banned_ids is not None else []
        if steps[row] < p.min_tokens:
            if stop_ids_before_min is not None:
                blocked += stop_ids_before_min[row]
            elif p.ignore_eos:
                blocked += p.stop_token_ids
            elif eos is None:
                raise ValueError(
                    f"eos_token_ids (or stop_ids_before_min) are needed: row {row} has generated "
                    f"{steps[row]} < min_tokens={p.min_tokens} tokens"
                )
            else:
                blocked += list(p.stop_token_ids) + eos
        bias.update(dict.fromkeys(blocked, -np.inf))
        if p.allowed_token_ids is not None:
            bias = {t: bias.get(t, 0.0) for t in p.allowed_token_ids}
        if bias:
            rows[row] = (np.fromiter(bias.keys(), np.int64), np.fromiter(bias.values(), np.float64))
    return rows


def banned_token_ids(bad_words_token_ids: SequenceABC[SequenceABC[int]], output_token_ids: SequenceABC[int]) -> list[int]:
    """The tokens a sequence's bad words block at its next step (vLLM's rule): each word's last
    token where the output ends with the word's other tokens (always, for a one-token word)."""
    banned = []
    for word in bad_words_token_ids:
        before = list(word[:-1])
        if len(before) <= len(output_token_ids) and list(output_token_ids[len(output_token_ids) - len(before):]) == before:
            banned.append(word[-1])
    return banned


class StepInputs(NamedTuple):
    """What the jitted step takes for one scheduled step, and where each sequence's result is."""

    batch: StepBatch
    sampling: SamplingArrays
    rows: np.ndarray  # each scheduled sequence's row of the step's logits, in the order given
    wants_logprobs: bool  # some row wants logprobs of its sampled token
    prompt_rows: PromptRows | None  # what each prompt-logprob row is about (None: no such rows)
    draft_rows: np.ndarray | None  # rows whose sampled tokens check the drafts, in order (None: no drafts)


def prepare_step(scheduled: list[ScheduledSequence], block_size: int, shapes: StepShapes, parallel: ParallelConfig,
                 eos_token_ids: list[int], vocab_size: int) -> StepInputs:
    """The step's token arrays, logits rows and sampling arrays; padding rows sample greedily.

    A row that checks a draft samples as its sequence would after the drafts before it: the
    sequence's seed, its step counted past those drafts, its penalties and bad words over its
    output with them appended, its grammar's bitmask after them; the sequence's own row follows
    all its drafts."""
    batch, rows, prompt_rows, draft_rows = build_step_batch(
        scheduled, block_size, shapes, num_micro_batches(scheduled, parallel), stacked=parallel.pipeline_parallel_size > 1)
    seqs: list = [None] * len(batch.logits_indices)
    outputs: list = [[]] * len(seqs)  # each row's output tokens, with the drafts it follows
    checks = iter([] if draft_rows is None else draft_rows)
    draft_rows_of = []  # each scheduled sequence's draft-check rows
    for item, row in zip(scheduled, rows):
        seqs[row], drafts = item.seq, item.seq.draft_token_ids[:item.num_draft_tokens]
        outputs[row] = item.seq.output_token_ids + drafts if drafts else item.seq.output_token_ids
        draft_rows_of.append([next(checks) for _ in drafts])
        for i, check in enumerate(draft_rows_of[-1]):
            seqs[check], outputs[check] = item.seq, item.seq.output_token_ids + drafts[:i]
    params = [s.sampling_params if s else PADDING_PARAMS for s in seqs]
    sampling = SamplingArrays.build(
        params, [s.seed if s else 0 for s in seqs], [len(output) for output in outputs],
        pad_to=len(seqs),
        prompt_token_ids=[s.prompt_token_ids if s and not s.request.embeds_prompt else [] for s in seqs],
        output_token_ids=outputs,
        eos_token_ids=eos_token_ids, vocab_size=vocab_size,
        banned_ids=[banned_token_ids(s.request.bad_words_token_ids, output) if s else []
                    for s, output in zip(seqs, outputs)],
        penalty_width=shapes.penalty_width, bias_width=MAX_BIASED_TOKENS,
    )
    constrained = [(item.seq.grammar, [*draft_rows_of[i], row], item.seq.draft_token_ids[:item.num_draft_tokens])
                   for i, (item, row) in enumerate(zip(scheduled, rows)) if item.samples and item.seq.grammar is not None]
    if constrained:
        sampling = dataclasses.replace(sampling, token_bitmask=token_bitmask(constrained, len(seqs), vocab_size))
    return StepInputs(batch, sampling, rows, bool(sampling.logprobs_wanted.any()), prompt_rows, draft_rows)


def token_bitmask(constrained: list[tuple[Grammar, list[int], list[int]]], num_rows: int, vocab_size: int) -> np.ndarray:
    """The step's int32 [num_rows, ceil(vocab_size / 32)] bitmask: for each (grammar, rows, drafts)
    entry, in `rows[i]` the tokens the grammar allows after `drafts[:i]`; every token in the other
    rows."""
    bitmask = np.full((num_rows, bitmask_width(vocab_size)), -1, np.int32)
    for grammar, rows, drafts in constrained:
        grammar.fill_bitmasks([bitmask[row] for row in rows], drafts)
    return bitmask


def num_micro_batches(scheduled: list[ScheduledSequence], parallel: ParallelConfig) -> int:
    """Micro-batches a pipelined step is cut into: more when it prefills (see `ParallelConfig`)."""
    if parallel.pipeline_parallel_size == 1:
        return 1
    prefills = any(s.num_new_tokens > 1 for s in scheduled)
    return parallel.prefill_micro_batches if prefills else parallel.decode_micro_batches
