"""Resolves what the user named as `model` into config, tokenizer and a weight stream.

`None` means the built-in default model; a path ending in `.gguf` is a GGUF file; an existing
folder is an HF model folder; anything else shaped like `org/name` is a model id on the HF hub,
found in the local HF cache (`$HF_HOME`, `$HF_HUB_CACHE`) or downloaded there by
`huggingface_hub` where a hub is reachable and `HF_HUB_OFFLINE` is not set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jpaged.loader import hf
from jpaged.loader.default_model import DEFAULT_MODEL_NAME, default_model_path
from jpaged.loader.multimodal import is_vision_language, language_model_weights, reads_images, text_only_config

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]  # what a model folder needs
TOKENIZER_FILES = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.txt"]


def _with_model_prefix(weights: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """A checkpoint's tensors under the causal LM's names: a base model's (`embed_tokens.weight`,
    `layers.0....`, as `Qwen3Model.save_pretrained` writes them) get the `model.` prefix."""
    for name, tensor in weights:
        yield (name if name.startswith(("model.", "lm_head.")) else f"model.{name}"), tensor


@dataclass
class ModelSource:
    """A model's parts, the slow ones as loaders: `load_tokenizer()` builds its transformers
    tokenizer and `weights(keep_packed)` streams `(hf_name, array)` pairs, so that an engine can
    do both at once. `block_types` gives the GGML block type of each tensor a GGUF file stores
    quantized (HF name: type name); `weights` yields the tensors named in `keep_packed` as their
    raw block rows. `name` is the model as the user gave it (a hub id stays the id), the name
    engines log and the server serves by default."""

    name: str
    hf_config: dict
    generation_config: dict
    load_tokenizer: Callable[[], Any]
    weights: Callable[[dict[str, str] | None], Iterator[tuple[str, np.ndarray]]]
    block_types: dict[str, str] = field(default_factory=dict)
    folder: Path | None = None  # where an HF model's files lie (None: a GGUF file)
    # A model that reads images (LLaVA): its whole config.json, and its vision tensors, filled as
    # `weights` streams past them
    vision_config: dict | None = None
    vision_weights: dict[str, np.ndarray] | None = None
    # A checkpoint's `(name, array)` pairs under the names `weights` yields: the language model's
    # (a vision-language model's other tensors left out), for tensors a caller hands over
    checkpoint_names: Callable[[Iterable[tuple[str, np.ndarray]]], Iterator[tuple[str, np.ndarray]]] = \
        _with_model_prefix


def open_model(model: str | None, tokenizer: str | None = None, revision: str | None = None) -> ModelSource:
    """`model`'s parts; with `tokenizer` (an HF folder or hub id), that tokenizer instead of the
    model's own (vLLM's `tokenizer` argument); `revision` (a branch, tag or commit) picks the
    version of a hub model. Raises TypeError for a model or tokenizer that is not a name,
    FileNotFoundError naming what is missing, ValueError for a revision of a local model."""
    _check_name("model", model, none_means="None (the built-in model)")
    if revision is not None and (model is None or not HUB_ID.fullmatch(os.fspath(model))
                                 or Path(model).expanduser().exists()):
        raise ValueError(f"revision={revision!r} picks a version of an HF hub model; {model!r} is "
                         f"{'the built-in model' if model is None else 'not a hub id'}")
    load_tokenizer = None
    if tokenizer is not None:
        _check_name("tokenizer", tokenizer)
        load_tokenizer = hf.tokenizer_loader(_folder_or_hub("tokenizer", os.fspath(tokenizer), TOKENIZER_FILES,
                                                            required="tokenizer_config.json"))
    if model is None:
        return _open_gguf(default_model_path(), DEFAULT_MODEL_NAME, load_tokenizer)
    model = os.fspath(model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        return _open_gguf(path, str(path), load_tokenizer)
    path = _folder_or_hub("model", model, HUB_FILES, revision=revision)
    hf_config = hf.read_json(path / "config.json")
    vision_language = is_vision_language(hf_config)  # its language model, the vision tensors aside
    vision_weights = {} if reads_images(hf_config) else None

    def named(weights):
        return language_model_weights(weights, vision_weights) if vision_language else _with_model_prefix(weights)

    return ModelSource(
        name=model,
        hf_config=text_only_config(hf_config) if vision_language else hf_config,
        generation_config=hf.read_json(path / "generation_config.json", required=False),
        load_tokenizer=load_tokenizer or hf.tokenizer_loader(path),
        weights=lambda keep_packed=None: named(hf.load_safetensors_weights(path)),
        folder=path,
        vision_config=hf_config if vision_weights is not None else None,
        vision_weights=vision_weights,
        checkpoint_names=language_model_weights if vision_language else _with_model_prefix,
    )


def _check_name(what: str, value, none_means: str | None = None) -> None:
    if not isinstance(value, (str, os.PathLike)) and not (value is None and none_means):
        accepted = "a path, an HF hub id" + (f" or {none_means}" if none_means else "")
        raise TypeError(f"{what} must be {accepted}, got {type(value).__name__} {value!r:.100}")


def _folder_or_hub(what: str, name: str, patterns: list[str], required: str = "config.json",
                   revision: str | None = None) -> Path:
    """`name` as an existing folder, or else as a hub id resolved by `hub_snapshot`."""
    if not name.strip():
        raise FileNotFoundError(f"{what} is an empty name; give a folder, a .gguf file or an HF hub id")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if not HUB_ID.fullmatch(name):
        kinds = "an HF model folder, a .gguf file" if what == "model" else "a folder"
        raise FileNotFoundError(f"{what} {name!r} is neither {kinds} nor an HF hub id of the form 'org/name'")
    return hub_snapshot(name, patterns, required=required, revision=revision, what=what)


def _open_gguf(path: Path, name: str, load_tokenizer=None) -> ModelSource:
    from jpaged.loader import gguf, gguf_cache  # the `gguf` package is needed for GGUF files only

    index, own_tokenizer = gguf_cache.open_cached(path)
    return ModelSource(
        name=name,
        hf_config=index.config,
        generation_config={},
        load_tokenizer=load_tokenizer or own_tokenizer,
        weights=lambda keep_packed=None: gguf.load_gguf_weights(path, index=index, keep_packed=keep_packed),
        block_types=gguf.block_types(index),
    )


def hub_snapshot(repo_id: str, patterns: list[str] = HUB_FILES, required: str = "config.json",
                 revision: str | None = None, what: str = "model") -> Path:
    """The local folder of hub model `repo_id` at `revision` (None: main; its files matching
    `patterns`: by default config, tokenizer, safetensors), from the HF cache, or downloaded into
    it where the hub is reachable and offline mode is off.

    Raises FileNotFoundError naming `what` it is ("model", "tokenizer"), the id, the cache searched
    and whether offline mode is on, or the `required` file the snapshot lacks.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as error:
        mode = "offline mode (HF_HUB_OFFLINE) is on" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        at = "" if revision is None else f" at revision {revision!r}"
        raise FileNotFoundError(f"{what} {repo_id!r}{at} is neither a local folder nor in the HF cache at "
                                f"{constants.HF_HUB_CACHE}, and {mode}: {type(error).__name__}") from error
    if not (folder / required).is_file():
        raise FileNotFoundError(f"hub {what} {repo_id!r} at {folder} has no {required}")
    return folder
