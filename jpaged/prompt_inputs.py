"""A prompt as the API takes it, parsed into what the engine adds as a request.

A prompt is text, a list of token ids, or a dict of vLLM's prompt keys: `prompt` (text),
`prompt_token_ids`, `multi_modal_data` (`{"image": ...}`, `jpaged/images.py`), `prompt_embeds`
(a `[length, hidden_size]` array that stands in for the prompt's token embeddings: vLLM's
`EmbedsPrompt`) and `cache_salt` (a string that keeps the request's prefix-cache blocks apart from
those of requests without the same salt). `parse_prompt` reads one; the engine then checks what
depends on the model.

Embeddings in place of token embeddings, whether an image's or a whole embeds prompt's, travel
as `InputEmbeds`: rows for prompt positions `[offset, offset + length)` and a hash of their
content, by which the block manager keys the cached blocks holding them. An embeds prompt is
split into one `InputEmbeds` per KV block (`embeds_by_block`), so that embeds prompts sharing
their first blocks share those blocks' cache. Its token ids are placeholders
(`EMBEDS_PLACEHOLDER_ID`), which nothing but those keys reads.
Host side: no jax.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jpaged.sampling_params import is_integer

PROMPT_KEYS = ("prompt", "prompt_token_ids", "multi_modal_data", "prompt_embeds", "cache_salt")
EMBEDS_PLACEHOLDER_ID = 0  # the token id of each position of an embeds prompt (vLLM's placeholder too)


@dataclass(frozen=True)
class InputEmbeds:
    """Embeddings `[length, hidden]` (float32 numpy) for prompt positions `[offset, offset +
    length)`, in place of those tokens' embeddings, and a hash of their content."""

    offset: int
    embeds: np.ndarray
    hash: str

    @property
    def length(self) -> int:
        return len(self.embeds)


@dataclass
class PromptInputs:
    """One parsed prompt: its text (None unless given as text), token ids, `multi_modal_data` (as
    given: `jpaged/images.py` reads it), prompt embeddings (float32 `[length, hidden]`, or None)
    and cache salt."""

    text: str | None
    token_ids: list[int]
    multi_modal_data: dict | None = None
    embeds: np.ndarray | None = None
    cache_salt: str | None = None


def parse_prompt(prompt, encode: Callable[[str], list[int]]) -> PromptInputs:
    """`prompt` (text, token ids or a prompt dict) parsed; `encode` tokenizes text. ValueError for
    an unknown key, a dict with neither prompt, token ids nor embeddings, `prompt_embeds` beside
    another prompt, token ids that are not integers, or a cache salt that is not a non-empty
    string."""
    if isinstance(prompt, str):
        return PromptInputs(prompt, encode(prompt))
    if isinstance(prompt, dict):
        return _parse_dict(prompt, encode)
    if isinstance(prompt, list):
        return PromptInputs(None, token_ids(prompt))
    raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")


def _parse_dict(prompt: dict, encode: Callable[[str], list[int]]) -> PromptInputs:
    if unknown := sorted(set(prompt) - set(PROMPT_KEYS), key=str):
        raise ValueError(f"a prompt dict takes {', '.join(map(repr, PROMPT_KEYS))}, got also {unknown}")
    salt = prompt.get("cache_salt")
    if salt is not None and not (isinstance(salt, str) and salt):
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r:.50}")
    multi_modal_data = prompt.get("multi_modal_data")
    if "prompt_embeds" in prompt:
        if others := sorted(set(prompt) & {"prompt", "prompt_token_ids", "multi_modal_data"}):
            raise ValueError(f"a prompt dict with 'prompt_embeds' takes no {others} (one prompt per dict)")
        embeds = as_embeds_array(prompt["prompt_embeds"])
        return PromptInputs(None, [EMBEDS_PLACEHOLDER_ID] * len(embeds), embeds=embeds, cache_salt=salt)
    if "prompt_token_ids" in prompt:
        return PromptInputs(prompt.get("prompt"), token_ids(prompt["prompt_token_ids"]), multi_modal_data,
                            cache_salt=salt)
    if "prompt" not in prompt:
        raise ValueError(f"a prompt dict needs 'prompt', 'prompt_token_ids' or 'prompt_embeds', got keys "
                         f"{sorted(prompt)}")
    if isinstance(prompt["prompt"], dict):
        raise ValueError("a prompt dict's 'prompt' must be a string or a list of token ids, got a dict")
    inner = parse_prompt(prompt["prompt"], encode)
    return PromptInputs(inner.text, inner.token_ids, multi_modal_data, cache_salt=salt)


def token_ids(values) -> list[int]:
    """A prompt's token ids as ints; ValueError naming the first value that is not an integer (or
    the value itself, when it is not a list)."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise ValueError(f"prompt_token_ids must be a list of token ids, got {values!r:.100} ({type(values).__name__})")
    values = list(values)
    bad = [v for v in values if not is_integer(v)]
    if bad:
        raise ValueError(f"prompt token ids must be integers, got {bad[0]!r} ({type(bad[0]).__name__})")
    return [int(v) for v in values]


def as_embeds_array(value) -> np.ndarray:
    """Prompt embeddings as a float32 numpy `[length, hidden]`: from a torch tensor (any float
    dtype, on any device), a numpy or jax array, or nested lists of floats; a leading batch axis
    of 1 is dropped, as vLLM drops it. ValueError for values that are not floats (integers,
    bools, complex numbers), another rank, no rows, or values not finite."""
    if value is None:
        raise ValueError("prompt_embeds must be a [length, hidden_size] array of floats, got None")
    if hasattr(value, "detach"):  # a torch tensor, read without importing torch
        if not value.is_floating_point():
            raise ValueError(f"prompt_embeds must hold floats, got a tensor of {value.dtype}")
        try:
            value = value.detach().to("cpu").float().numpy()
        except Exception as err:  # a tensor with no data to copy (on the "meta" device, say)
            raise ValueError(f"prompt_embeds could not be read ({type(err).__name__}: {err})") from err
    try:
        given = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"prompt_embeds must be a [length, hidden_size] array of floats, got "
                         f"{type(value).__name__} ({err})") from err
    if given.dtype.kind in "biucOSUM":  # bfloat16 and float8 (ml_dtypes) are of kind "V", and floats
        raise ValueError(f"prompt_embeds must hold floats, got {given.dtype}")
    embeds = given.astype(np.float32)
    if embeds.ndim == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.ndim != 2 or embeds.shape[0] == 0:
        raise ValueError(f"prompt_embeds must be a [length, hidden_size] array with at least one row, got shape "
                         f"{list(embeds.shape)}")
    if not np.isfinite(embeds).all():
        raise ValueError("prompt_embeds holds values that are not finite (nan or inf)")
    return embeds


def embeds_by_block(embeds: np.ndarray, block_size: int) -> list[InputEmbeds]:
    """An embeds prompt `[length, hidden]` as one `InputEmbeds` per KV block of `block_size`
    positions, each hashed on its rows' bytes."""
    return [InputEmbeds(start, rows, hashlib.sha256(rows.tobytes()).hexdigest())
            for start in range(0, len(embeds), block_size) for rows in [embeds[start:start + block_size]]]
