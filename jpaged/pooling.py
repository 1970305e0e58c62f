"""Embeddings: a prompt's final hidden state pooled into one vector (vLLM's pooling runner).

With `EngineConfig.runner = "pooling"` the engine computes each prompt as any prefill (in chunks,
through the paged KV cache, prefix cache included) and, where a generating engine would sample
after the prompt's last token, takes the hidden state there instead (after the final norm),
L2-normalised: the last-token pooling of decoder embedding models (Qwen3-Embedding, gte-Qwen2,
e5-mistral), which vLLM applies to them by default. The request then ends; nothing is generated.

A model folder's sentence-transformers files say how it pools: `modules.json` lists the
`Transformer`, a `Pooling` module (its `config.json` names the mode: only last-token pooling is
served; mean, CLS and max pooling are refused by name) and, where present, a `Normalize` module
(without one the vector is returned as it is). Any other module (`Dense`, ...) would change the
vector after pooling, and is refused by name.

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


@dataclass(frozen=True)
class PoolerConfig:
    """How the last token's hidden state becomes the embedding."""

    normalize: bool = True  # L2-normalise (vLLM's default for embedding models)


def read_pooler_config(folder: Path | None) -> PoolerConfig:
    """The pooling a model folder's sentence-transformers files describe (None, or no
    `modules.json`: last token, normalised). ValueError naming the file and mode for a pooling
    other than the last token's."""
    modules_file = folder / "modules.json" if folder is not None else None
    if modules_file is None or not modules_file.is_file():
        return PoolerConfig()
    modules = json.loads(modules_file.read_text())
    kinds = {module.get("type", "").rsplit(".", 1)[-1]: module for module in modules}
    if others := sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"}):
        raise ValueError(f"{modules_file} lists the modules {', '.join(others)} after the transformer; jpaged's "
                         "pooling runner applies Pooling (last token) and Normalize only")
    if "Pooling" in kinds:
        pooling_file = folder / kinds["Pooling"].get("path", "") / "config.json"
        if not pooling_file.is_file():
            raise ValueError(f"{modules_file} lists a Pooling module, but {pooling_file} is missing")
        settings = json.loads(pooling_file.read_text())
        modes = ([settings["pooling_mode"]] if isinstance(settings.get("pooling_mode"), str)
                 else [mode for mode in _MODES if settings.get(mode)])
        if modes not in (["pooling_mode_lasttoken"], ["lasttoken"]):
            raise ValueError(f"{pooling_file} pools by {', '.join(modes) or 'no mode'}; jpaged's pooling runner "
                             "pools by the last token only (pooling_mode_lasttoken)")
    return PoolerConfig(normalize="Normalize" in kinds)


def pool(hidden: np.ndarray, config: PoolerConfig) -> np.ndarray:
    """The embeddings (float32 [rows, hidden]) of last-token hidden states `hidden` [rows, hidden]."""
    hidden = np.asarray(hidden, np.float32)
    if not config.normalize:
        return hidden
    return hidden / np.maximum(np.linalg.norm(hidden, axis=-1, keepdims=True), 1e-12)
