"""Draft tokens for n-gram speculative decoding (prompt lookup): host-side, plain Python.

Before each step the engine asks `NgramProposer.propose` for every running sequence that is about
to decode. A sequence whose last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`)
occurred earlier in its prompt or output gets the tokens that followed the latest such
occurrence as drafts; the scheduler gives them slots behind its last token, the step computes
them as one row, and the engine keeps the drafts that the model's own choices confirm
(`accepted_tokens`): those equal to the token the model draws at their position with the
sequence's own sampling controls and seed. The method is prompt lookup decoding (Saxena, 2023),
vLLM's ``"ngram"`` speculative method; verification is speculative decoding's rejection sampling
(Leviathan et al., 2023), which for a greedy sequence is agreement with the argmax.
"""

from __future__ import annotations

import weakref

from jpaged.config import SpeculativeConfig
from jpaged.sequence import Sequence


def can_draft(seq: Sequence) -> bool:
    """Whether drafts may follow `seq`'s tokens: it has sampled its first token (a request's
    samples fork there) and its request is not a beam search (whose rounds take one token a
    beam)."""
    return len(seq.output_token_ids) >= 1 and seq.request.may_draft


def accepted_tokens(drafts: list[int], sampled: list[int]) -> list[int]:
    """The tokens a verified step emits: the drafts up to the first that differs from the model's
    own choice at its position, then the model's choice there (`sampled[i]` is the token the
    sequence samples after its last token and drafts `[:i]`, as it would without drafts; it has
    one entry more than `drafts`).

    For a greedy row this is greedy agreement. For a sampled row it is the rejection sampling of
    speculative decoding (Leviathan et al., 2023; Chen et al., 2023) for a draft that is one token
    with certainty: a draft `d` is kept with probability p(d) (the draw equals it), and else the
    token comes from p with `d` taken out and renormalised (the draw, given it is not `d`), so
    each token has exactly the distribution, and with a seed the value, of decoding without
    drafts."""
    for i, draft in enumerate(drafts):
        if sampled[i] != draft:
            return drafts[:i] + [sampled[i]]
    return drafts + [sampled[len(drafts)]]


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
