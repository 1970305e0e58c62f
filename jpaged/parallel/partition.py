"""Partition rules: where each parameter, the KV cache and attention live on the device mesh.

Megatron-style on "tp": q/k/v and gate/up are split by output columns (fused, each shard's
columns are one contiguous piece: `models.llama.split_columns`), o and down by input rows
(GSPMD adds the all-reduce after them), embeddings and the LM head by vocabulary, norms and the
router replicated; expert weights are split by expert on "ep". Under a pipeline each layer
parameter has a leading stage axis, split on "pp" (each stage holds its layers). A dimension a
degree does not divide stays whole. The KV cache is split by layer on "pp" and by KV head on
"tp"; attention runs inside `shard_map`, each tensor shard on its own heads with the same block
tables.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jpaged.models.quantization import QUANTIZED_PARAMS, STORAGE_DTYPES, scheme_of
from sharding.mesh import EP_AXIS, PP_AXIS, TP_AXIS, context_mesh

# The mesh axis each dimension of a parameter is split over, counted from its last dimension
# (a pipelined layer parameter has a leading stage axis).
_SPLITS = {
    "embed_tokens": {-2: TP_AXIS},
    "lm_head": {-1: TP_AXIS},
    **{name: {-1: TP_AXIS} for name in ("qkv_proj", "q_proj", "k_proj", "v_proj", "gate_up_proj", "gate_proj",
                                        "up_proj", "shared_gate_proj", "shared_up_proj", "qkv_bias")},
    **{name: {-2: TP_AXIS} for name in ("o_proj", "down_proj", "shared_down_proj")},
    "expert_gate_proj": {-3: EP_AXIS, -1: TP_AXIS},
    "expert_up_proj": {-3: EP_AXIS, -1: TP_AXIS},
    "expert_down_proj": {-3: EP_AXIS, -2: TP_AXIS},
    "sinks": {-1: TP_AXIS},  # one per query head, with its head
    "expert_gate_bias": {-2: EP_AXIS, -1: TP_AXIS},
    "expert_up_bias": {-2: EP_AXIS, -1: TP_AXIS},
}
KV_CACHE_SPEC = P(PP_AXIS, None, None, TP_AXIS, None)  # [layers, blocks, block_size, kv_heads, head_dim]
_HEADS = P(None, TP_AXIS, None)  # [tokens, heads, head_dim]
_CACHE_HEADS = P(None, None, None, TP_AXIS, None)


def param_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh, dtype=None) -> P:
    """Where the parameter at `path` (`("embed_tokens",)`, `("layers", i, "q_proj")`, ...) of
    `shape` and `dtype` lives."""
    splits = {len(shape) + dim: axis for dim, axis in _splits(path[-1], dtype).items()}
    if path[0] == "layers" and mesh.shape[PP_AXIS] > 1:
        splits[0] = PP_AXIS
    axes = [splits.get(dim) for dim in range(len(shape))]
    return P(*[axis if axis and shape[dim] % mesh.shape[axis] == 0 else None for dim, axis in enumerate(axes)])


def _splits(name: str, dtype) -> dict[int, str]:
    """Mesh axis by dimension (from the last) of parameter `name`. A quantized projection is kept
    `[..., out, in]` (the float one `[..., in, out]`) and its scales `[..., out, groups]` split
    as it does (a split input dimension splits the groups)."""
    if name.endswith("_scale"):
        return _splits(name.removesuffix("_scale"), STORAGE_DTYPES["int8"])
    splits = _SPLITS.get(name, {})
    if dtype is not None and name in QUANTIZED_PARAMS - {"embed_tokens"} and scheme_of(dtype) is not None:
        return {{-1: -2, -2: -1}.get(dim, dim): axis for dim, axis in splits.items()}
    return splits


def shard_attention_layer(attention_layer, mesh: Mesh):
    """Run `attention_layer(q, k, v, k_cache, v_cache, layer, md, scale, window=None, softcap=None,
    sinks=None)` per shard of heads (each head's sink with its head)."""

    def sharded(q, k, v, k_cache, v_cache, layer, md, scale, window=None, softcap=None, sinks=None):
        # a quantized cache's scales [layers, blocks, block_size, kv_heads] split as its values
        cache_heads = jax.tree.map(lambda leaf: P(*_CACHE_HEADS[:leaf.ndim]), k_cache)
        def per_shard(q, k, v, k_cache, v_cache, layer, md, window, sinks):
            return attention_layer(q, k, v, k_cache, v_cache, layer, md, scale, window, softcap, sinks)

        body = jax.shard_map(
            per_shard, mesh=context_mesh(mesh),
            in_specs=(_HEADS, _HEADS, _HEADS, cache_heads, cache_heads, P(), P(), P(),
                      None if sinks is None else P(TP_AXIS)),
            out_specs=(_HEADS, cache_heads, cache_heads), axis_names={TP_AXIS}, check_vma=False,
        )
        return body(q, k, v, k_cache, v_cache, layer, md, window, sinks)

    return sharded
