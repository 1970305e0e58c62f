"""The device mesh a `ParallelConfig` asks for, and the checks that the layout fits model and devices.

Three named axes: "pp" (pipeline stages, outermost), "ep" (expert shards) and "tp" (tensor
shards, innermost, so a layer's all-reduces stay among neighbouring devices). Axes are `Auto` so
GSPMD places the tensor-parallel all-reduces itself; the pipeline and expert layers take their
axes manual inside `shard_map`.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

from jpaged.config import ModelConfig, ParallelConfig

PP_AXIS, EP_AXIS, TP_AXIS = "pp", "ep", "tp"
AXES = (PP_AXIS, EP_AXIS, TP_AXIS)


def axis_sizes(parallel: ParallelConfig) -> tuple[int, int, int]:
    return parallel.pipeline_parallel_size, parallel.expert_parallel_size, parallel.tensor_parallel_size


def make_mesh(parallel: ParallelConfig) -> Mesh:
    devices = jax.devices()
    if parallel.world_size > len(devices):
        sizes = " x ".join(f"{name} {getattr(parallel, name)}" for name in (
            "pipeline_parallel_size", "expert_parallel_size", "tensor_parallel_size") if getattr(parallel, name) > 1)
        raise ValueError(f"{sizes} needs {parallel.world_size} devices; "
                         f"{len(devices)} {jax.default_backend()} device(s) exist")
    return jax.make_mesh(axis_sizes(parallel), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices[: parallel.world_size])


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
