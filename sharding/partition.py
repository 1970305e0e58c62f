"""Partition rules: where each parameter, the KV cache and attention live on the "tp" axis.

Megatron-style: q/k/v and gate/up are split by output columns, o and down by input rows (GSPMD
adds the all-reduce after them), embeddings and the LM head by vocabulary, norms replicated.
A dimension the degree does not divide stays whole. The KV cache is split by KV head, and
attention runs inside `shard_map`, each shard on its own heads with the same block tables.
"""

from __future__ import annotations

from functools import partial

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding.mesh import TP_AXIS

# Which axis of each parameter (stacked layer params have the layer axis first) is split.
_SPLIT_AXIS = {
    ("embed_tokens",): 0,
    ("lm_head",): 1,
    ("layers", "q_proj"): 2, ("layers", "k_proj"): 2, ("layers", "v_proj"): 2,
    ("layers", "q_bias"): 1, ("layers", "k_bias"): 1, ("layers", "v_bias"): 1,
    ("layers", "gate_proj"): 2, ("layers", "up_proj"): 2,
    ("layers", "o_proj"): 1, ("layers", "down_proj"): 1,
}
KV_CACHE_SPEC = P(None, None, None, TP_AXIS, None)  # [layers, blocks, block_size, kv_heads, head_dim]
_HEADS = P(None, TP_AXIS, None)  # [tokens, heads, head_dim]


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], tensor_parallel_size: int) -> P:
    axis = _SPLIT_AXIS.get(path)
    if axis is None or shape[axis] % tensor_parallel_size:
        return P()
    return P(*[TP_AXIS if i == axis else None for i in range(len(shape))])


def shard_attention_layer(attention_layer, mesh: Mesh):
    """Run `attention_layer(q, k, v, k_cache, v_cache, layer, md, scale)` per shard of heads."""

    def sharded(q, k, v, k_cache, v_cache, layer, md, scale):
        body = jax.shard_map(
            partial(attention_layer, scale=scale), mesh=mesh,
            in_specs=(_HEADS, _HEADS, _HEADS, KV_CACHE_SPEC, KV_CACHE_SPEC, P(), P()),
            out_specs=(_HEADS, KV_CACHE_SPEC, KV_CACHE_SPEC), check_vma=False,
        )
        return body(q, k, v, k_cache, v_cache, layer, md)

    return sharded
