"""Token ids to text, one token at a time, so that streamed text never shows what it later takes back.

Where it sits: the engine appends each sampled token id to its `Sequence`, then feeds it to that
sequence's `IncrementalDetokenizer`, which extends the text, checks the stop strings and says
whether one ended the sequence; `RequestOutput.text` is the detokenizer's `text`. Host-side,
plain Python over an HF tokenizer (jax is never imported here).

Decoding is incremental, with the two offsets of the field's usual approach (HF's TextStreamer,
vLLM, TGI): a window of token ids from `prefix_offset` on is decoded, and the text past what the
window's first `read_offset - prefix_offset` tokens decode to is the new text. The window starts
at a few prompt tokens, so the word-boundary space a SentencePiece tokenizer drops at the start of
a text is kept, and it moves up whenever its new text is complete, so each step decodes a few
tokens, not the whole output.

The rule: every `text` shown before the sequence finishes is a prefix of its final text. For it,
`text` holds back, until the sequence finishes:

- an incomplete UTF-8 character: a window whose new text ends in U+FFFD (a byte-fallback or
  byte-level token holding part of a character) is not taken in until a later token completes it.
  A run of byte-fallback tokens (`<0xNN>`, SentencePiece) is held until a token that is not one
  ends it: the tokenizer decodes such a run as a whole, and a stray byte makes all of it U+FFFD;
- with stop strings and `include_stop_str_in_output` False, the longest tail of the text that is
  a proper prefix of a stop string (at most len(longest stop) - 1 characters): it is cut away if
  the next tokens complete that stop string. vLLM holds back a fixed len(longest stop) - 1
  characters instead; the final text is the same, this one only streams sooner.

Stop semantics, as vLLM documents and implements them:

- a stop string ends the text at its start, or at its end with `include_stop_str_in_output`.
  Each token's new text is searched, with the len(stop) - 1 characters before it (a stop string
  may span tokens). When several stop strings complete in one token's text, the one that
  completes first wins (as if text came one character at a time; ties go to the one listed
  first): vLLM takes the first listed, which can leave an earlier-completing stop in the text;
- stop strings are not searched in the text of the first `min_tokens` output tokens, but a stop
  string that starts there and ends later counts;
- a stop token id or EOS that ends the sequence adds no text unless `include_stop_str_in_output`
  (with `skip_special_tokens` an EOS adds none anyway); its own text is not searched for stop
  strings;
- `skip_special_tokens` is passed to the tokenizer's decode. vLLM's `spaces_between_special_tokens`
  only changes slow (Python) tokenizers; these are fast ones, whose decode joins special tokens
  without spaces, as vLLM's fast path does.

On finishing for any reason the held-back text is released: the stop-string tail, and an
incomplete character as U+FFFD, so the final text is the tokenizer's plain decode of the kept
tokens (vLLM drops such a trailing fragment; the stop strings are searched in what is released).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from jpaged.sampling_params import SamplingParams

PROMPT_CONTEXT = 5  # prompt tokens decoded ahead of the output: they keep its first word-boundary space
REPLACEMENT = "\ufffd"  # what a decode shows for an incomplete (or invalid) UTF-8 byte sequence
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a SentencePiece byte-fallback token


@functools.lru_cache(maxsize=8)
def run_continuing_ids(tokenizer: Any, skip_special_tokens: bool) -> frozenset[int]:
    """Ids after which a run of byte-fallback tokens may still go on: the byte tokens, and the
    special tokens when they are skipped (the decoder never sees them)."""
    ids = {i for token, i in tokenizer.get_vocab().items() if BYTE_TOKEN.fullmatch(token)}
    return frozenset(ids | set(tokenizer.all_special_ids) if skip_special_tokens else ids)


class IncrementalDetokenizer:
    """The text of one sequence's output tokens, built token by token, with its stop strings.

    Attributes:
        num_tokens: output tokens taken in (a stop token or EOS that ended it included).
        last_token: the newest of them (None before the first).
        finished: whether the text is final (a stop string matched, or `finish()` was called).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        """`tokenizer`: an HF tokenizer (its `decode` is used); `prompt_token_ids`: the prompt
        (its last `PROMPT_CONTEXT` tokens start the decode window); `params`: the stop fields."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._run_continuing = run_continuing_ids(tokenizer, params.skip_special_tokens)
        self._stops = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # decode of ids[prefix_offset:read_offset], once needed
        self._text = ""  # all complete text so far (not yet less the stop-string tail)
        self._searched = 0  # characters of _text already searched for stop strings
        self.num_tokens = 0
        self.last_token: int | None = None
        self.finished = False

    @property
    def text(self) -> str:
        """The text to show now: all of it once finished, else less what may yet be taken back."""
        if self.finished or self._include_stop or not self._stops:
            return self._text
        return self._text[: len(self._text) - self._stop_prefix_length()]

    def follows(self, token_ids: list[int], num_tokens: int) -> bool:
        """Whether it has taken in exactly `token_ids[:num_tokens]` (checked by count and last id:
        beam search rewrites only a sequence's newest token)."""
        return self.num_tokens == num_tokens and (num_tokens == 0 or token_ids[num_tokens - 1] == self.last_token)

    def add(self, token_id: int) -> str | None:
        """Take in a generated token (not a stop token); return the stop string its text completed
        (the text is then cut and final), else None."""
        if self.finished:
            raise ValueError(f"token {token_id} added after the text was final")
        self.num_tokens += 1
        self.last_token = token_id
        self._ids.append(token_id)
        if token_id in self._run_continuing:
            return None
        new_text = self._window_text()
        if not new_text or new_text.endswith(REPLACEMENT):
            return None
        self._prefix_offset, self._read_offset, self._prefix_text = self._read_offset, len(self._ids), None
        return self._take(new_text)

    def finish(self, stop_token: int | None = None) -> str | None:
        """End the text: release what is held back and, when the sequence ended on `stop_token`
        (a stop token id or EOS), add its text under `include_stop_str_in_output`. Return the stop
        string the released text completed (the text is cut at it), else None; the U+FFFD of an
        incomplete last character is shown but completes no stop string. Idempotent."""
        if self.finished:
            return None
        base, held = self._text, self._window_text()
        complete = held.rstrip(REPLACEMENT)
        stop = self._take(complete)
        if stop is None:
            self._text += held[len(complete):]
        if stop_token is not None:
            self.num_tokens += 1
            self.last_token = stop_token
            if stop is None and self._include_stop:
                self._ids.append(stop_token)
                self._text = base + self._window_text()
        self.finished = True
        return stop

    def _window_text(self) -> str:
        """The text of the window's tokens past `read_offset` (it may end in an incomplete character)."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._decode(self._ids[self._prefix_offset :])[len(self._prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _take(self, new_text: str) -> str | None:
        """Append `new_text`, search it for stop strings once past `min_tokens`, cut at a match."""
        text = self._text + new_text
        found = self._find_stop(text) if self.num_tokens > self._min_tokens else None
        self._searched = len(text)
        if found is None:
            self._text = text
            return None
        stop, start = found
        self._text = text[: start + len(stop) if self._include_stop else start]
        self.finished = True
        return stop

    def _find_stop(self, text: str) -> tuple[str, int] | None:
        """The stop string that completes first in `text` past `_searched`, and its start."""
        best: tuple[str, int] | None = None
        for stop in self._stops:
            start = text.find(stop, max(0, self._searched - len(stop) + 1))
            if start >= 0 and (best is None or start + len(stop) < best[1] + len(best[0])):
                best = (stop, start)
        return best

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string (for
        each stop string, only the tails that start with its first character are tried)."""
        text, longest = self._text, 0
        for stop in self._stops:
            start = text.find(stop[0], max(0, len(text) - len(stop) + 1))
            while start != -1 and len(text) - start > longest:
                if stop.startswith(text[start:]):
                    longest = len(text) - start
                    break
                start = text.find(stop[0], start + 1)
        return longest


@functools.lru_cache(maxsize=1 << 16)
def token_text(tokenizer: Any, token_id: int) -> str:
    """`token_id`'s text as it reads after another token (a logprob's `decoded_token`): decoding it
    twice and dropping the first copy keeps the leading space that decoding it alone strips
    (SentencePiece's "▁")."""
    alone = tokenizer.decode([token_id])
    twice = tokenizer.decode([token_id, token_id])
    return twice[len(alone):] if twice.startswith(alone) else alone


@functools.lru_cache(maxsize=1 << 16)
def token_bytes(tokenizer: Any, token_id: int) -> tuple[int, ...]:
    """The UTF-8 bytes `token_id` stands for in a text (OpenAI's logprob `bytes`), so that tokens
    holding parts of one character join back into it: a byte-fallback token (`<0xE6>`) is its
    byte, a byte-level BPE token its alphabet's bytes; any other token is its text's encoding."""
    text = token_text(tokenizer, token_id)
    if "\ufffd" not in text:
        return tuple(text.encode())
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if (byte := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)) is not None:
        return (int(byte.group(1), 16),)
    if all(char in _BYTE_LEVEL for char in piece):
        return tuple(_BYTE_LEVEL[char] for char in piece)
    return tuple(text.encode())


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's characters (GPT-2's): a byte that prints as itself keeps its character,
    the others take characters 256, 257, ... in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_alphabet()


class NoDetokenizer:
    """Stands in for `IncrementalDetokenizer` for a request that wants no text (`detokenize=False`):
    its text stays "" and it finds no stop string."""

    text = ""

    def follows(self, token_ids: list[int], num_tokens: int) -> bool:
        return True

    def add(self, token_id: int) -> str | None:
        return None

    def finish(self, stop_token: int | None = None) -> str | None:
        return None
