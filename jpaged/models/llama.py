"""The Llama family as one Flax NNX model: Llama 2/3, Mistral, Qwen2 (QKV bias), Qwen3 (q/k norm),
and their mixture-of-experts kin Mixtral, Qwen2-MoE and Qwen3-MoE (the MLP is `moe.sparse_moe`).

Layer weights are stacked on a leading layer axis and the decoder runs as one `lax.scan`, so the
jitted step compiles in about the same time whatever the depth. The KV cache of all layers is
one pair of arrays carried through the scan and written in place; attention reads it through
the block tables in `AttentionMetadata`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jpaged.config import ModelConfig
from jpaged.models.moe import sparse_moe
from pallas_kernels.paged_attention import AttentionMetadata, paged_attention_layer, ragged_paged_attention


def _param(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * normed).astype(x.dtype)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE on `x [T, heads, head_dim]` at integer `positions [T]`."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked `[num_layers, ...]`, in `x @ W` layout."""

    def __init__(self, cfg: ModelConfig, dtype):
        n, h, i = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.input_norm = _param((n, h), dtype)
        self.q_proj = _param((n, h, q_dim), dtype)
        self.k_proj = _param((n, h, kv_dim), dtype)
        self.v_proj = _param((n, h, kv_dim), dtype)
        self.o_proj = _param((n, q_dim, h), dtype)
        if cfg.qkv_bias:
            self.q_bias = _param((n, q_dim), dtype)
            self.k_bias = _param((n, kv_dim), dtype)
            self.v_bias = _param((n, kv_dim), dtype)
        if cfg.qk_norm:
            self.q_norm = _param((n, cfg.head_dim), dtype)
            self.k_norm = _param((n, cfg.head_dim), dtype)
        self.post_attention_norm = _param((n, h), dtype)
        if cfg.is_moe:
            self._init_moe(cfg, dtype)
        else:
            self.gate_proj = _param((n, h, i), dtype)
            self.up_proj = _param((n, h, i), dtype)
            self.down_proj = _param((n, i, h), dtype)

    def _init_moe(self, cfg: ModelConfig, dtype):
        n, h, e, i = cfg.num_layers, cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.router = _param((n, h, e), dtype)
        self.expert_gate_proj = _param((n, e, h, i), dtype)
        self.expert_up_proj = _param((n, e, h, i), dtype)
        self.expert_down_proj = _param((n, e, i, h), dtype)
        if cfg.shared_expert_intermediate_size:
            s = cfg.shared_expert_intermediate_size
            self.shared_gate_proj = _param((n, h, s), dtype)
            self.shared_up_proj = _param((n, h, s), dtype)
            self.shared_down_proj = _param((n, s, h), dtype)
            self.shared_expert_gate = _param((n, h, 1), dtype)


def run_all_layers(decoder, hidden, positions, kv_cache, md, layer_weights):
    return decoder(hidden, positions, kv_cache, md, layer_weights)


class LlamaForCausalLM(nnx.Module):
    """The model, with its parallel layouts passed in as functions.

    `attention(q, k, v, k_cache, v_cache, layer, md, scale) -> (out, k_cache, v_cache)` is paged
    attention (sharded by head under tensor parallelism); `moe(x, layer_weights, cfg)` is the
    mixture-of-experts MLP (expert-parallel or not); `run_layers(decoder, hidden, positions,
    kv_cache, md, layer_weights) -> (hidden [N, hidden], kv_cache)` runs the decoder stack, all
    at once or as a pipeline of stages over micro-batches.
    """

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, attention=paged_attention_layer(ragged_paged_attention),
                 moe=sparse_moe, run_layers=run_all_layers):
        self.cfg = cfg
        self.attention, self.moe, self.run_layers = attention, moe, run_layers
        self.embed_tokens = _param((cfg.vocab_size, cfg.hidden_size), dtype)
        self.layers = DecoderLayers(cfg, dtype)
        self.norm = _param((cfg.hidden_size,), dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param((cfg.hidden_size, cfg.vocab_size), dtype)

    def __call__(self, token_ids, positions, kv_cache, md: AttentionMetadata):
        """Hidden states `[N, hidden]` of the new tokens (micro-batches flattened), and the
        updated `(k_cache, v_cache)`."""
        hidden = self.embed_tokens[...][token_ids]
        layer_weights = nnx.to_pure_dict(nnx.state(self.layers))
        hidden, kv_cache = self.run_layers(self.decode, hidden, positions, kv_cache, md, layer_weights)
        return rms_norm(hidden, self.norm[...], self.cfg.rms_norm_eps), kv_cache

    def decode(self, hidden, positions, kv_cache, md: AttentionMetadata, layer_weights):
        """Run `hidden [T, hidden]` through the layers stacked in `layer_weights`, whose KV cache
        is `kv_cache` (layer `i` of both is the same layer)."""
        cfg = self.cfg
        inv_freq = jnp.asarray(cfg.rope.inv_freq(cfg.head_dim))

        def layer_step(carry, weights):
            hidden, k_cache, v_cache, layer = carry
            attn_in = rms_norm(hidden, weights["input_norm"], cfg.rms_norm_eps)
            attn_out, k_cache, v_cache = self._attention(
                attn_in, weights, positions, inv_freq, k_cache, v_cache, layer, md
            )
            hidden = hidden + attn_out
            mlp_in = rms_norm(hidden, weights["post_attention_norm"], cfg.rms_norm_eps)
            if cfg.is_moe:
                hidden = hidden + self.moe(mlp_in, weights, cfg)
            else:
                gate = jax.nn.silu(mlp_in @ weights["gate_proj"])
                hidden = hidden + (gate * (mlp_in @ weights["up_proj"])) @ weights["down_proj"]
            return (hidden, k_cache, v_cache, layer + 1), None

        carry = (hidden, *kv_cache, jnp.int32(0))
        (hidden, k_cache, v_cache, _), _ = jax.lax.scan(layer_step, carry, layer_weights)
        return hidden, (k_cache, v_cache)

    def _attention(self, x, weights, positions, inv_freq, k_cache, v_cache, layer, md):
        cfg = self.cfg
        num_tokens = x.shape[0]
        q, k, v = x @ weights["q_proj"], x @ weights["k_proj"], x @ weights["v_proj"]
        if cfg.qkv_bias:
            q, k, v = q + weights["q_bias"], k + weights["k_bias"], v + weights["v_bias"]
        q = q.reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, weights["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, weights["k_norm"], cfg.rms_norm_eps)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        attended, k_cache, v_cache = self.attention(q, k, v, k_cache, v_cache, layer, md, cfg.head_dim**-0.5)
        return attended.reshape(num_tokens, -1) @ weights["o_proj"], k_cache, v_cache

    def logits(self, hidden):
        """Float32 logits `[N, vocab]` of final hidden states `[N, hidden]`."""
        if self.cfg.tie_word_embeddings:
            return (hidden @ self.embed_tokens[...].T).astype(jnp.float32)
        return (hidden @ self.lm_head[...]).astype(jnp.float32)
