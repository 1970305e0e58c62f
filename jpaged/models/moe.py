"""Mixture-of-experts feed-forward: the MLP of Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss decoder layers.

Place in the data flow: inside the jitted step, each of `LlamaForCausalLM`'s layers calls
`sparse_moe` on the post-attention-normed hidden states `[T, hidden]` of all the step's tokens
(instead of the dense SiLU-gated MLP) and adds the result to the residual stream.

    x [T, hidden] ─► router ─► route: softmax, top-k ─► (weights [T, k], expert ids [T, k])
                  ─► sort the T*k (token, expert) pairs by expert ─► gather rows [T*k, hidden]
                  ─► expert_ffn: one ragged matmul per projection over the expert groups
                  ─► weight each row, sum each token's k rows ─► [T, hidden] (+ shared expert)

gpt-oss adds a bias to the router's logits and to each expert's projections, and its experts'
SwiGLU clamps its inputs (`ModelConfig.swiglu_limit`); the down projection's bias is weighted and
summed per token by its routing weights (`plus_down_bias`), outside the grouped matmuls, so that a
down projection split over devices still adds it once.

No token is dropped (no capacity factor), so the result is exactly HF's. `route` and
`expert_ffn` are pure and standalone so that an expert-parallel layer can route locally, exchange
rows between devices, and run `expert_ffn` on its own experts' groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpaged.config import ModelConfig


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """Top-k routing as HF's Mixtral / Qwen MoE routers: softmax over all experts (float32), top-k,
    optionally renormalised to sum to 1. Returns `(weights [T, k] float32, expert ids [T, k] int32)`."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def expert_ffn(x_sorted: jax.Array, group_sizes: jax.Array, gate: jax.Array, up: jax.Array,
               down: jax.Array, weights: dict | None = None, cfg: ModelConfig | None = None) -> jax.Array:
    """Gated FFN of rows grouped by expert: rows `[0, group_sizes[0])` go through expert 0 of
    `gate`/`up` `[E, hidden, I]` and `down` `[E, I, hidden]`, the next `group_sizes[1]` through
    expert 1, and so on. Returns `[N, hidden]` in `x_sorted`'s dtype (float32 accumulation); rows
    past `sum(group_sizes)` (padding) come back as zeros, whatever they held. SiLU-gated, or with
    `cfg.swiglu_limit` gpt-oss's clamped SwiGLU with the gate / up biases `weights["expert_gate_bias"]`,
    `["expert_up_bias"]` `[E, I]` (the down bias is `plus_down_bias`'s)."""
    def grouped(lhs, rhs):
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)

    g, u = grouped(x_sorted, gate), grouped(x_sorted, up)
    if cfg is not None and cfg.moe_bias:
        row_expert = jnp.repeat(jnp.arange(gate.shape[0]), group_sizes, total_repeat_length=x_sorted.shape[0])
        g = g + weights["expert_gate_bias"][row_expert].astype(jnp.float32)
        u = u + weights["expert_up_bias"][row_expert].astype(jnp.float32)
    hidden = gated(g, u, cfg).astype(x_sorted.dtype)
    out = grouped(hidden, down)
    valid = jnp.arange(x_sorted.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], out, 0.0).astype(x_sorted.dtype)


def gated(gate: jax.Array, up: jax.Array, cfg: ModelConfig | None) -> jax.Array:
    """The experts' gated activation: `silu(gate) * up`, or with `cfg.swiglu_limit` gpt-oss's
    `(clip(up, -l, l) + 1) * g * sigmoid(alpha * g)` with `g = min(gate, l)`."""
    if cfg is None or cfg.swiglu_limit is None:
        return jax.nn.silu(gate) * up
    limit = cfg.swiglu_limit
    gate = jnp.minimum(gate, limit)
    return (jnp.clip(up, -limit, limit) + 1.0) * gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha)


def plus_down_bias(out: jax.Array, weights: dict, topk_weights: jax.Array, topk_ids: jax.Array) -> jax.Array:
    """`out` (float32 `[T, hidden]`) plus each token's routing-weighted sum of its experts'
    down-projection biases, where the experts have them (gpt-oss)."""
    bias = weights.get("expert_down_bias")
    if bias is None:
        return out
    return out + jnp.einsum("tk,tkh->th", topk_weights, bias[topk_ids].astype(jnp.float32))


def router_logits(x: jax.Array, weights: dict) -> jax.Array:
    """`x @ router` (plus gpt-oss's router bias)."""
    logits = x @ weights["router"]
    return logits + weights["router_bias"] if "router_bias" in weights else logits


def dense_ffn(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """SiLU-gated FFN `(silu(x @ gate) * (x @ up)) @ down` in `x`'s dtype."""
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def sort_by_expert(expert_ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """`order` that groups the flattened (token, slot) pairs of `expert_ids [T, k]` by expert
    (stable: token order within a group), and each expert's `group_sizes [num_experts]` int32."""
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def combine(rows_sorted: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """Each token's routing-weighted sum of its k expert outputs, float32 `[T, hidden]`.

    `rows_sorted[i]` is the output of pair `order[i]` (pair `p` = token `p // k`, slot `p % k`).
    Un-permuting with the inverse order and summing over k is the scatter-add, but deterministic.
    """
    num_tokens, k = weights.shape
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    rows = rows_sorted[inverse].reshape(num_tokens, k, -1).astype(jnp.float32)
    return jnp.einsum("tkh,tk->th", rows, weights)


def routed_experts(x: jax.Array, weights: dict, cfg: ModelConfig) -> jax.Array:
    """Every token's routing-weighted sum over its top-k experts, float32 `[T, hidden]`."""
    k = cfg.num_experts_per_tok
    topk_weights, topk_ids = route(router_logits(x, weights), k, cfg.norm_topk_prob)
    order, group_sizes = sort_by_expert(topk_ids, cfg.num_experts)
    rows = expert_ffn(x[order // k], group_sizes, weights["expert_gate_proj"], weights["expert_up_proj"],
                      weights["expert_down_proj"], weights, cfg)
    return plus_down_bias(combine(rows, order, topk_weights), weights, topk_weights, topk_ids)


def sparse_moe(x: jax.Array, weights: dict, cfg: ModelConfig, routed=routed_experts) -> jax.Array:
    """The MoE block of one layer on `x [T, hidden]`, with this layer's params `weights` (`router`,
    `expert_gate_proj`, `expert_up_proj`, `expert_down_proj`, and Qwen2-MoE's `shared_*`);
    returns `[T, hidden]` in `x`'s dtype. `routed` computes the routed experts' part (here, or
    expert-parallel across devices)."""
    out = routed(x, weights, cfg)
    if cfg.shared_expert_intermediate_size:
        shared = dense_ffn(x, weights["shared_gate_proj"], weights["shared_up_proj"], weights["shared_down_proj"])
        gate = jax.nn.sigmoid((x @ weights["shared_expert_gate"]).astype(jnp.float32))
        out = out + gate * shared.astype(jnp.float32)
    return out.astype(x.dtype)
