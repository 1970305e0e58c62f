"""Next-token sampling: the last step of the jitted model step.

``sample`` turns the last-position logits of each scheduled sequence (``[S, V]``) into the next
token id of each sequence, on device. Its per-row controls travel in ``SamplingArrays``, which the
ModelRunner builds on the host from each request's ``SamplingParams`` (padded to the batch's shape
bucket) and passes into the jitted step next to the token and block-table arrays.

Greedy rows (temperature 0) take the argmax of the raw logits. Other rows are divided by their
temperature, filtered by top-k, then top-p (renormalised after top-k), then min-p (the HF
transformers order), and drawn with a key derived only from the request's seed and how many tokens
it has generated, so a seeded request gives the same tokens whichever batch and row it lands in.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.sampling_params import SEED_LIMIT, SamplingParams


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling controls for a batch of S rows (a jax pytree; every field has shape [S]).

    Attributes:
        temperature: float32; 0 marks a greedy row.
        top_k: int32; 0 disables top-k.
        top_p: float32 in (0, 1]; 1 disables top-p.
        min_p: float32 in [0, 1]; 0 disables min-p.
        seed: uint32 request seed.
        step: int32 number of tokens the sequence has generated so far.
    """

    temperature: jax.Array | np.ndarray
    top_k: jax.Array | np.ndarray
    top_p: jax.Array | np.ndarray
    min_p: jax.Array | np.ndarray
    seed: jax.Array | np.ndarray
    step: jax.Array | np.ndarray

    @classmethod
    def build(
        cls, params: list[SamplingParams], seeds: list[int], steps: list[int], pad_to: int
    ) -> SamplingArrays:
        """Pack one row per request into numpy arrays of ``pad_to`` rows; padding rows are greedy.

        ``seeds`` are already resolved (the engine draws one for requests without a seed) and
        ``steps`` count the tokens each sequence has generated so far.
        """
        num_rows = len(params)
        if len(seeds) != num_rows or len(steps) != num_rows:
            raise ValueError(
                f"params, seeds and steps must have one entry per row, got "
                f"{num_rows}, {len(seeds)} and {len(steps)}"
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

        return cls(
            temperature=padded([p.temperature for p in params], np.float32, 0.0),
            top_k=padded([p.top_k for p in params], np.int32, 0),
            top_p=padded([p.top_p for p in params], np.float32, 1.0),
            min_p=padded([p.min_p for p in params], np.float32, 0.0),
            seed=padded(seed_values, np.uint32, 0),
            step=padded(steps, np.int32, 0),
        )


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


def masked_logits(logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Return the logits ``sample`` draws from: [S, V] float32, -inf where a token is removed.

    Sampled rows hold ``logits / temperature`` shifted by a per-row constant (the row maximum is
    subtracted first, which leaves the softmax unchanged and keeps tiny temperatures finite), with
    top-k, top-p and min-p applied. Greedy rows keep only their argmax token.
    """
    logits = logits.astype(jnp.float32)
    is_greedy = arrays.temperature <= 0
    temperature = jnp.where(is_greedy, 1.0, arrays.temperature)[:, None]
    scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature

    sorted_logits = -jnp.sort(-scaled, axis=-1)
    cutoff = _kept_prefix_cutoff(sorted_logits, arrays)
    vocab_ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, :]
    greedy_ids = jnp.argmax(logits, axis=-1, keepdims=True)
    kept = jnp.where(is_greedy[:, None], vocab_ids == greedy_ids, scaled >= cutoff)
    return jnp.where(kept, scaled, -jnp.inf)


def _draw(row_logits: jax.Array, seed: jax.Array, step: jax.Array) -> jax.Array:
    """Draw one token id from one row's logits with a key fixed by (seed, step)."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.categorical(key, row_logits)


def sample(logits: jax.Array, arrays: SamplingArrays, all_greedy: bool) -> jax.Array:
    """Return the next token id of each row, [S] int32.

    Args:
        logits: [S, V] last-position logits, any float dtype (computed in float32).
        arrays: the rows' sampling controls.
        all_greedy: static; True when every row is greedy, which skips everything but argmax.
    """
    greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all_greedy:
        return greedy_ids
    filtered = masked_logits(logits, arrays)
    sampled_ids = jax.vmap(_draw)(filtered, arrays.seed, arrays.step).astype(jnp.int32)
    return jnp.where(arrays.temperature <= 0, greedy_ids, sampled_ids)
