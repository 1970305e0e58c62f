"""Reads an HF model folder as it ships: config, generation config, safetensors weights, tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open


def read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} not found: an HF model folder needs it")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of `folder`: one `model.safetensors`, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shard_names = sorted(set(read_json(index)["weight_map"].values()))
        shards = [folder / name for name in shard_names]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"safetensors shards named in {index} are missing: {missing}")
        return shards
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise ValueError(f"{folder} holds only pickle weights (.bin/.pt); jpaged loads safetensors only")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def load_safetensors_weights(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(name, array)` one tensor at a time, in the file's dtype (bfloat16 included)."""
    for path in safetensors_files(folder):
        yield from read_safetensors(path)


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield the `(name, array)` tensors of one safetensors file, in its dtypes (bfloat16
    included, as `ml_dtypes`' numpy type). ValueError for a file that cannot be read."""
    cpu = jax.local_devices(backend="cpu")[0]
    try:
        with safe_open(str(path), framework="flax") as f:
            for name in f.keys():
                # Scoped to the read: a context held across `yield` would set the caller's default
                # device to the CPU until the generator ends.
                with jax.default_device(cpu):
                    array = np.asarray(f.get_tensor(name))
                yield name, array
    except Exception as err:  # the Rust reader raises its own error type
        if isinstance(err, (FileNotFoundError, ValueError)):
            raise
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def tokenizer_loader(folder: Path):
    """A function that loads `folder`'s tokenizer with transformers; raises FileNotFoundError at
    once where the folder has none. A tokenizer without a chat template takes the processor's
    (`chat_template.json`, as vision-language checkpoints such as Mistral Small 3.1 ship it; vLLM
    reads it too)."""
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json or tokenizer_config.json in {folder}")

    def load():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.chat_template is None and (folder / "chat_template.json").is_file():
            tokenizer.chat_template = _processor_chat_template(folder / "chat_template.json")
        return tokenizer

    return load


def _processor_chat_template(path: Path) -> str:
    """The template of a processor's `chat_template.json` (`{"chat_template": "..."}`). ValueError
    for a file that holds none."""
    config = read_json(path)
    template = config.get("chat_template") if isinstance(config, dict) else None
    if not isinstance(template, str):
        raise ValueError(f"{path} holds no chat_template string")
    return template
