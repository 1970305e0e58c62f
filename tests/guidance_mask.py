"""An oracle for structured outputs in HF transformers' `generate`: a logits processor that applies
llguidance's own mask (its numpy helpers) for the tokens a sequence has generated so far."""

import json

import llguidance
import llguidance.hf
import llguidance.numpy
import torch
from transformers import LogitsProcessor

from jpaged.sampling_params import StructuredOutputsParams


class GuidanceMask(LogitsProcessor):
    """An HF logits processor: llguidance's mask for the tokens generated so far (one sequence)."""

    def __init__(self, tokenizer, constraint: StructuredOutputsParams, prompt_len: int, vocab: int,
                 eos: int | list[int]):
        kind, spec = constraint.constraint
        if kind in ("json", "json_object"):
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                spec if kind == "json" else {"type": "object"},
                overrides={"whitespace_flexible": not constraint.disable_any_whitespace})
        else:
            grammar = llguidance.grammar_from({"regex": "regex", "choice": "choice", "grammar": "lark"}[kind],
                                              json.dumps(spec) if kind == "choice" else spec)
        self.matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos),
                                            grammar)
        self.prompt_len, self.vocab, self.consumed = prompt_len, vocab, 0

    def __call__(self, input_ids, scores):
        generated = input_ids[0, self.prompt_len:].tolist()
        assert self.matcher.consume_tokens(generated[self.consumed:])
        self.consumed = len(generated)
        bitmask = llguidance.numpy.allocate_token_bitmask(1, self.vocab)
        llguidance.numpy.fill_next_token_bitmask(self.matcher, bitmask)
        masked = scores.numpy().copy()
        llguidance.numpy.apply_token_bitmask_inplace(masked, bitmask)
        return torch.from_numpy(masked)
