"""Draft tokens for n-gram speculative decoding (prompt lookup): host-side, plain Python.

Before each step the engine asks `NgramProposer.propose` for every running sequence that is about
to decode. A sequence whose last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`)
occurred earlier in its prompt or output gets the tokens that followed the latest such
occurrence as drafts; the scheduler gives them slots behind its last token, the step computes
them as one row, and the engine keeps the drafts that the model's own greedy choices confirm
(`accepted_tokens`). The method is prompt lookup decoding (Saxena, 2023), vLLM's ``"ngram"``
speculative method; verification by greedy agreement is that of speculative decoding (Leviathan
et al., 2023, for a temperature of 0).
"""

from __future__ import annotations

import weakref

from jpaged.config import SpeculativeConfig
from jpaged.sequence import Sequence


def can_draft(seq: Sequence) -> bool:
    """Whether `seq`'s next tokens are plain greedy choices (the argmax of the model's logits),
    which drafts can be checked against: temperature 0, no penalty, bias, allowed or bad words, pending `min_tokens`
    or logprobs, one sample, not held (beam search)."""
    params = seq.sampling_params
    return (params.temperature <= 0 and params.repetition_penalty == 1 and not params.presence_penalty
            and not params.frequency_penalty and not params.changes_logits and params.logprobs is None
            and len(seq.output_token_ids) >= max(params.min_tokens, 1) and params.num_samples == 1
            and not seq.on_hold)


def accepted_tokens(drafts: list[int], greedy: list[int]) -> list[int]:
    """The tokens a verified step emits: the drafts up to the first that differs from the model's
    greedy choice at its position, then the model's choice there (`greedy[i]` is the argmax after
    the sequence's last token and drafts `[:i]`; it has one entry more than `drafts`)."""
    for i, draft in enumerate(drafts):
        if greedy[i] != draft:
            return drafts[:i] + [greedy[i]]
    return drafts + [greedy[len(drafts)]]


class NgramProposer:
    """Proposes up to `num_speculative_tokens` drafts per sequence from an index of the n-grams
    of its tokens, extended as tokens arrive (each token is indexed once)."""

    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self._indexes: weakref.WeakKeyDictionary[Sequence, tuple[dict, int]] = weakref.WeakKeyDictionary()

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """At most `min(limit, num_speculative_tokens)` drafts to follow `seq`'s tokens ([] when
        none of its last n-grams occurred before)."""
        count = min(limit, self.k)
        num_tokens = seq.num_tokens
        if count <= 0 or num_tokens <= self.min_n:
            return []
        index, indexed = self._indexes.get(seq, ({}, 0))
        first = max(0, indexed - self.max_n + 1)
        tokens = seq.token_ids(first, num_tokens)
        for end in range(indexed, num_tokens - 1):  # every n-gram ending before the last token
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                index[tuple(tokens[end - n + 1 - first:end + 1 - first])] = end
        self._indexes[seq] = (index, max(indexed, num_tokens - 1))
        for n in range(min(self.max_n, num_tokens - 1), self.min_n - 1, -1):
            end = index.get(tuple(tokens[num_tokens - n - first:]))
            if end is not None:
                return seq.token_ids(end + 1, min(end + 1 + count, num_tokens))
        return []
