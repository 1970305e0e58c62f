"""Next-token sampling: the sampler program that runs on the logits of each model step.

``sample`` turns the last-position logits of each scheduled sequence (``[S, V]``) into the next
token id of each sequence, on device; ``sample_with_logprobs`` also returns logprobs, and
``sample_greedy`` is the much smaller program for batches of greedy rows that want none. Their per-row
controls travel in ``SamplingArrays``, which ``jpaged/step_batch.py`` builds on the host from each
request's ``SamplingParams`` (padded to the batch's shape bucket) and the ModelRunner passes, with
the step's logits, to its sampler program (one per logits row count). This module is device code
only.

The order follows vLLM's V1 sampler:

0. A structured-output grammar's token bitmask (forbidden tokens set to -inf), before anything
   else, so even raw logprobs see it (vLLM masks the logits before its sampler).
1. Logits processors that can change the argmax, on the raw float32 logits: ``min_tokens`` (EOS
   and stop ids set to -inf), ``bad_words`` (set to -inf), ``logit_bias`` (added) and
   ``allowed_token_ids`` (every other token set to -inf).
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
it touches (padded ``[S, L]`` id and count arrays), and the device gathers, updates and scatters
back those logits. Work that no row of a batch needs is skipped at run time (``lax.cond``): the
logits processors when no row has a bias or penalty, the draw when every row is greedy. A caller
may leave the bias or penalty arrays out (None), which traces a variant without that work; the
engine always passes them, at fixed widths, so one compiled sampler serves every mix of requests.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jpaged.sampling_params import LOGPROBS_MODES
from jpaged.step_batch import PAD_TOKEN_ID, SamplingArrays

ROW_GROUP = 8  # rows whose top-k / top-p cutoffs are found together (a group with none skips)
DRAW_BLOCK = 256  # tokens per block of the draw's two-level cumulative sums


def first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` as int32: per row the first index of the maximum, or of the first
    NaN where a row holds one. XLA's CPU argmax is a (value, index) reduction it does not vectorize
    (7 ms for [64, 49152] float32 on a 2-core VM); this takes each row's maximum, then the smallest
    index holding it, with standard reductions only (so it shards) and no branch to compile."""
    nan = x != x
    top = jnp.max(x, axis=-1, keepdims=True)
    holds_top = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, x == top)
    return jnp.min(jnp.where(holds_top, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


def apply_token_bitmask(logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Float32 ``[S, V]`` logits with every token a row's structured-output grammar forbids set to
    -inf (bit ``t % 32`` of ``token_bitmask[row, t // 32]`` clear); unchanged where the bitmask is
    absent, and at run time when no row is constrained."""
    logits = logits.astype(jnp.float32)
    if not arrays.has_grammar:
        return logits

    def mask(logits):
        bits = jnp.arange(32, dtype=jnp.int32)
        allowed = (arrays.token_bitmask[:, :, None] >> bits) & 1
        allowed = allowed.reshape(logits.shape[0], -1)[:, : logits.shape[1]]
        return jnp.where(allowed == 1, logits, -jnp.inf)

    return jax.lax.cond(jnp.any(arrays.token_bitmask != -1), mask, lambda x: x, logits)


def apply_logits_processors(logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Return float32 ``[S, V]`` logits after ``min_tokens``, ``logit_bias``, ``bad_words``,
    ``allowed_token_ids`` and the penalties.

    Only the rows' listed token ids are gathered and scattered back (ids are distinct per row;
    padding ids fall outside the vocabulary and are dropped), and only when some row has a bias
    or a penalty. Arrays left out (None) trace to no work at all.
    """
    logits = logits.astype(jnp.float32)
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32)[:, None]
    if arrays.has_bias:
        def add_bias(logits):
            return logits.at[rows, arrays.bias_ids].add(arrays.bias_values, mode="drop")

        logits = jax.lax.cond(jnp.any(arrays.bias_ids != PAD_TOKEN_ID), add_bias, lambda x: x, logits)

        def keep_only_bias_ids(logits):
            listed = jnp.zeros(logits.shape, bool).at[rows, arrays.bias_ids].set(True, mode="drop")
            return jnp.where(arrays.only_bias_ids[:, None] & ~listed, -jnp.inf, logits)

        logits = jax.lax.cond(jnp.any(arrays.only_bias_ids), keep_only_bias_ids, lambda x: x, logits)
    if arrays.has_penalties:
        def penalize(logits):
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
            return logits.at[rows, ids].set(current, mode="drop")

        penalized = ((arrays.repetition_penalty != 1) | (arrays.frequency_penalty != 0)
                     | (arrays.presence_penalty != 0))
        logits = jax.lax.cond(jnp.any(penalized), penalize, lambda x: x, logits)
    return logits


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys that order like the float32 values ``x`` (the radix-sort key: the sign bit set
    for positives, every bit flipped for negatives)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_key_reaching(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest key ``x`` with ``sum(weights[keys >= x]) >= target`` ([R, 1] uint32).

    ``keys`` [R, V] uint32, ``weights`` [R, V] float32 (non-negative), ``target`` [R, 1] at most
    the row's total weight. A bisection over the 2**32 keys: 32 passes over the rows, each a
    compare and a sum, where sorting a 49,152-token row costs about 15 ms on a 2-core CPU.
    """
    low = jnp.min(keys, axis=-1, keepdims=True)  # the sum there is the total: reaches the target
    high = jnp.max(keys, axis=-1, keepdims=True)

    def halve(_, bounds):
        low, high = bounds
        mid = high - (high - low) // 2  # in (low, high] until they meet
        reached = jnp.sum(jnp.where(keys >= mid, weights, 0.0), axis=-1, keepdims=True) >= target
        return jnp.where(reached, mid, low), jnp.where(reached | (mid == low), high, mid - 1)

    low, _ = jax.lax.fori_loop(0, 32, halve, (low, high))
    return low


def _kept_keys_cutoff(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Each row's smallest kept order key after top-k, top-p and min-p ([R, 1] uint32): a row
    keeps exactly the tokens whose ``_order_keys`` are >= it, its top token always among them.

    ``scaled`` [R, V] float32 holds each row's temperature-scaled logits, its maximum 0; ``top_k``,
    ``top_p`` and ``min_p`` [R] the rows' filters (0, 1 and 0 for off). Sorted in descending
    order, each filter keeps a prefix (HF transformers' top-k, then top-p over the probabilities
    renormalised after top-k, then min-p), so together they keep the tokens at or above a cutoff,
    found here without sorting. Top-k keeps the keys >= the k-th largest. Top-p keeps a token
    while the mass strictly above it is below ``top_p`` of what top-k kept (HF drops the least
    likely tokens while their mass stays <= 1 - top_p): its cutoff is the largest key whose mass
    at or above it reaches ``top_p``. Min-p keeps ``exp(logit - top logit) >= min_p``.
    """
    keys = _order_keys(scaled)
    top_key = jnp.max(keys, axis=-1, keepdims=True)
    probs = jnp.exp(scaled)  # unnormalised: the maximum is 1
    top_k, top_p, min_p = top_k[:, None], top_p[:, None], min_p[:, None]
    uses_top_k = (top_k > 0) & (top_k < scaled.shape[-1])

    def stage(i, cutoff):  # 0: top-k's cutoff over token counts; 1: top-p's over the mass top-k kept
        weights = jnp.where(keys >= cutoff, jnp.where(i == 0, 1.0, probs), 0.0)
        target = jnp.where(i == 0, top_k.astype(jnp.float32), top_p * jnp.sum(weights, axis=-1, keepdims=True))
        used = jnp.where(i == 0, uses_top_k, top_p < 1)
        return jnp.where(used, _largest_key_reaching(keys, weights, target), cutoff)

    first = jnp.where(jnp.any(uses_top_k), 0, 1)
    last = jnp.where(jnp.any(top_p < 1), 2, 1)
    cutoff = jax.lax.fori_loop(first, last, stage, jnp.zeros_like(top_key))  # one traced bisection
    min_p_cutoff = jnp.min(jnp.where(probs >= min_p, keys, top_key), axis=-1, keepdims=True)
    return jnp.minimum(jnp.maximum(cutoff, min_p_cutoff), top_key)


def _cutoffs(scaled: jax.Array, arrays: SamplingArrays, filtered: jax.Array) -> jax.Array:
    """Each row's `_kept_keys_cutoff` ([S, 1] uint32), 0 (keep everything) for rows not `filtered`.

    Rows go in groups of up to ``ROW_GROUP``, and a group without a filtered row is skipped at run
    time: a batch of greedy or plain-temperature rows with one top-p row pays for one group.
    """
    num_rows = scaled.shape[0]
    group = math.gcd(num_rows, ROW_GROUP)

    def group_cutoff(rows):
        scaled, filtered, top_k, top_p, min_p = rows
        return jax.lax.cond(jnp.any(filtered), _kept_keys_cutoff, lambda *_: jnp.zeros((group, 1), jnp.uint32),
                            scaled, top_k, top_p, min_p)

    rows = (scaled, filtered, arrays.top_k, arrays.top_p, arrays.min_p)
    cutoffs = jax.lax.map(group_cutoff, [x.reshape(num_rows // group, group, *x.shape[1:]) for x in rows])
    return jnp.where(filtered[:, None], cutoffs.reshape(num_rows, 1), jnp.uint32(0))


def _filtered(logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Sampled rows of processed ``logits`` as ``masked_logits`` gives them; greedy rows only
    shifted (their draw is not used)."""
    is_greedy = arrays.temperature <= 0
    temperature = jnp.where(is_greedy, 1.0, arrays.temperature)[:, None]
    scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    filtered = ~is_greedy & ((arrays.top_k > 0) | (arrays.top_p < 1) | (arrays.min_p > 0))
    return jnp.where(_order_keys(scaled) >= _cutoffs(scaled, arrays, filtered), scaled, -jnp.inf)


def processed_logits(processed: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """The logits each row is drawn from, as vLLM's `processed_logits` gives them: [S, V] float32,
    processed logits (`apply_logits_processors`) over the temperature (1 for greedy rows), -inf
    where top-k, top-p or min-p remove a token (greedy rows: none removed)."""
    temperature = jnp.where(arrays.temperature <= 0, 1.0, arrays.temperature)[:, None]
    return jnp.where(_filtered(processed, arrays) > -jnp.inf, processed / temperature, -jnp.inf)


def masked_logits(logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Return the logits ``sample`` draws from: [S, V] float32, -inf where a token is removed.

    The logits are first processed (``apply_logits_processors``: min_tokens, logit_bias,
    penalties). Sampled rows then hold ``logits / temperature`` shifted by a per-row constant (the
    row maximum is subtracted first, which leaves the softmax unchanged and keeps tiny
    temperatures finite), with top-k, top-p and min-p applied. Greedy rows keep only their argmax
    token.
    """
    processed = apply_logits_processors(apply_token_bitmask(logits, arrays), arrays)
    vocab_ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, :]
    greedy_only = (arrays.temperature <= 0)[:, None] & (vocab_ids != first_argmax(processed)[:, None])
    return jnp.where(greedy_only, -jnp.inf, _filtered(processed, arrays))


def _hash32(x: jax.Array) -> jax.Array:
    """A uint32 integer hash with good avalanche (Wellons' "lowbias32")."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _draw(logits: jax.Array, seed: jax.Array, step: jax.Array) -> jax.Array:
    """Draw one token id per row ([R] int32) from logits [R, V] (-inf: never drawn), each row fixed
    by its (seed, step) ([R] each): inverse transform sampling of the row's softmax with one uniform
    from a counter-based hash of (seed, step), which gives each row the same draw whatever batch it
    is in. The cumulative sums run in two levels, over blocks of `DRAW_BLOCK` tokens and then
    within the block drawn, so that float32 keeps small probabilities a flat sum over the
    vocabulary would round away; the draw costs one exp per logit (a Gumbel-max draw, two hashes
    and two logs: 35 ms against 4 ms for 64 rows of 49,152 logits on a 2-core CPU)."""
    rows, vocab = logits.shape
    blocks = -(-vocab // DRAW_BLOCK)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = jnp.pad(probs, ((0, 0), (0, blocks * DRAW_BLOCK - vocab))).reshape(rows, blocks, DRAW_BLOCK)
    sums = jnp.sum(probs, axis=-1)
    cumulative = jnp.cumsum(sums, axis=-1)
    key = _hash32(seed.astype(jnp.uint32) ^ _hash32(step.astype(jnp.uint32) + jnp.uint32(0x9E3779B9)))
    target = to_uniform(key) * cumulative[:, -1]
    block = _first_past(cumulative, target, sums > 0)
    before = jnp.where(block > 0, jnp.take_along_axis(cumulative, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0], 0.0)
    inside = jnp.take_along_axis(probs, block[:, None, None], 1)[:, 0]
    return block * DRAW_BLOCK + _first_past(jnp.cumsum(inside, axis=-1), target - before, inside > 0)


def _first_past(cumulative: jax.Array, target: jax.Array, nonzero: jax.Array) -> jax.Array:
    """Per row ([R] int32), the first index whose running sum in `cumulative` [R, N] passes
    `target` [R]: an entry of nonzero weight, and no later than the last one (float rounding may
    bring a target to the row's total)."""
    passed = jnp.sum(cumulative <= target[:, None], axis=-1, dtype=jnp.int32)
    last = jnp.max(jnp.where(nonzero, jnp.arange(cumulative.shape[-1], dtype=jnp.int32), 0), axis=-1)
    return jnp.minimum(passed, last)


def to_uniform(bits: jax.Array) -> jax.Array:
    """uint32 hashes to float32 uniforms strictly inside (0, 1): their top 23 bits, centred (with
    24 bits the largest, 1 - 2**-25, would round to 1.0 in float32)."""
    return ((bits >> 9).astype(jnp.float32) + 0.5) * (1.0 / (1 << 23))


def _sample_processed(processed: jax.Array, arrays: SamplingArrays, all_greedy: bool | None) -> jax.Array:
    """Token ids [S] int32 from logits ``apply_logits_processors`` has already processed."""
    greedy_ids = first_argmax(processed)
    if all_greedy:
        return greedy_ids

    def draw(greedy_ids):
        sampled_ids = _draw(_filtered(processed, arrays), arrays.seed, arrays.step)
        return jnp.where(arrays.temperature <= 0, greedy_ids, sampled_ids)

    if all_greedy is None:
        return jax.lax.cond(jnp.all(arrays.temperature <= 0), lambda ids: ids, draw, greedy_ids)
    return draw(greedy_ids)


def sample(logits: jax.Array, arrays: SamplingArrays, all_greedy: bool | None = None) -> jax.Array:
    """Return the next token id of each row, [S] int32.

    Args:
        logits: [S, V] last-position logits, any float dtype (computed in float32).
        arrays: the rows' sampling controls (penalties, bias and min_tokens included: greedy
            rows take the argmax of the processed logits, as in vLLM).
        all_greedy: static; True when every row is greedy (traces only the argmax), False
            when some row draws, None to decide at run time from the temperatures.
    """
    return _sample_processed(apply_logits_processors(apply_token_bitmask(logits, arrays), arrays), arrays, all_greedy)


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
    all_greedy: bool | None = None,
    num_logprobs: int | None = None,
    logprobs_mode: str = "raw_logprobs",
    when_wanted: bool = False,
) -> SamplerOutput:
    """``sample``, plus each sampled token's logprob, rank and the top ``num_logprobs`` logprobs.

    Args:
        logits, arrays, all_greedy: as for ``sample``; ``token_ids`` equal ``sample``'s.
        num_logprobs: static. None computes no logprobs (the fields are None, and the step is
            ``sample``); k >= 0 returns the sampled token's logprob and rank and the top k
            (k = 0: shape [S, 0]). Rows may ask for fewer; the host slices each row's share.
        logprobs_mode: static, vLLM's (`LOGPROBS_MODES`). ``"raw_logprobs"`` (the default):
            the log_softmax of the model's logits (after a structured-output grammar's mask),
            before min_tokens, logit_bias, penalties, temperature, top-k, top-p and min-p: the
            model's own distribution; ``"raw_logits"``: those logits. ``"processed_logprobs"``:
            the log_softmax of ``processed_logits``, the distribution the token is drawn from
            (-inf for tokens the filters remove); ``"processed_logits"``: those logits.
        when_wanted: static. True computes the logprob fields only when some row's
            ``arrays.logprobs_wanted`` is set, at run time (zeros otherwise); the tokens are drawn
            the same either way, by one traced copy of the sampler.
    """
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
    logits = apply_token_bitmask(logits, arrays)
    processed = apply_logits_processors(logits, arrays)
    token_ids = _sample_processed(processed, arrays, all_greedy)
    if num_logprobs is None:
        return SamplerOutput(token_ids)
    if num_logprobs < 0:
        raise ValueError(f"num_logprobs must be None or >= 0, got {num_logprobs}")
    source = logits if logprobs_mode.startswith("raw") else processed_logits(processed, arrays)

    def gather(source):
        if logprobs_mode.endswith("logprobs"):  # a row with no token left (all -inf) has -inf, not NaN
            values = jnp.where(jnp.isneginf(jnp.max(source, axis=-1, keepdims=True)), -jnp.inf,
                               jax.nn.log_softmax(source, axis=-1))
        else:
            values = source
        return _gather_logprobs(values, token_ids, num_logprobs)

    if not when_wanted:
        return SamplerOutput(token_ids, *gather(source))

    def zeros(source):
        return _no_logprobs(source, token_ids, num_logprobs)

    return SamplerOutput(token_ids, *jax.lax.cond(jnp.any(arrays.logprobs_wanted), gather, zeros, source))


def _no_logprobs(values: jax.Array, token_ids: jax.Array, k: int) -> tuple[jax.Array, ...]:
    """Zeros in the shapes and dtypes ``_gather_logprobs(values, token_ids, k)`` returns: the
    logprob fields of rows none of which wants logprobs."""
    shapes = jax.eval_shape(lambda values, token_ids: _gather_logprobs(values, token_ids, k), values, token_ids)
    return tuple(jnp.zeros(x.shape, x.dtype) for x in shapes)


def sample_greedy(logits: jax.Array, arrays: SamplingArrays, num_logprobs: int | None = None) -> SamplerOutput:
    """``sample_with_logprobs(logits, arrays, None, num_logprobs, when_wanted=True)`` for a batch
    whose rows are all greedy (temperature 0) and none of which wants logprobs: the same token
    ids (the argmax of the processed logits), and the logprob fields zeros of the same shapes
    and dtypes. Its program leaves out the draw, the top-k / top-p / min-p cutoffs and the
    logprobs, and so compiles in about a fifth of the time (0.1 s against 0.4-0.9 s for a few
    rows on a 2-core CPU)."""
    token_ids = sample(logits, arrays, all_greedy=True)
    if num_logprobs is None:
        return SamplerOutput(token_ids)
    return SamplerOutput(token_ids, *_no_logprobs(logits, token_ids, num_logprobs))


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
