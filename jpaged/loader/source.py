"""Resolves what the user named as `model` into config, tokenizer and a weight stream.

`None` means the built-in default model; a path ending in `.gguf` is a GGUF file; anything else
must be an HF model folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jpaged.loader import hf
from jpaged.loader.default_model import DEFAULT_MODEL_NAME, default_model_path


@dataclass
class ModelSource:
    name: str
    hf_config: dict
    generation_config: dict
    tokenizer: Any
    weights: Callable[[], Iterator[tuple[str, np.ndarray]]]


def open_model(model: str | None) -> ModelSource:
    if model is None:
        return _open_gguf(default_model_path(), DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        return _open_gguf(path, str(path))
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {model!r} is neither an HF model folder nor a .gguf file "
            "(models are loaded from local files only)"
        )
    return ModelSource(
        name=str(path),
        hf_config=hf.read_json(path / "config.json"),
        generation_config=hf.read_json(path / "generation_config.json", required=False),
        tokenizer=hf.load_tokenizer(path),
        weights=lambda: hf.load_safetensors_weights(path),
    )


def _open_gguf(path: Path, name: str) -> ModelSource:
    from jpaged.loader import gguf  # the `gguf` package is needed for GGUF files only

    config = gguf.load_gguf_config(path)
    return ModelSource(
        name=name,
        hf_config=config,
        generation_config={},
        tokenizer=gguf.load_gguf_tokenizer(path),
        weights=lambda: gguf.load_gguf_weights(path),
    )
