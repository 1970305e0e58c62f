"""The device mesh a `ParallelConfig` asks for, and the checks that the layout fits model and devices.

Four named axes: "dp" (data-parallel replicas, outermost), "pp" (pipeline stages), "ep" (expert
shards) and "tp" (tensor shards, innermost, so a layer's all-reduces stay among neighbouring
devices). Each replica's engine runs on its slice of the mesh, the three inner axes. Axes are
`Auto` so GSPMD places the tensor-parallel all-reduces itself; the pipeline and expert layers
take their axes manual inside `shard_map`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jpaged.config import ModelConfig, ParallelConfig

DP_AXIS, PP_AXIS, EP_AXIS, TP_AXIS = "dp", "pp", "ep", "tp"
AXES = (DP_AXIS, PP_AXIS, EP_AXIS, TP_AXIS)
_SIZE_NAMES = ("data_parallel_size", "pipeline_parallel_size", "expert_parallel_size", "tensor_parallel_size")


def make_mesh(parallel: ParallelConfig) -> Mesh:
    """The whole layout as one mesh over the first `world_size` devices."""
    devices = jax.devices()
    sizes = tuple(getattr(parallel, name) for name in _SIZE_NAMES)
    if parallel.world_size > len(devices):
        asked = " x ".join(f"{name} {size}" for name, size in zip(_SIZE_NAMES, sizes) if size > 1)
        raise ValueError(f"{asked} needs {parallel.world_size} devices; "
                         f"{len(devices)} {jax.default_backend()} device(s) exist")
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices[: parallel.world_size])


def replica_meshes(parallel: ParallelConfig) -> list[Mesh | None]:
    """Each data-parallel replica's slice of the mesh ("pp", "ep", "tp"); `[None]` for a lone device."""
    if parallel.world_size == 1:
        return [None]
    mesh = make_mesh(parallel)
    inner = AXES[1:]
    return [Mesh(np.asarray(devices), inner, axis_types=(AxisType.Auto,) * len(inner)) for devices in mesh.devices]


def check_layout(cfg: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise ValueError naming the first model size a parallel degree does not divide."""
    tp, pp, ep = parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.expert_parallel_size
    if cfg.num_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the {cfg.num_heads} attention heads")
    ffn_name, ffn_size = ("moe_intermediate_size", cfg.moe_intermediate_size) if cfg.is_moe else (
        "intermediate_size", cfg.intermediate_size)
    if ffn_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide {ffn_name} {ffn_size}")
    kv_heads = cfg.num_kv_heads
    if (kv_heads % tp) if kv_heads >= tp else (tp % kv_heads):
        raise ValueError(f"tensor_parallel_size {tp} and the {kv_heads} KV heads must divide one another")
    if cfg.num_layers % pp:
        raise ValueError(f"pipeline_parallel_size {pp} does not divide the {cfg.num_layers} layers")
    if ep > 1 and not cfg.is_moe:
        raise ValueError(f"expert_parallel_size {ep} needs a mixture-of-experts model; "
                         f"{cfg.architecture} is dense")
    if cfg.is_moe and cfg.num_experts % ep:
        raise ValueError(f"expert_parallel_size {ep} does not divide the {cfg.num_experts} experts")


def kv_heads_per_model(cfg: ModelConfig, tensor_parallel_size: int) -> int:
    """KV heads the sharded model keeps: each is replicated until every shard holds one."""
    return max(cfg.num_kv_heads, tensor_parallel_size)
