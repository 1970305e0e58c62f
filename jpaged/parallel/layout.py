"""Whether a parallel layout fits a model: each degree must divide what it splits.

The engine checks this before it builds a mesh (`sharding/mesh.py`) or loads a weight; the
model runner asks how many KV heads the sharded model keeps.
"""

from __future__ import annotations

from jpaged.config import ModelConfig, ParallelConfig


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
