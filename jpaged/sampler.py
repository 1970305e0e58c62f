"""Next-token sampling: the last step of the jitted model step.

``sample`` turns the last-position logits of each scheduled sequence (``[S, V]``) into the next
token id of each sequence, on device; ``sample_with_logprobs`` also returns logprobs. Their per-row
controls travel in ``SamplingArrays``, which the ModelRunner builds on the host from each request's
``SamplingParams`` (padded to the batch's shape bucket) and passes into the jitted step next to the
token and block-table arrays.

The order follows vLLM's V1 sampler:

1. Logits processors that can change the argmax, on the raw float32 logits: ``min_tokens`` (EOS
   and stop ids set to -inf) and ``logit_bias`` (added).
2. Penalties (vLLM / HF semantics): repetition (HF ``RepetitionPenaltyLogitsProcessor`` over the
   prompt and output tokens: positive logits divided, negative ones multiplied), then frequency
   (``count in output * frequency_penalty`` subtracted) and presence (``presence_penalty``
   subtracted from every token in the output). Prompt tokens count only for repetition.
3. Greedy rows (temperature 0) take the argmax of these processed logits. Other rows are divided by
   their temperature, filtered by top-k, then top-p (renormalised after top-k), then min-p (the HF
   transformers order), and drawn with a key derived only from the request's seed and how many
   tokens it has generated, so a seeded request gives the same tokens whichever batch and row it
   lands in.

Steps 1 and 2 never build ``[S, V]`` arrays on the host: each row sends only the distinct token ids
it touches (padded ``[S, L]`` id and count arrays, ``L`` bucketed to a power of two), and the device
gathers, updates and scatters back those logits. When no row of a batch uses penalties (or bias /
min_tokens) those arrays are None, which changes the pytree's structure, so the jitted step compiles
a variant that does none of that work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.sampling_params import SEED_LIMIT, SamplingParams

PAD_TOKEN_ID = np.iinfo(np.int32).max
"""Padding id of the per-row token lists: out of range for any vocabulary, so the device drops it
(gathers read a fill value, scatters skip it). A negative pad would wrap around in jax indexing."""

MIN_LIST_WIDTH = 8
LOGPROBS_MODES = ("raw", "penalized")


def _list_width(longest: int) -> int:
    """Width of a padded per-row token list: a power of two >= ``longest`` (at least 8), so a
    growing output recompiles the step only log-many times."""
    return max(MIN_LIST_WIDTH, 1 << max(longest - 1, 0).bit_length())


def _pack_rows(rows: dict[int, tuple[np.ndarray, np.ndarray]], pad_to: int, value_dtype: type,
               pad_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Pack per-row (ids, values) into ``[pad_to, width]`` arrays padded with PAD_TOKEN_ID."""
    width = _list_width(max(len(ids) for ids, _ in rows.values()))
    ids_out = np.full((pad_to, width), PAD_TOKEN_ID, dtype=np.int32)
    values_out = np.full((pad_to, width), pad_value, dtype=value_dtype)
    for row, (ids, values) in rows.items():
        ids_out[row, : len(ids)] = ids
        values_out[row, : len(ids)] = values
    return ids_out, values_out


def max_num_logprobs(params: Iterable[SamplingParams]) -> int | None:
    """The static ``num_logprobs`` a batch needs: None when no row asks for logprobs, else the
    largest ``logprobs`` asked for (0 means only the sampled tokens' logprobs)."""
    counts = [p.logprobs for p in params if p.logprobs is not None]
    return max(counts) if counts else None


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

    Present only when some row uses a penalty (else None):
        repetition_penalty, frequency_penalty, presence_penalty: float32 [S] (1, 0, 0 = off).
        penalty_ids: int32 [S, L], each row's distinct token ids the penalties touch: the tokens
            of its output, plus those of its prompt when its repetition penalty is on; padded with
            ``PAD_TOKEN_ID``.
        output_counts: int32 [S, L], occurrences of ``penalty_ids`` in the row's output (0 for
            tokens seen only in the prompt).

    Present only when some row has a ``logit_bias`` or is still under its ``min_tokens`` (else
    None):
        bias_ids: int32 [S, B], each row's distinct biased token ids, padded with PAD_TOKEN_ID.
        bias_values: float32 [S, B], added to those logits; -inf blocks a token (min_tokens).
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
    penalty_ids: jax.Array | np.ndarray | None = None
    output_counts: jax.Array | np.ndarray | None = None
    bias_ids: jax.Array | np.ndarray | None = None
    bias_values: jax.Array | np.ndarray | None = None

    @property
    def has_penalties(self) -> bool:
        """True when the penalty arrays are present (static: part of the pytree structure)."""
        return self.penalty_ids is not None

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
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        output_token_ids: Sequence[Sequence[int]] | None = None,
        eos_token_ids: Iterable[int] | None = None,
        stop_ids_before_min: Sequence[Sequence[int]] | None = None,
        vocab_size: int | None = None,
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
            vocab_size: if given, ``logit_bias`` token ids must be below it.
        """
        num_rows = len(params)
        if len(seeds) != num_rows or len(steps) != num_rows:
            raise ValueError(
                f"params, seeds and steps must have one entry per row, got "
                f"{num_rows}, {len(seeds)} and {len(steps)}"
            )
        for name, rows in (("prompt_token_ids", prompt_token_ids),
                           ("output_token_ids", output_token_ids),
                           ("stop_ids_before_min", stop_ids_before_min)):
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

        penalty_fields: dict[str, np.ndarray | None] = dict.fromkeys(
            ("repetition_penalty", "frequency_penalty", "presence_penalty", "penalty_ids",
             "output_counts"))
        penalty_rows = _penalty_rows(params, prompt_token_ids, output_token_ids)
        if penalty_rows:
            penalty_ids, output_counts = _pack_rows(penalty_rows, pad_to, np.int32, 0)
            penalty_fields.update(
                repetition_penalty=padded([p.repetition_penalty for p in params], np.float32, 1.0),
                frequency_penalty=padded([p.frequency_penalty for p in params], np.float32, 0.0),
                presence_penalty=padded([p.presence_penalty for p in params], np.float32, 0.0),
                penalty_ids=penalty_ids,
                output_counts=output_counts,
            )
        bias_ids = bias_values = None
        bias_rows = _bias_rows(params, steps, eos_token_ids, stop_ids_before_min, vocab_size)
        if bias_rows:
            bias_ids, bias_values = _pack_rows(bias_rows, pad_to, np.float32, 0.0)

        return cls(
            temperature=padded([p.temperature for p in params], np.float32, 0.0),
            top_k=padded([p.top_k for p in params], np.int32, 0),
            top_p=padded([p.top_p for p in params], np.float32, 1.0),
            min_p=padded([p.min_p for p in params], np.float32, 0.0),
            seed=padded(seed_values, np.uint32, 0),
            step=padded(steps, np.int32, 0),
            bias_ids=bias_ids,
            bias_values=bias_values,
            **penalty_fields,
        )


def _penalty_rows(
    params: list[SamplingParams],
    prompt_token_ids: Sequence[Sequence[int]] | None,
    output_token_ids: Sequence[Sequence[int]] | None,
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
    stop_ids_before_min: Sequence[Sequence[int]] | None,
    vocab_size: int | None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per row with a logit bias or an unmet ``min_tokens``: its distinct ids and additive bias."""
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
        if steps[row] < p.min_tokens:
            if stop_ids_before_min is not None:
                blocked = list(stop_ids_before_min[row])
            elif p.ignore_eos:
                blocked = list(p.stop_token_ids)
            elif eos is None:
                raise ValueError(
                    f"eos_token_ids (or stop_ids_before_min) are needed: row {row} has generated "
                    f"{steps[row]} < min_tokens={p.min_tokens} tokens"
                )
            else:
                blocked = list(p.stop_token_ids) + eos
            bias.update(dict.fromkeys(blocked, -np.inf))
        if bias:
            rows[row] = (np.fromiter(bias.keys(), np.int64), np.fromiter(bias.values(), np.float64))
    return rows


def apply_logits_processors(logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Return float32 ``[S, V]`` logits after ``min_tokens``, ``logit_bias`` and the penalties.

    Only the rows' listed token ids are gathered and scattered back (ids are distinct per row;
    padding ids fall outside the vocabulary and are dropped). With neither the bias nor the
    penalty arrays present this is just a cast, and traces to no gather or scatter.
    """
    logits = logits.astype(jnp.float32)
    if not (arrays.has_bias or arrays.has_penalties):
        return logits
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32)[:, None]
    if arrays.has_bias:
        logits = logits.at[rows, arrays.bias_ids].add(arrays.bias_values, mode="drop")
    if arrays.has_penalties:
        ids = arrays.penalty_ids
        current = logits.at[rows, ids].get(mode="fill", fill_value=0.0)
        repetition = arrays.repetition_penalty[:, None]
        current = jnp.where(current > 0, current / repetition, current * repetition)
        counts = arrays.output_counts
        current = (
            current
            - counts.astype(jnp.float32) * arrays.frequency_penalty[:, None]
            - jnp.where(counts > 0, arrays.presence_penalty[:, None], 0.0)
        )
        logits = logits.at[rows, ids].set(current, mode="drop")
    return logits


def _kept_prefix_cutoff(sorted_logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Return, per row, the smallest logit that survives top-k, top-p and min-p ([S, 1]).

    ``sorted_logits`` holds each row's temperature-scaled logits in descending order. Each filter
    keeps a prefix of that order, so together they keep a prefix too, and the kept set is exactly
    the tokens whose logit is >= the last kept sorted logit. The top token is always kept.
    """
    rank = jnp.arange(sorted_logits.shape[-1], dtype=jnp.int32)[None, :]
    top_k = arrays.top_k[:, None]
    keep = (top_k <= 0) | (rank < top_k)

    # Top-p over the probabilities renormalised after top-k: drop the least likely tokens while
    # their total mass stays <= 1 - top_p. Summing from the tail keeps small masses accurate.
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_from_tail = jax.lax.cumsum(probs, axis=1, reverse=True)
    top_p = arrays.top_p[:, None]
    keep &= (top_p >= 1) | (mass_from_tail > 1 - top_p)

    # Min-p: p / p_max = exp(logit - top logit), whatever the renormalisation before it.
    keep &= jnp.exp(sorted_logits - sorted_logits[:, :1]) >= arrays.min_p[:, None]

    num_kept = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    return jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)


def _masked_processed(logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """``masked_logits`` of logits that ``apply_logits_processors`` has already processed."""
    is_greedy = arrays.temperature <= 0
    temperature = jnp.where(is_greedy, 1.0, arrays.temperature)[:, None]
    scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature

    sorted_logits = -jnp.sort(-scaled, axis=-1)
    cutoff = _kept_prefix_cutoff(sorted_logits, arrays)
    vocab_ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, :]
    greedy_ids = jnp.argmax(logits, axis=-1, keepdims=True)
    kept = jnp.where(is_greedy[:, None], vocab_ids == greedy_ids, scaled >= cutoff)
    return jnp.where(kept, scaled, -jnp.inf)


def masked_logits(logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Return the logits ``sample`` draws from: [S, V] float32, -inf where a token is removed.

    The logits are first processed (``apply_logits_processors``: min_tokens, logit_bias,
    penalties). Sampled rows then hold ``logits / temperature`` shifted by a per-row constant (the
    row maximum is subtracted first, which leaves the softmax unchanged and keeps tiny
    temperatures finite), with top-k, top-p and min-p applied. Greedy rows keep only their argmax
    token.
    """
    return _masked_processed(apply_logits_processors(logits, arrays), arrays)


def _draw(row_logits: jax.Array, seed: jax.Array, step: jax.Array) -> jax.Array:
    """Draw one token id from one row's logits with a key fixed by (seed, step)."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.categorical(key, row_logits)


def _sample_processed(processed: jax.Array, arrays: SamplingArrays, all_greedy: bool) -> jax.Array:
    """Token ids [S] int32 from logits ``apply_logits_processors`` has already processed."""
    greedy_ids = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    if all_greedy:
        return greedy_ids
    filtered = _masked_processed(processed, arrays)
    sampled_ids = jax.vmap(_draw)(filtered, arrays.seed, arrays.step).astype(jnp.int32)
    return jnp.where(arrays.temperature <= 0, greedy_ids, sampled_ids)


def sample(logits: jax.Array, arrays: SamplingArrays, all_greedy: bool) -> jax.Array:
    """Return the next token id of each row, [S] int32.

    Args:
        logits: [S, V] last-position logits, any float dtype (computed in float32).
        arrays: the rows' sampling controls (penalties, bias and min_tokens included: greedy
            rows take the argmax of the processed logits, as in vLLM).
        all_greedy: static; True when every row is greedy, which skips everything but the
            logits processors and argmax.
    """
    return _sample_processed(apply_logits_processors(logits, arrays), arrays, all_greedy)


class SamplerOutput(NamedTuple):
    """What ``sample_with_logprobs`` returns (a pytree; the logprob fields are None when
    ``num_logprobs`` is None).

    Attributes:
        token_ids: [S] int32, the sampled tokens (as ``sample`` returns them).
        logprobs: [S] float32, each sampled token's logprob.
        top_ids: [S, k] int32, the k most likely token ids, most likely first.
        top_logprobs: [S, k] float32, their logprobs.
        ranks: [S] int32, the sampled token's 1-based rank: how many tokens have a logprob >=
            its own (vLLM's definition; 1 for the top token).
    """

    token_ids: jax.Array
    logprobs: jax.Array | None = None
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None
    ranks: jax.Array | None = None


def _gather_logprobs(
    logprobs: jax.Array, token_ids: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(token logprob [N], top ids [N, k], top logprobs [N, k], rank [N]) from [N, V] logprobs."""
    token_logprobs = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)[:, 0]
    ranks = jnp.sum(logprobs >= token_logprobs[:, None], axis=-1, dtype=jnp.int32)
    if k > 0:
        top_logprobs, top_ids = jax.lax.top_k(logprobs, k)
    else:
        top_logprobs = jnp.zeros((logprobs.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logprobs.shape[0], 0), jnp.int32)
    return token_logprobs, top_ids.astype(jnp.int32), top_logprobs, ranks


def sample_with_logprobs(
    logits: jax.Array,
    arrays: SamplingArrays,
    all_greedy: bool,
    num_logprobs: int | None = None,
    logprobs_mode: str = "raw",
) -> SamplerOutput:
    """``sample``, plus each sampled token's logprob, rank and the top ``num_logprobs`` logprobs.

    Args:
        logits, arrays, all_greedy: as for ``sample``; ``token_ids`` equal ``sample``'s.
        num_logprobs: static. None computes no logprobs (the fields are None, and the step is
            ``sample``); k >= 0 returns the sampled token's logprob and rank and the top k
            (k = 0: shape [S, 0]). Rows may ask for fewer; the host slices each row's share
            (use ``max_num_logprobs(params)``).
        logprobs_mode: static.
            ``"raw"`` (the default; vLLM V1's default ``logprobs_mode="raw_logprobs"``): the
            log_softmax of the model's raw logits, before min_tokens, logit_bias, penalties,
            temperature, top-k, top-p and min-p: the model's own distribution.
            ``"penalized"``: the log_softmax of the processed logits (after min_tokens,
            logit_bias and penalties; before temperature and the top-k / top-p / min-p filters).
    """
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
    processed = apply_logits_processors(logits, arrays)
    token_ids = _sample_processed(processed, arrays, all_greedy)
    if num_logprobs is None:
        return SamplerOutput(token_ids)
    if num_logprobs < 0:
        raise ValueError(f"num_logprobs must be None or >= 0, got {num_logprobs}")
    source = logits.astype(jnp.float32) if logprobs_mode == "raw" else processed
    logprobs = jax.nn.log_softmax(source, axis=-1)
    token_logprobs, top_ids, top_logprobs, ranks = _gather_logprobs(
        logprobs, token_ids, num_logprobs
    )
    return SamplerOutput(token_ids, token_logprobs, top_ids, top_logprobs, ranks)


class PromptLogprobs(NamedTuple):
    """What ``prompt_logprobs`` returns: per position t, about the token at t + 1.

    Attributes:
        token_logprobs: [T] float32, logprob of ``next_token_ids[t]``.
        top_ids: [T, k] int32, the k most likely next tokens, most likely first.
        top_logprobs: [T, k] float32, their logprobs.
        ranks: [T] int32, 1-based rank of ``next_token_ids[t]`` (tokens with logprob >= it).
    """

    token_logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    ranks: jax.Array


def prompt_logprobs(logits: jax.Array, next_token_ids: jax.Array, k: int) -> PromptLogprobs:
    """Logprobs of a prompt's tokens from the logits of the positions before them (pure jax).

    ``logits[t]`` ([T, V], any float dtype, computed in float32) is the model's prediction at
    prompt position t, ``next_token_ids[t]`` the prompt token at t + 1 (the caller drops the last
    position or pads it: a padded id's entries are meaningless but harmless). These are raw model
    logprobs (no penalties, bias or temperature), as vLLM reports ``prompt_logprobs``; the first
    prompt token has none. ``k`` is static (0 gives [T, 0] top arrays).
    """
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    next_token_ids = jnp.asarray(next_token_ids, jnp.int32)
    return PromptLogprobs(*_gather_logprobs(logprobs, next_token_ids, k))
