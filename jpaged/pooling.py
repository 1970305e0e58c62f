"""Embeddings: a prompt's final hidden states pooled into one vector (vLLM's pooling runner).

With `EngineConfig.runner = "pooling"` the engine computes each prompt as any prefill (in chunks,
through the paged KV cache) and, where a generating engine would sample after the prompt's last
token, pools the final hidden states (after the final norm) instead: by default the last token's
state, the pooling of decoder embedding models (Qwen3-Embedding, gte-Qwen2, e5-mistral), which
vLLM applies to them by default; the mean over the prompt's tokens (LLM2Vec, GritLM) or the first
token's state (CLS) where the model's files say so. The request then ends; nothing is generated.

Each step gives, per scheduled sequence, the state at its last new token, the sum of the states
of its new tokens and the state at its first new token (`ModelRunner`); the engine keeps a
sequence's running sum (`Sequence.pooled`) from chunk to chunk, restarting it when a chunk starts
at position 0 (a sequence preempted and recomputed). Mean and CLS pooling need every prompt token
computed, so they turn prefix caching off.

A model folder's sentence-transformers files say how it pools: `modules.json` lists the
`Transformer`, a `Pooling` module (its `config.json` names the mode: last token, mean or CLS;
max and weighted pooling are refused by name) and, where present, a `Normalize` module (without
one the vector is returned as it is). Any other module (`Dense`, ...) would change the vector
after pooling, and is refused by name.

Plain Python: no jax.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RUNNERS = ("generate", "pooling")
_MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
          "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


POOLING_TYPES = {"pooling_mode_lasttoken": "last", "lasttoken": "last", "pooling_mode_mean_tokens": "mean",
                 "mean": "mean", "pooling_mode_cls_token": "cls", "cls": "cls"}


@dataclass(frozen=True)
class PoolerConfig:
    """How a prompt's final hidden states become its embedding."""

    pooling_type: str = "last"  # "last" (token), "mean" (over the prompt's tokens) or "cls" (first token)
    normalize: bool = True  # L2-normalise (vLLM's default for embedding models)

    @property
    def reads_every_token(self) -> bool:
        """Whether the embedding needs every prompt token's state (mean and CLS pooling): no
        prefix cache, and one pipeline stage."""
        return self.pooling_type != "last"


def read_pooler_config(folder: Path | None) -> PoolerConfig:
    """The pooling a model folder's sentence-transformers files describe (None, or no
    `modules.json`: last token, normalised). ValueError naming the file and mode for a pooling
    other than the last token's, the mean or the first token's."""
    modules_file = folder / "modules.json" if folder is not None else None
    if modules_file is None or not modules_file.is_file():
        return PoolerConfig()
    modules = json.loads(modules_file.read_text())
    kinds = {module.get("type", "").rsplit(".", 1)[-1]: module for module in modules}
    if others := sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"}):
        raise ValueError(f"{modules_file} lists the modules {', '.join(others)} after the transformer; jpaged's "
                         "pooling runner applies Pooling and Normalize only")
    if "Pooling" in kinds:
        pooling_file = folder / kinds["Pooling"].get("path", "") / "config.json"
        if not pooling_file.is_file():
            raise ValueError(f"{modules_file} lists a Pooling module, but {pooling_file} is missing")
        settings = json.loads(pooling_file.read_text())
        modes = ([settings["pooling_mode"]] if isinstance(settings.get("pooling_mode"), str)
                 else [mode for mode in _MODES if settings.get(mode)])
        if len(modes) != 1 or modes[0] not in POOLING_TYPES:
            raise ValueError(f"{pooling_file} pools by {', '.join(modes) or 'no mode'}; jpaged's pooling runner "
                             "pools by one of the last token, the mean or the first token (pooling_mode_lasttoken, "
                             "pooling_mode_mean_tokens, pooling_mode_cls_token)")
        return PoolerConfig(pooling_type=POOLING_TYPES[modes[0]], normalize="Normalize" in kinds)
    return PoolerConfig(normalize="Normalize" in kinds)


def pool(pooled: np.ndarray, config: PoolerConfig) -> np.ndarray:
    """The embedding (float32 [hidden]) of a prompt's pooled state `pooled` [hidden] (its last
    token's, its mean or its first token's)."""
    pooled = np.asarray(pooled, np.float32)
    if not config.normalize:
        return pooled
    return pooled / max(float(np.linalg.norm(pooled)), 1e-12)
