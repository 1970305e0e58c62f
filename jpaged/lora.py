"""LoRA adapters on the host: what a request names (`LoRARequest`), and a PEFT adapter folder read
into per-layer low-rank factors (`LoRAAdapter`) that the model runner copies into its device
slots (`jpaged/lora_slots.py`).

A LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") adds
`scaling * x @ A.T @ B.T` to a projection's output, with `A [r, in]` and `B [out, r]` as PEFT saves
them (`adapter_config.json` + `adapter_model.safetensors`) and `scaling = lora_alpha / r`
(`lora_alpha / sqrt(r)` with rsLoRA). Several adapters serve in one batch, each token through its
own request's adapter, as vLLM's multi-LoRA serving (after Punica and S-LoRA) does.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jpaged.config import FUSED_PROJECTIONS, ModelConfig
from jpaged.loader.rope_rows import as_rotate_half
from jpaged.sampling_params import is_integer

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
_WEIGHT_NAME = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


@dataclass(frozen=True)
class LoRARequest:
    """An adapter a request runs through, as vLLM's `LoRARequest`: `lora_name` names it (the
    server's model name for it), `lora_int_id` (>= 1) identifies it within the engine, and
    `lora_path` is its PEFT folder."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not is_integer(self.lora_int_id) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        object.__setattr__(self, "lora_int_id", int(self.lora_int_id))
        if not isinstance(self.lora_path, (str, Path)):
            raise ValueError(f"lora_path must be a folder path, got {self.lora_path!r}")


def lora_modules(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The projections an adapter may target in this model, with their `(in, out)` sizes: the
    attention projections, and the MLP's of a dense model (a mixture of experts' experts take none)."""
    h, q_dim, kv_dim = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q_proj": (h, q_dim), "k_proj": (h, kv_dim), "v_proj": (h, kv_dim), "o_proj": (q_dim, h)}
    if not cfg.is_moe:
        i = cfg.intermediate_size
        shapes.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
    return shapes


def _adapter_modules(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """`lora_modules`, and the fused projections of their parts as Phi-3's checkpoints (and so
    its adapters) name them, with their `(in, out)` sizes."""
    shapes = lora_modules(cfg)
    for fused, parts in FUSED_PROJECTIONS.items():
        if all(part in shapes for part in parts):
            shapes[fused] = (shapes[parts[0]][0], sum(shapes[part][1] for part in parts))
    return shapes


@dataclass
class LoRAAdapter:
    """An adapter read for one model: per `(layer, module)`, float32 `a [in, rank]` and `b [rank,
    out]` with its scaling folded into `b`, so that the module's output gains `x @ a @ b`."""

    request: LoRARequest
    rank: int
    factors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]

    @property
    def lora_int_id(self) -> int:
        return self.request.lora_int_id


def load_lora_adapter(request: LoRARequest, cfg: ModelConfig, max_rank: int) -> LoRAAdapter:
    """Read `request.lora_path` (a PEFT LoRA folder) for a model of `cfg`. ValueError naming the
    folder and what is wrong: missing files, a rank above `max_rank`, a setting jpaged does not
    apply (DoRA, biases, per-module rank or alpha patterns, `modules_to_save`), or a weight for a
    module or layer the model lacks, or of the wrong shape."""
    from jpaged.loader.hf import read_safetensors  # jax reads bfloat16 files

    folder = Path(request.lora_path)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"LoRA adapter {request.lora_name!r}: no {path.name} in {folder} (a PEFT LoRA folder, as "
                             "`save_pretrained` writes it, holds adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"LoRA adapter {request.lora_name!r}: {config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {request.lora_name!r}: {config_path} must hold a JSON object, got "
                         f"{type(config).__name__}")
    rank, scaling = _rank_and_scaling(config, request, max_rank)
    try:
        tensors = dict(read_safetensors(weights_path))
    except ValueError as err:
        raise ValueError(f"LoRA adapter {request.lora_name!r}: {err}") from err
    return LoRAAdapter(request, rank, _factors(tensors, cfg, rank, scaling, request))


def _rank_and_scaling(config: dict, request: LoRARequest, max_rank: int) -> tuple[int, float]:
    where = f"LoRA adapter {request.lora_name!r} ({request.lora_path})"
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out layouts", "modules_to_save": "modules_to_save",
                   "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
                   "lora_bias": "LoRA biases", "layer_replication": "layer_replication"}
    for key, what in unsupported.items():
        if config.get(key):
            raise ValueError(f"{where}: {what} ({key}={config[key]!r}) are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: r must be an int >= 1, got {rank!r}")
    if rank > max_rank:
        raise ValueError(f"{where}: rank {rank} is more than max_lora_rank {max_rank}; start the engine with "
                         f"max_lora_rank >= {rank}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _factors(tensors: dict[str, np.ndarray], cfg: ModelConfig, rank: int, scaling: float, request: LoRARequest
             ) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    where = f"LoRA adapter {request.lora_name!r} ({request.lora_path})"
    shapes = _adapter_modules(cfg)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, tensor in tensors.items():
        match = _WEIGHT_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{where}: weight {name!r} is not a LoRA factor of a decoder layer's projection "
                             f"({', '.join(shapes)})")
        layer, module, which = int(match[1]), match[2], match[3]
        if module not in shapes:
            raise ValueError(f"{where}: weight {name!r} targets {module}, which this model's adapters cannot "
                             f"(they may target {', '.join(shapes)})")
        if layer >= cfg.num_layers:
            raise ValueError(f"{where}: weight {name!r} is for layer {layer}, but the model has {cfg.num_layers}")
        found.setdefault((layer, module), {})[which] = tensor
    factors = {}
    for (layer, module), pair in sorted(found.items()):
        d_in, d_out = shapes[module]
        expected = {"A": (rank, d_in), "B": (d_out, rank)}
        for which, shape in expected.items():
            got = pair.get(which)
            if got is None or got.shape != shape:
                raise ValueError(f"{where}: layer {layer} {module} lora_{which} has shape "
                                 f"{None if got is None else got.shape}, expected {shape}")
        a = np.ascontiguousarray(pair["A"].astype(np.float32).T)
        b = pair["B"].astype(np.float32).T * np.float32(scaling)
        parts = FUSED_PROJECTIONS.get(module, (module,))  # a fused projection's: one A, B's rows split
        bounds = np.cumsum([shapes[part][1] for part in parts])[:-1]
        for part, b_part in zip(parts, np.split(b, bounds, axis=1)):
            b_part = as_rotate_half(b_part.T, part, cfg).T  # rows as the model's (`loader/rope_rows.py`)
            if (layer, part) in factors:
                raise ValueError(f"{where}: layer {layer} {part} is targeted twice (as {part} and within {module})")
            factors[layer, part] = (a, np.ascontiguousarray(b_part))
    if not factors:
        raise ValueError(f"{where}: adapter_model.safetensors holds no LoRA weights")
    return factors
