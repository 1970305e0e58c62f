"""The device mesh for tensor parallelism, and the checks that a layout fits model and devices.

One named axis, "tp", spans the devices that split each layer's heads and MLP columns. Axes are
`Auto` so GSPMD places the row-parallel all-reduces itself.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

from jpaged.config import ModelConfig

TP_AXIS = "tp"


def make_mesh(tensor_parallel_size: int) -> Mesh:
    devices = jax.devices()
    if not 1 <= tensor_parallel_size <= len(devices):
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} needs that many devices; "
                         f"{len(devices)} {jax.default_backend()} device(s) exist")
    return jax.make_mesh((tensor_parallel_size,), (TP_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices[:tensor_parallel_size])


def check_tensor_parallel(cfg: ModelConfig, tensor_parallel_size: int) -> None:
    """Raise ValueError naming the first model size the degree does not divide."""
    tp = tensor_parallel_size
    if cfg.num_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the {cfg.num_heads} attention heads")
    if cfg.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide intermediate_size {cfg.intermediate_size}")
    kv_heads = cfg.num_kv_heads
    if (kv_heads % tp) if kv_heads >= tp else (tp % kv_heads):
        raise ValueError(f"tensor_parallel_size {tp} and the {kv_heads} KV heads must divide one another")


def kv_heads_per_model(cfg: ModelConfig, tensor_parallel_size: int) -> int:
    """KV heads the sharded model keeps: each is replicated until every shard holds one."""
    return max(cfg.num_kv_heads, tensor_parallel_size)
