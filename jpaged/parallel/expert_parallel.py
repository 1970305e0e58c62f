"""Expert parallelism: a mixture-of-experts layer whose experts are split over the "ep" axis.

Inside a `shard_map` that makes "ep" and "tp" manual, each of the `N` expert shards holds
`E / N` experts (each split by columns over "tp") and takes `1 / N` of the step's tokens:

    tokens [T, H] ─► my share [T/N, H] ─► route (top-k) ─► pack rows by destination shard
      ─► all_to_all ─► rows for my experts ─► grouped FFN (ragged_dot, my columns)
      ─► all_to_all back ─► weight and sum each token's k rows ─► psum over "tp"
      ─► all_gather over "ep" ─► [T, H]

Each destination gets a buffer of `T/N * k` rows, the most one shard can ever send it, so no
token is dropped and results equal the single-device layer's. (`ragged_all_to_all` would send
only the rows in use, but it does not run on CPU.) With one expert shard (tensor parallelism
alone) the tokens stay where they are and only the psum remains.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jpaged.config import ModelConfig
from jpaged.models.moe import (
    combine,
    expert_ffn,
    plus_down_bias,
    route,
    routed_experts,
    router_logits,
    sort_by_expert,
    sparse_moe,
)
from sharding.mesh import EP_AXIS, TP_AXIS, context_mesh

_EXPERT_SPECS = {
    "router": P(),
    "expert_gate_proj": P(EP_AXIS, None, TP_AXIS),
    "expert_up_proj": P(EP_AXIS, None, TP_AXIS),
    "expert_down_proj": P(EP_AXIS, TP_AXIS, None),
    # gpt-oss's biases: the router's and the down projections' whole on every shard (the latter
    # weighted per token by its routing, `plus_down_bias`), gate / up with their columns
    "router_bias": P(),
    "expert_gate_bias": P(EP_AXIS, TP_AXIS),
    "expert_up_bias": P(EP_AXIS, TP_AXIS),
    "expert_down_bias": P(),
}


def expert_parallel_moe(mesh: Mesh):
    """A model's `moe(x, layer_weights, cfg)` that runs the routed experts expert-parallel."""

    def moe(x, weights, cfg: ModelConfig):
        experts = {name: weights[name] for name in _EXPERT_SPECS if name in weights}
        routed = jax.shard_map(
            partial(_routed_experts, cfg=cfg), mesh=context_mesh(mesh),
            in_specs=(P(), {name: _EXPERT_SPECS[name] for name in experts}), out_specs=P(),
            axis_names={EP_AXIS, TP_AXIS}, check_vma=False,
        )
        return sparse_moe(x, weights, cfg, routed=lambda x, _weights, _cfg: routed(x, experts))

    return moe


def _routed_experts(x, weights, cfg: ModelConfig):
    """This shard's part of the routed experts: float32 `[T, H]`, equal on every shard."""
    num_shards = jax.lax.axis_size(EP_AXIS)
    if "expert_down_bias" in weights and jax.lax.axis_size(TP_AXIS) > 1:  # added by one "tp" shard, then summed
        weights = {**weights, "expert_down_bias": jnp.where(jax.lax.axis_index(TP_AXIS) == 0,
                                                            weights["expert_down_bias"], 0)}
    out = _dispatched(x, weights, cfg, num_shards) if num_shards > 1 else routed_experts(x, weights, cfg)
    if jax.lax.axis_size(TP_AXIS) > 1:  # down_proj's rows are split over "tp": sum the partial outputs
        out = jax.lax.psum(out, TP_AXIS)
    if num_shards > 1:
        out = jax.lax.all_gather(out, EP_AXIS, tiled=True)[: x.shape[0]]
    return out


def _dispatched(x, weights, cfg: ModelConfig, num_shards: int):
    """This shard's share of the tokens through their experts, wherever those live: `[T / N, H]`."""
    num_tokens, k = x.shape[0], cfg.num_experts_per_tok
    local_experts = weights["expert_gate_proj"].shape[0]
    per_shard = -(-num_tokens // num_shards)
    padded = jnp.pad(x, ((0, per_shard * num_shards - num_tokens), (0, 0)))
    mine = jax.lax.dynamic_slice_in_dim(padded, jax.lax.axis_index(EP_AXIS) * per_shard, per_shard)
    topk_weights, topk_ids = route(router_logits(mine, weights), k, cfg.norm_topk_prob)

    # Pack each (token, slot) pair into its destination's buffer, in expert order.
    order, per_expert = sort_by_expert(topk_ids, cfg.num_experts)
    capacity = per_shard * k
    sorted_ids = topk_ids.reshape(-1)[order]
    destination = sorted_ids // local_experts
    per_destination = per_expert.reshape(num_shards, local_experts).sum(1)
    slot = jnp.arange(capacity) - (jnp.cumsum(per_destination) - per_destination)[destination]
    send = jnp.zeros((num_shards, capacity, x.shape[1]), x.dtype).at[destination, slot].set(mine[order // k])
    send_ids = jnp.full((num_shards, capacity), local_experts, jnp.int32).at[destination, slot].set(
        sorted_ids % local_experts)

    received = jax.lax.all_to_all(send, EP_AXIS, 0, 0, tiled=True).reshape(-1, x.shape[1])
    received_ids = jax.lax.all_to_all(send_ids, EP_AXIS, 0, 0, tiled=True).reshape(-1)
    local_order = jnp.argsort(received_ids, stable=True)  # padding (id = local_experts) sorts last
    group_sizes = jnp.bincount(received_ids, length=local_experts).astype(jnp.int32)
    rows = expert_ffn(received[local_order], group_sizes, weights["expert_gate_proj"], weights["expert_up_proj"],
                      weights["expert_down_proj"], weights, cfg)
    rows = jnp.zeros_like(rows).at[local_order].set(rows)
    returned = jax.lax.all_to_all(rows.reshape(num_shards, capacity, -1), EP_AXIS, 0, 0, tiled=True)
    return plus_down_bias(combine(returned[destination, slot], order, topk_weights), weights, topk_weights, topk_ids)
