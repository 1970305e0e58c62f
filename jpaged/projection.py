"""The linear layers an embedding model's sentence-transformers files put after pooling (its
`Dense` modules: EmbeddingGemma's 768 -> 3072 -> 768), and the output activations that heads and
those layers apply.

`pooling.read_pooler_config` finds the modules in `modules.json`; `read_dense` reads one module's
folder (its `config.json` and `model.safetensors`); the engine applies the layers, in order, to
each pooled state on the host (`pooling.pooled_output`), before any cut to `dimensions` and the
normalisation, as sentence-transformers' `Dense` computes them. Plain numpy: no jax.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# torch.nn modules by the names sentence-transformers saves, and what jpaged calls them
ACTIVATION_MODULES = {"torch.nn.modules.linear.Identity": "identity", "torch.nn.modules.activation.Sigmoid": "sigmoid",
                      "torch.nn.modules.activation.Softmax": "softmax", "torch.nn.modules.activation.Tanh": "tanh"}
_DENSE_ACTIVATIONS = ("identity", "sigmoid", "tanh")  # elementwise: what a Dense layer may apply


def read_json(path: Path) -> dict | list:
    """The JSON document in `path`; ValueError naming the file where it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def activate(name: str, values: np.ndarray) -> np.ndarray:
    """float32 `values` (any shape; softmax over the last axis) through the activation `name`
    ("identity", "sigmoid", "softmax" or "tanh")."""
    if name == "sigmoid":
        values = 1 / (1 + np.exp(-values))
    elif name == "softmax":
        shifted = np.exp(values - values.max(axis=-1, keepdims=True))
        values = shifted / shifted.sum(axis=-1, keepdims=True)
    elif name == "tanh":
        values = np.tanh(values)
    return np.asarray(values, np.float32)


@dataclass(frozen=True, eq=False)
class Dense:
    """A sentence-transformers `Dense` module: `activation(x @ weight.T + bias)`, plus `x` where
    `residual` (`use_residual` with as many outputs as inputs). `weight` float64 [out, in],
    `bias` float64 [out] or None: kept in the precision the product runs in, so that no request
    converts them again."""

    weight: np.ndarray
    bias: np.ndarray | None
    activation: str  # "identity", "sigmoid" or "tanh"
    residual: bool = False

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 [out] of `x` [in] (or [rows, out] of [rows, in])."""
        x = np.asarray(x, np.float32)
        out = x.astype(np.float64) @ self.weight.T
        if self.bias is not None:
            out = out + self.bias
        out = activate(self.activation, out)
        return out + x if self.residual else out


def read_dense(folder: Path) -> Dense:
    """The `Dense` module saved in `folder` (`config.json`: in_features, out_features, bias,
    activation_function; `model.safetensors`: `linear.weight` [out, in], `linear.bias`).
    ValueError naming the file and setting jpaged cannot apply: another activation than Identity,
    Sigmoid or Tanh, a residual through a projection, another input than the sentence embedding,
    weights only as a PyTorch pickle, or tensors whose shapes disagree with the config."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"a Dense module's settings are missing: {config_file}")
    config = read_json(config_file)
    name = config.get("activation_function", "torch.nn.modules.activation.Tanh")  # sentence-transformers' default
    activation = ACTIVATION_MODULES.get(name)
    if activation not in _DENSE_ACTIVATIONS:
        raise ValueError(f"{config_file} names the activation {name!r}; jpaged applies Identity, Sigmoid or Tanh "
                         "after a Dense layer")
    if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise ValueError(f"{config_file}: a Dense layer over {config['module_input_name']!r} is not supported "
                         "(jpaged applies Dense layers to the sentence embedding)")
    in_features, out_features = int(config["in_features"]), int(config["out_features"])
    residual = bool(config.get("use_residual", False))
    if residual and in_features != out_features:
        raise ValueError(f"{config_file}: use_residual with {in_features} inputs and {out_features} outputs adds "
                         "a projection of the input, which jpaged does not apply")
    weights_file = folder / "model.safetensors"
    if not weights_file.is_file():
        raise ValueError(f"{folder} holds no model.safetensors (jpaged reads a Dense layer's weights from "
                         "safetensors, not PyTorch pickles)")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(weights_file)
    except SafetensorError as err:
        raise ValueError(f"{weights_file} cannot be read: {err}") from err
    weight, bias = tensors.get("linear.weight"), tensors.get("linear.bias")
    if weight is None:
        raise ValueError(f"{weights_file} holds no linear.weight (it holds {', '.join(sorted(tensors)) or 'nothing'})")
    if weight.shape != (out_features, in_features):
        raise ValueError(f"{weights_file}: linear.weight must have shape {(out_features, in_features)} "
                         f"(out_features, in_features), got {weight.shape}")
    if config.get("bias", True) != (bias is not None):
        raise ValueError(f"{weights_file}: linear.bias must be {'present' if config.get('bias', True) else 'absent'}, "
                         "as config.json's bias says")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"{weights_file}: linear.bias must have shape ({out_features},), got {bias.shape}")
    return Dense(weight.astype(np.float32).astype(np.float64),
                 None if bias is None else bias.astype(np.float32).astype(np.float64), activation, residual)
