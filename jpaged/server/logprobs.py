"""Token logprobs in the API's two shapes, from the engine's per-token `{token id: Logprob}` dicts.

The engine reports, per generated token, a dict holding the sampled token's `Logprob` first and
the top alternatives after it (`CompletionOutput.logprobs`). Completions answer OpenAI's legacy
shape (`tokens`, `token_logprobs`, `top_logprobs` as dicts keyed by token, `text_offset`), where a
token that is part of a character is named by its bytes (`bytes:\\xe6`), as OpenAI's API names
it, so that such tokens do not all become one U+FFFD key; chat answers a list
of `{token, logprob, bytes, top_logprobs}`, where `bytes` are what the token stands for (a byte
token's own byte, so that the bytes of tokens splitting a character join back into it). A
token's string is its text as it reads inside a text (" Paris", with the word-boundary space
that a tokenizer drops from a text's first token). Prompt logprobs (vLLM's extra field) keep the
engine's entries: by token id, with rank and text. Logprobs that are not finite (a token masked
out) are sent as -9999.0, since JSON has no -inf.
"""

from __future__ import annotations

import math
from typing import Any

from jpaged.detokenizer import token_bytes, token_text
from jpaged.outputs import Logprob
from jpaged.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)

FLOOR = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def completion_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, Logprob] | None],
                        text_offset: int = 0, top: int | None = None, as_token_ids: bool = False,
                        first_alone: bool = False) -> CompletionLogprobs:
    """The completions shape for `token_ids` with their engine entries (None where a token has
    none, as a prompt's first); `text_offset` is where the first token's text starts
    (`first_alone`: the first token starts a text, as an embeds prompt's output does, so it is
    as long as its text decoded alone; see `text_length`). With
    `top` >= 0, each token's `top_logprobs` hold its own and at most the `top` most likely (an
    echoed prompt's entries may have been computed wider, for `prompt_logprobs`); None or -1
    (the whole vocabulary) keeps every entry. `as_token_ids`: tokens are named `token_id:N`
    (vLLM's `return_tokens_as_token_ids`) instead of by their text."""
    top = None if top is not None and top < 0 else top
    result = CompletionLogprobs()
    for i, (token_id, entry) in enumerate(zip(token_ids, entries)):
        text = token_text(tokenizer, token_id)
        result.tokens.append(id_name(token_id) if as_token_ids else legacy_token(tokenizer, token_id, text))
        result.text_offset.append(text_offset)
        text_offset += text_length(tokenizer, [token_id], first_alone and i == 0)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(finite(entry[token_id].logprob))
        named: dict[str, float] = {}
        for token, lp in entry.items():  # the chosen token first: its name keeps its own logprob
            if top is None or token == token_id or lp.rank <= top:
                name = id_name(token) if as_token_ids else legacy_token(tokenizer, token, lp.decoded_token)
                named.setdefault(name, finite(lp.logprob))
        result.top_logprobs.append(named)
    return result


def id_name(token_id: int) -> str:
    """A token named by its id, as vLLM's `return_tokens_as_token_ids` names it."""
    return f"token_id:{token_id}"


def text_length(tokenizer: Any, token_ids: list[int], first_alone: bool = False) -> int:
    """How far `text_offset` runs over `token_ids`: the length of each token's own text, a part of
    a character counting as the one U+FFFD it decodes to (not as its `bytes:` name). With
    `first_alone` the first token starts a text (an embeds prompt's output, decoded without a
    prompt before it), where a tokenizer drops the word-boundary space its text reads with
    elsewhere: it counts as long as it decodes alone."""
    lengths = [len(token_text(tokenizer, token_id)) for token_id in token_ids]
    if first_alone and token_ids:
        lengths[0] = len(tokenizer.decode(token_ids[:1]))
    return sum(lengths)


def legacy_token(tokenizer: Any, token_id: int, text: str) -> str:
    """`token_id`'s name in the completions shape: its `text`, or, for a token that holds part of a
    character (its text shows U+FFFD in its place), `bytes:` and its bytes as `\\xNN` escapes."""
    if "\ufffd" not in text:
        return text
    raw = bytes(token_bytes(tokenizer, token_id))
    if raw.decode("utf-8", errors="replace") == text and "\ufffd".encode() in raw:
        return text  # a token of the replacement character itself
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def prompt_logprobs(entries: list[dict[int, Logprob] | None] | None) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs` field: per prompt token (None for the first) its top logprobs by
    token id, each with its rank and text."""
    if entries is None:
        return None
    return [None if entry is None else
            {str(token): PromptLogprob(logprob=finite(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
             for token, lp in entry.items()} for entry in entries]


def chat_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, Logprob]], top: int,
                  as_token_ids: bool = False) -> ChatLogprobs:
    """The chat shape for `token_ids` with their engine entries and `top` alternatives each (-1:
    every entry, the whole vocabulary); `as_token_ids` names each `token` `token_id:N` (its
    `bytes` stay what it stands for)."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        best = sorted(entry.items(), key=lambda item: item[1].logprob, reverse=True)[: None if top < 0 else top]
        content.append(ChatTokenLogprob(**_token(tokenizer, token_id, entry[token_id], as_token_ids),
                                        top_logprobs=[TopLogprob(**_token(tokenizer, t, lp, as_token_ids))
                                                      for t, lp in best]))
    return ChatLogprobs(content=content)


def _token(tokenizer: Any, token_id: int, logprob: Logprob, as_token_ids: bool) -> dict:
    return {"token": id_name(token_id) if as_token_ids else logprob.decoded_token, "logprob": finite(logprob.logprob),
            "bytes": list(token_bytes(tokenizer, token_id))}
