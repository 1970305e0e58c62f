"""Reasoning outputs: the thinking a reasoning model writes before its answer, told apart from it.

Reasoning models (DeepSeek-R1 and its distillations, QwQ, Qwen3) write their reasoning between
`<think>` and `</think>`, the opening marker often already in the prompt (their chat templates
put it there), then the answer. A `ReasoningParser`, chosen by name as vLLM's
`--reasoning-parser` is, knows the markers of a family and serves two places:

- the engine holds a request's structured-output grammar back until reasoning has ended
  (`reasoning_ended` on the prompt, then the end marker among the output tokens), so the model
  thinks freely and the constraint applies to the answer;
- the server splits each reply into `reasoning` and `content` (`split`), in whole responses and,
  piece by piece, in streams.

Parsers (vLLM's names and readings):

- `deepseek_r1`: the output is reasoning up to the first `</think>`, the answer after it; without
  a `</think>` it is all reasoning.
- `qwen3`: the same, and later `</think>` markers in the answer are dropped; with
  `chat_template_kwargs={"enable_thinking": False}` the whole output is the answer.

Where the prompt already closed the reasoning (`reasoning_ended`: Qwen3's template does so with
thinking off; a continued assistant message may), the whole output is the answer. For `qwen3`
the prompt's turn markers (`<|im_start|>`, `<|im_end|>`) bound that search to the current turn.

`<think>` markers inside the reasoning are dropped. The markers must reach the output text:
they do where the tokenizer keeps them as ordinary added tokens, as these models' tokenizers do.

Plain Python: no jax.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("jpaged")

START, END = "<think>", "</think>"
TURN_MARKERS = {"deepseek_r1": (), "qwen3": ("<|im_start|>", "<|im_end|>")}
REASONING_PARSERS = tuple(TURN_MARKERS)


@dataclass(frozen=True)
class ReasoningParser:
    """One family's reasoning markers, as token ids of one tokenizer (`from_tokenizer`)."""

    name: str
    start_token_id: int
    end_token_id: int
    turn_marker_ids: frozenset[int] = frozenset()

    @classmethod
    def from_tokenizer(cls, name: str, tokenizer: Any) -> ReasoningParser:
        """The parser `name` (one of `REASONING_PARSERS`) over an HF tokenizer. ValueError naming
        the parser for an unknown name, or a tokenizer without `<think>` / `</think>` as tokens."""
        if name not in TURN_MARKERS:
            raise ValueError(f"reasoning_parser {name!r} is not one of {', '.join(REASONING_PARSERS)}")
        vocab = tokenizer.get_vocab()
        missing = [token for token in (START, END) if token not in vocab]
        if missing:
            raise ValueError(f"reasoning_parser {name!r} needs {START} and {END} as tokens of the tokenizer; "
                             f"it has no {' or '.join(missing)} (is this a reasoning model?)")
        if special := [token for token in (START, END) if vocab[token] in set(tokenizer.all_special_ids)]:
            logger.warning("reasoning_parser %r: the tokenizer marks %s special, so replies decoded without special "
                           "tokens lose them and cannot be split into reasoning and content", name, " and ".join(special))
        turns = frozenset(vocab[token] for token in TURN_MARKERS[name] if token in vocab)
        return cls(name, vocab[START], vocab[END], turns)

    def reasoning_ended(self, prompt_token_ids: list[int]) -> bool:
        """Whether the prompt already closed the reasoning: reading back from its end, an end
        marker comes before any start marker (or, for `qwen3`, the current turn's start)."""
        for token in reversed(prompt_token_ids):
            if token == self.end_token_id:
                return True
            if token == self.start_token_id or token in self.turn_marker_ids:
                return False
        return False

    def count_reasoning_tokens(self, token_ids: list[int], thinking: bool = True) -> int:
        """How many of a reply's `token_ids` are its reasoning: those before the first end marker,
        markers not counted (none with `thinking=False`)."""
        if not thinking:
            return 0
        end = token_ids.index(self.end_token_id) if self.end_token_id in token_ids else len(token_ids)
        return sum(token != self.start_token_id for token in token_ids[:end])

    def split(self, text: str, thinking: bool = True) -> tuple[str | None, str | None]:
        """(reasoning, content) of a reply's `text`, each None where empty. `thinking=False` (the
        prompt closed the reasoning, or a `qwen3` request turned `enable_thinking` off): all
        content. As `text` grows, both parts only grow (a stream's pieces are their differences)."""
        if not thinking:
            return None, text or None
        reasoning, ended, content = text.partition(END)
        reasoning = reasoning.replace(START, "")
        if self.name == "qwen3":
            content = content.replace(END, "")
        return reasoning or None, (content or None) if ended else None
