"""The Llama family as one Flax NNX model: Llama 2/3, Mistral, Qwen2 (QKV bias), Qwen3 (q/k norm),
Gemma (GELU, (1 + w) norms, scaled embeddings), Gemma 2 and 3 (also norms around attention and
the MLP, local and global layers, soft-capped scores), Phi-3 (partial rotary, LongRoPE), Granite
(residual and logit multipliers), OLMo 2 and 3 (norms only after attention and the MLP, q / k norms
over all heads), SmolLM3 (layers without RoPE),
and the mixture-of-experts kin Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss (attention sinks, biases,
clamped SwiGLU experts; the MLP is `moe.sparse_moe`).

Each decoder layer keeps its own weight arrays. The decoder is one `lax.scan` over the layer
index whose body picks the layer's projections with `lax.switch` (one branch per layer, each
reading its weights in place) and runs attention once, outside the switch. A scan over weights
stacked on a layer axis made XLA on CPU copy each layer's slices before its matmuls; a Python
loop over the layers (the whole layer, attention included, compiled once per layer) made the
step compile 4-8 times slower. The KV cache of all layers is one pair of arrays `[num_layers,
num_blocks, block_size, kv_heads, head_dim]` carried through the scan and written in place;
attention reads layer `i` of it through the block tables in `AttentionMetadata`.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpaged.config import FUSED_PROJECTIONS, ModelConfig
from jpaged.models.moe import sparse_moe
from jpaged.models.quantization import QUANTIZED_PARAMS, STORAGE_DTYPES, scale_name
from pallas_kernels.paged_attention import AttentionMetadata, paged_attention_layer, ragged_paged_attention
from pallas_kernels.quantized_matmul import (
    block_format,
    block_matmul,
    dequantize,
    dequantize_blocks,
    num_groups,
    quantized_matmul,
    row_bytes,
)


def _param(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


def rms_norm(x, weight, eps, offset: float = 0.0):
    """RMSNorm of `x [..., d]` scaled by `offset + weight [d]` (Gemma's norms store weight - 1),
    computed in float32 and returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = weight.astype(jnp.float32)
    return ((scale + offset if offset else scale) * normed).astype(x.dtype)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": partial(jax.nn.gelu, approximate=True)}


def float_matmul(x, w, transposed: bool = False):
    """`x @ w`, or `x @ w.T` with `transposed`: the model's default `float_linear`."""
    return x @ (w.T if transposed else w)


def rope_angles(positions, inv_freq, attention_factor: float = 1.0, position_rows=None):
    """`(cos, sin)`, each float32 `[T, 1, rotary_dim]`, of rotate-half RoPE at integer `positions
    [T]` with `inv_freq [rotary_dim // 2]`, times `attention_factor` (YaRN's, LongRoPE's): computed once
    per step and shared by every layer's q and k. Multimodal RoPE (Qwen2-VL, Wang et al. 2024):
    `positions [T, 3]` (time, height, width), each frequency turned by the one of them that
    `position_rows [rotary_dim // 2]` names."""
    if positions.ndim == 2:
        angles = positions[:, np.asarray(position_rows)].astype(jnp.float32) * inv_freq[None, :]
    else:
        angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, None, :]
    if attention_factor != 1.0:
        return cos * attention_factor, sin * attention_factor
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on the first `rotary_dim` dims of each head of `x [T, heads, head_dim]`
    (all of them, or a leading share: partial rotary), with the angles of `rope_angles`; the
    other dims pass unchanged."""
    rotary_dim = cos.shape[-1]
    x32 = x.astype(jnp.float32)
    x_rot, x_pass = x32[..., :rotary_dim], x32[..., rotary_dim:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = x_rot * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    if x_pass.shape[-1]:
        rotated = jnp.concatenate([rotated, x_pass], axis=-1)
    return rotated.astype(x.dtype)


def rope_of(rope, positions, rotary_dim: int):
    """`rope_angles` of a `RopeConfig` at `positions` (`[T]`, or `[T, 3]` multimodal positions)."""
    rows = rope.position_rows(rotary_dim) if positions.ndim == 2 else None
    return rope_angles(positions, jnp.asarray(rope.inv_freq(rotary_dim)), rope.attention_factor, rows)




def fused_formats(formats: dict[str, str]) -> dict[str, str]:
    """A layer's GGML formats (param name: block type) with the fused projections' entries: a
    fused projection is kept packed when its parts are all of one block type; parts of several
    types (a K-quant mix) stay separate (no entry under the fused name)."""
    out = dict(formats)
    for fused, parts in FUSED_PROJECTIONS.items():
        kinds = {formats.get(part) for part in parts}
        if len(kinds) == 1 and None not in kinds:
            out[fused] = kinds.pop()
    return out


def can_fuse(formats: dict[str, str], fused: str) -> bool:
    """Whether the parts of `fused` are kept alike: all unpacked, or all packed as one block type."""
    return fused in formats or not any(part in formats for part in FUSED_PROJECTIONS[fused])


def split_columns(y, sizes: tuple[int, ...], shards: int):
    """Split `y [..., sum(sizes)]`, a fused projection's output, into `[..., size]` parts.

    The fused weight's columns are shard-major (`loader.weights.fuse_rows`): for each of `shards`
    tensor-parallel shards in turn, its slice of every part. Each shard's columns are then one
    contiguous piece of the fused weight, split over the mesh like any column-parallel weight,
    and the split below stays local to each shard."""
    lead = y.shape[:-1]
    pieces = y.reshape(*lead, shards, -1)
    bounds = [sum(sizes[:i + 1]) // shards for i in range(len(sizes) - 1)]
    return [piece.reshape(*lead, size) for piece, size in zip(jnp.split(pieces, bounds, axis=-1), sizes)]


class DecoderLayer(nnx.Module):
    """One decoder layer's weights in `x @ W` layout (`qkv_proj [hidden, (heads + 2 kv_heads) *
    head_dim]`, ..., MoE experts `[experts, hidden, moe_intermediate]`), each with the leading axes
    `lead`. q / k / v and gate / up are each one fused projection (columns shard-major, see
    `split_columns`), except GGUF parts kept packed in different block types; q / k / v biases are
    always one `qkv_bias`.

    With `quantization` ("int8" | "fp8"), the projections of `QUANTIZED_PARAMS` are kept instead
    as quantized values in the checkpoint's `[..., out, in]` layout with float32 scales
    `<name>_scale [..., out, groups]` (`jpaged/models/quantization.py`). A parameter named in `formats`
    (name: GGML block type) is kept as the GGUF file's uint8 block rows `[out, row bytes]`."""

    def __init__(self, cfg: ModelConfig, dtype, lead: tuple[int, ...] = (), quantization: str | None = None,
                 formats: dict[str, str] | None = None):
        h, i = cfg.hidden_size, cfg.intermediate_size
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        formats = fused_formats(formats or {})

        def param(*shape, name=None):
            if name in formats:
                return _packed_param(shape[-2], shape[-1], formats[name])
            if quantization is None or name not in QUANTIZED_PARAMS:
                return _param(lead + shape, dtype)
            *experts, k, n = shape
            setattr(self, scale_name(name), _param(lead + (*experts, n, num_groups(k)), jnp.float32))
            return _param(lead + (*experts, n, k), STORAGE_DTYPES[quantization])

        if cfg.norm_layout != "post":
            self.input_norm = param(h)
        if can_fuse(formats, "qkv_proj"):
            self.qkv_proj = param(h, q_dim + 2 * kv_dim, name="qkv_proj")
        else:
            self.q_proj = param(h, q_dim, name="q_proj")
            self.k_proj = param(h, kv_dim, name="k_proj")
            self.v_proj = param(h, kv_dim, name="v_proj")
        self.o_proj = param(q_dim, h, name="o_proj")
        if cfg.qkv_bias:
            self.qkv_bias = param(q_dim + 2 * kv_dim)
        if cfg.o_bias:
            self.o_bias = param(h)
        if cfg.attention_sinks:
            self.sinks = _param(lead + (cfg.num_heads,), jnp.float32)
        if cfg.qk_norm:
            self.q_norm = param(q_dim if cfg.qk_norm_over_heads else cfg.head_dim)
            self.k_norm = param(kv_dim if cfg.qk_norm_over_heads else cfg.head_dim)
        self.post_attention_norm = param(h)
        if cfg.norm_layout == "sandwich":
            self.pre_mlp_norm = param(h)
        if cfg.norm_layout != "pre":
            self.post_mlp_norm = param(h)
        if cfg.is_moe:
            self._init_moe(cfg, param)
        elif can_fuse(formats, "gate_up_proj"):
            self.gate_up_proj = param(h, 2 * i, name="gate_up_proj")
            self.down_proj = param(i, h, name="down_proj")
        else:
            self.gate_proj = param(h, i, name="gate_proj")
            self.up_proj = param(h, i, name="up_proj")
            self.down_proj = param(i, h, name="down_proj")

    def _init_moe(self, cfg: ModelConfig, param):
        h, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.router = param(h, e)
        self.expert_gate_proj = param(e, h, i, name="expert_gate_proj")
        self.expert_up_proj = param(e, h, i, name="expert_up_proj")
        self.expert_down_proj = param(e, i, h, name="expert_down_proj")
        if cfg.moe_bias:
            self.router_bias = param(e)
            self.expert_gate_bias = param(e, i)
            self.expert_up_bias = param(e, i)
            self.expert_down_bias = param(e, h)
        if cfg.shared_expert_intermediate_size:
            s = cfg.shared_expert_intermediate_size
            self.shared_gate_proj = param(h, s, name="shared_gate_proj")
            self.shared_up_proj = param(h, s, name="shared_up_proj")
            self.shared_down_proj = param(s, h, name="shared_down_proj")
            self.shared_expert_gate = param(h, 1)


def _packed_param(k: int, n: int, kind: str) -> nnx.Param:
    """GGML block rows of a `[k, n]` (`x @ W` layout) weight: uint8 `[n, row bytes]`."""
    return _param((n, row_bytes(kind, k)), jnp.uint8)


def _layer_formats(formats: dict[str, str], layer: int) -> dict[str, str]:
    prefix = f"layers.{layer}."
    return {key.removeprefix(prefix): kind for key, kind in formats.items() if key.startswith(prefix)}


def run_all_layers(decoder, hidden, positions, kv_cache, md, layer_weights):
    return decoder(hidden, positions, kv_cache, md, layer_weights)


class LlamaForCausalLM(nnx.Module):
    """The model, with its parallel layouts passed in as functions.

    `attention(q, k, v, k_cache, v_cache, layer, md, scale, window=None, softcap=None, sinks=None)
    -> (out, k_cache, v_cache)` is paged attention (sharded by head under tensor parallelism;
    `window` the layer's sliding window, an int32 scalar, where the model has any; `softcap` the
    scores' cap; `sinks` the layer's attention sinks, float32 `[heads]`, where the model has them); `quantized_linear(x, w, scale)` and
    `block_linear(x, w, kind)` multiply by a quantized projection or GGML block rows (which
    weights are kept so: `quantization`, `weight_formats`, see `DecoderLayer`); `moe(x,
    layer_weights, cfg)` is the mixture-of-experts MLP (expert-parallel or not); `run_layers(decoder, hidden, positions,
    kv_cache, md, layer_weights) -> (hidden [N, hidden], kv_cache)` runs the decoder stack, all
    at once or as a pipeline of stages over micro-batches.

    `float_linear(x, w, transposed=False)` multiplies by a float projection (`x @ w`, or `x @ w.T`
    for the tied LM head; the CPU kernel for few rows).
    `tensor_parallel_size` is the number of column shards the fused projections are laid out
    for (`split_columns`); the model's math is the same whatever the mesh.

    With `pipeline_stages` S > 1, each stage runs `num_layers / S` consecutive layers, and
    `layers[j]` holds layer `j` of every stage, its weights stacked `[S, ...]` so that stage `s`'s
    devices keep entry `s`; model layer `i` is stage `i // (num_layers / S)`'s layer
    `i % (num_layers / S)`.
    """

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, attention=paged_attention_layer(ragged_paged_attention),
                 moe=sparse_moe, run_layers=run_all_layers, pipeline_stages: int = 1, quantization: str | None = None,
                 quantized_linear=quantized_matmul, weight_formats: dict[str, str] | None = None,
                 block_linear=block_matmul, tensor_parallel_size: int = 1, float_linear=float_matmul):
        self.cfg = cfg
        self.tensor_parallel_size = tensor_parallel_size
        self.attention, self.moe, self.run_layers = attention, moe, run_layers
        self.quantized_linear, self.block_linear, self.float_linear = quantized_linear, block_linear, float_linear
        formats = weight_formats or {}
        self.block_kinds = tuple(sorted(set(formats.values())))  # one per row size (gguf_packed)
        if "embed_tokens" in formats:
            self.embed_tokens = _packed_param(cfg.hidden_size, cfg.vocab_size, formats["embed_tokens"])
        else:
            self.embed_tokens = _param((cfg.vocab_size, cfg.hidden_size), STORAGE_DTYPES.get(quantization, dtype))
        if quantization:
            self.embed_tokens_scale = _param((cfg.vocab_size, num_groups(cfg.hidden_size)), jnp.float32)
        lead = (pipeline_stages,) if pipeline_stages > 1 else ()
        self.layers = nnx.List([DecoderLayer(cfg, dtype, lead, quantization, _layer_formats(formats, i))
                                for i in range(cfg.num_layers // pipeline_stages)])
        self.norm = _param((cfg.hidden_size,), dtype)
        if not cfg.tie_word_embeddings and "lm_head" in formats:
            self.lm_head = _packed_param(cfg.hidden_size, cfg.vocab_size, formats["lm_head"])
        elif not cfg.tie_word_embeddings and quantization:
            self.lm_head = _param((cfg.vocab_size, cfg.hidden_size), STORAGE_DTYPES[quantization])
            self.lm_head_scale = _param((cfg.vocab_size, num_groups(cfg.hidden_size)), jnp.float32)
        elif not cfg.tie_word_embeddings:
            self.lm_head = _param((cfg.hidden_size, cfg.vocab_size), dtype)

    def __call__(self, token_ids, positions, kv_cache, md: AttentionMetadata, lora=None, input_embeds=None):
        """Hidden states `[N, hidden]` of the new tokens (micro-batches flattened), and the
        updated `(k_cache, v_cache)`. `lora`: None, or `(weights, token_slots, column_slots)`, the
        LoRA slots' per-layer factors, each token's slot and each slot column's slot
        (`jpaged/lora_slots.py`). `input_embeds`: None, or `(embeds [N, hidden], mask [N] bool)`,
        embeddings (an image's, `models/vision.py`, or an embeds prompt's) that replace the token
        embeddings where `mask` is set, as HF's models take `inputs_embeds`; with DeepStack
        (`cfg.deepstack_layers` = k) `embeds` is `[N, hidden x (1 + k)]`, the other k slices
        added to the hidden states after the first k layers (Qwen3-VL's `deepstack_visual_embeds`)."""
        layer_weights = [nnx.to_pure_dict(nnx.state(layer)) for layer in self.layers]
        if lora is not None:
            weights, token_slots, column_slots = lora
            mask = (token_slots[:, None] == column_slots[None, :]).astype(self.norm.dtype)
            layer_weights = [{**own, **factors, "lora_mask": mask} for own, factors in zip(layer_weights, weights)]
        decode = self.decode
        if input_embeds is None:
            hidden = self.embed(token_ids)
        else:
            embeds, mask = input_embeds
            if self.cfg.deepstack_layers:
                width = self.cfg.hidden_size
                deepstack = embeds[:, width:].reshape(embeds.shape[0], self.cfg.deepstack_layers, width)
                decode, embeds = partial(self.decode, deepstack=deepstack.astype(self.norm.dtype)), embeds[:, :width]
            scales_given = self.cfg.multiplies_input_embeds
            hidden = self.embed(token_ids, multiply=not scales_given)
            hidden = jnp.where(mask[:, None], embeds.astype(hidden.dtype), hidden)
            if scales_given:
                hidden = self._multiply(hidden)
        hidden, kv_cache = self.run_layers(decode, hidden, positions, kv_cache, md, layer_weights)
        return self.final_norm(hidden), kv_cache

    def embed(self, token_ids, multiply: bool = True):
        """The embeddings `[N, hidden]` of `token_ids [N]`, in the model's dtype, times
        `embedding_multiplier` unless `multiply` is False."""
        hidden = self.embed_tokens[...][token_ids]
        if hidden.dtype == jnp.uint8:  # GGML block rows
            kind = block_format(hidden, self.cfg.hidden_size, self.block_kinds)
            hidden = dequantize_blocks(hidden, kind).astype(self.norm.dtype)
        if hasattr(self, "embed_tokens_scale"):  # each row a quantized weight [1, hidden] of its own
            scale = self.embed_tokens_scale[...][token_ids]
            hidden = dequantize(hidden[..., None, :], scale[..., None, :], self.norm.dtype)[..., 0]
        return self._multiply(hidden) if multiply else hidden

    def _multiply(self, hidden):
        if self.cfg.embedding_multiplier != 1.0:
            return hidden * jnp.asarray(self.cfg.embedding_multiplier, hidden.dtype)
        return hidden

    def final_norm(self, hidden):
        return self._norm(hidden, self.norm[...])

    def _norm(self, x, weight):
        return rms_norm(x, weight, self.cfg.rms_norm_eps, self.cfg.norm_weight_offset)

    def decode(self, hidden, positions, kv_cache, md: AttentionMetadata, layer_weights, first_layer=0,
               model_first_layer=None, deepstack=None):
        """Run `hidden [T, hidden]` through the layers whose weight dicts are `layer_weights` (a
        list), the cache's layers `first_layer` on (an int, or a traced int32 scalar), with
        `kv_cache` the whole model's cache (or a pipeline stage's share). `model_first_layer`
        (default: `first_layer`) is the model's number of the first of them, which picks each
        layer's sliding window and RoPE."""
        cfg = self.cfg
        rotary_dim = cfg.rotary_dim or cfg.head_dim
        rope = rope_of(cfg.rope, positions, rotary_dim)
        if cfg.local_rope is not None:
            local_rope = rope_of(cfg.local_rope, positions, rotary_dim)
        qkv = [partial(self._qkv, weights) for weights in layer_weights]
        out_and_mlp = [partial(self._out_and_mlp, weights) for weights in layer_weights]
        layer_sinks = [partial(lambda w: w["sinks"], weights) for weights in layer_weights]
        windows = jnp.asarray(cfg.sliding_windows, jnp.int32) if cfg.sliding_windows else None
        rope_layers = jnp.asarray(cfg.rope_layers) if cfg.rope_layers else None
        scale = cfg.attention_scale or cfg.head_dim**-0.5
        query_scale = None
        if cfg.query_scale_beta:  # Ministral 3: queries scaled up with the position, past each period
            periods = jnp.floor(positions.astype(jnp.float32) / cfg.query_scale_period)
            query_scale = (1 + cfg.query_scale_beta * jnp.log1p(periods))[:, None, None]

        def layer_step(carry, index):
            hidden, k_cache, v_cache = carry
            layer = first_layer + index
            model_layer = (first_layer if model_first_layer is None else model_first_layer) + index
            window = None if windows is None else windows[model_layer]
            layer_rope = rope
            if cfg.local_rope is not None:  # the windowed layers' own rotation
                windowed = window > 0 if window is not None else False
                layer_rope = tuple(jnp.where(windowed, local, full) for local, full in zip(local_rope, rope))
            if rope_layers is not None:  # a layer without RoPE: cos 1, sin 0 leave q and k as they are
                cos, sin = layer_rope
                layer_rope = (jnp.where(rope_layers[model_layer], cos, 1.0), jnp.where(rope_layers[model_layer], sin, 0.0))
            q, k, v = jax.lax.switch(index, qkv, hidden, layer_rope)
            if query_scale is not None:
                q = q * query_scale.astype(q.dtype)
            sinks = jax.lax.switch(index, layer_sinks) if cfg.attention_sinks else None
            layer_md = md
            if cfg.bidirectional and window is not None:  # a windowed layer sees window - 1 keys ahead too
                ends = jnp.where(window > 0, jnp.minimum(md.key_ends, positions + window), md.key_ends)
                layer_md = dataclasses.replace(md, key_ends=ends)
            attended, k_cache, v_cache = self.attention(q, k, v, k_cache, v_cache, layer, layer_md, scale, window=window,
                                                        softcap=cfg.attn_logit_softcapping, sinks=sinks)
            hidden = jax.lax.switch(index, out_and_mlp, hidden, attended)
            if deepstack is not None:  # [T, k, hidden]: added after the model's first k layers
                count = deepstack.shape[1]
                added = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(model_layer, count - 1), 1, keepdims=False)
                hidden = hidden + jnp.where(model_layer < count, added, 0)
            return (hidden, k_cache, v_cache), None

        indices = jnp.arange(len(layer_weights), dtype=jnp.int32)
        (hidden, k_cache, v_cache), _ = jax.lax.scan(layer_step, (hidden, *kv_cache), indices)
        return hidden, (k_cache, v_cache)

    def _qkv(self, weights, hidden, rope):
        """One layer's roped `q [T, heads, head_dim]`, `k` and `v [T, kv_heads, head_dim]`."""
        cfg = self.cfg
        num_tokens = hidden.shape[0]
        x = hidden if cfg.norm_layout == "post" else self._norm(hidden, weights["input_norm"])
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = self._fused_linear(x, weights, "qkv_proj", (q_dim, kv_dim, kv_dim))
        if cfg.qk_norm and cfg.qk_norm_over_heads:  # OLMo 2: one norm over all heads' dims
            q, k = self._norm(q, weights["q_norm"]), self._norm(k, weights["k_norm"])
        q = q.reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm and not cfg.qk_norm_over_heads:
            q = self._norm(q, weights["q_norm"])
            k = self._norm(k, weights["k_norm"])
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def _out_and_mlp(self, weights, hidden, attended):
        """`hidden [T, hidden]` after one layer's output projection of `attended [T, heads,
        head_dim]` and its MLP, each added to the residual stream."""
        cfg = self.cfg
        out = self._linear(attended.reshape(hidden.shape[0], -1), weights, "o_proj")
        if "o_bias" in weights:
            out = out + weights["o_bias"]
        if cfg.norm_layout == "pre":  # Llama: HF's post_attention_layernorm is the MLP's input norm
            hidden = hidden + self._residual(out)
            mlp_in = self._norm(hidden, weights["post_attention_norm"])
        else:  # Gemma 2 / 3, OLMo 2: HF's post_attention_layernorm is on attention's output
            hidden = hidden + self._norm(out, weights["post_attention_norm"])
            mlp_in = self._norm(hidden, weights["pre_mlp_norm"]) if cfg.norm_layout == "sandwich" else hidden
        if cfg.is_moe:
            return hidden + self._residual(self.moe(mlp_in, _dequantized(weights, mlp_in.dtype), cfg))
        gate, up = self._fused_linear(mlp_in, weights, "gate_up_proj", (cfg.intermediate_size,) * 2)
        mlp_out = self._linear(ACTIVATIONS[cfg.hidden_act](gate) * up, weights, "down_proj")
        if cfg.norm_layout != "pre":
            return hidden + self._norm(mlp_out, weights["post_mlp_norm"])
        return hidden + self._residual(mlp_out)

    def _residual(self, x):
        """A sublayer's output as it joins the residual stream (times Granite's multiplier)."""
        multiplier = self.cfg.residual_multiplier
        return x if multiplier == 1.0 else x * jnp.asarray(multiplier, x.dtype)

    def _linear(self, x, weights, name):
        """`x [T, in]` times the layer's projection `name` (`[T, out]`), quantized or not, plus
        its LoRA term."""
        return _plus_lora(self._product(x, weights[name], weights.get(scale_name(name))), x, weights, name)

    def _fused_linear(self, x, weights, fused, sizes):
        """The parts (`[T, size]` each) of `x [T, in]` times the fused projection `fused` (or
        times its parts where they are kept apart), plus the layer's `qkv_bias` for q / k / v."""
        shards = self.tensor_parallel_size
        bias = weights.get("qkv_bias") if fused == "qkv_proj" else None
        if fused in weights:
            y = self._linear(x, weights, fused)
            parts = split_columns(y if bias is None else y + bias, sizes, shards)
            return [_plus_lora(part, x, weights, name) for part, name in zip(parts, FUSED_PROJECTIONS[fused])]
        parts = [self._linear(x, weights, part) for part in FUSED_PROJECTIONS[fused]]
        if bias is None:
            return parts
        return [part + b for part, b in zip(parts, split_columns(bias, sizes, shards))]

    def _product(self, x, w, scale=None):
        """`x [T, in]` times a weight kept in any of the model's forms: float `[in, out]`,
        quantized `[out, in]` with `scale [out, groups]`, or GGML block rows `[out, row bytes]`."""
        if w.dtype == jnp.uint8:
            return self.block_linear(x, w, block_format(w, x.shape[-1], self.block_kinds))
        return self.float_linear(x, w) if scale is None else self.quantized_linear(x, w, scale)

    def logits(self, hidden):
        """Float32 logits `[N, vocab]` of final hidden states `[N, hidden]` (its ops named in the
        `lm_head` scope, for profiles)."""
        with jax.named_scope("lm_head"):
            logits = self._logits(hidden)
        if self.cfg.logits_scaling != 1.0:  # Granite
            logits = logits / self.cfg.logits_scaling
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    def _logits(self, hidden):
        if self.cfg.tie_word_embeddings and self.embed_tokens.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            scale = getattr(self, "embed_tokens_scale", None)
            return self._product(hidden, self.embed_tokens[...], None if scale is None else scale[...]).astype(jnp.float32)
        if self.cfg.tie_word_embeddings:
            return self.float_linear(hidden, self.embed_tokens[...], transposed=True).astype(jnp.float32)
        scale = getattr(self, "lm_head_scale", None)
        return self._product(hidden, self.lm_head[...], None if scale is None else scale[...]).astype(jnp.float32)


def _plus_lora(y, x, weights: dict, name: str):
    """`y`, the output of projection `name` for `x [T, in]`, plus each token's LoRA term from the
    layer's slots (`jpaged/lora_slots.py`), where the layer has them."""
    a = weights.get(f"lora_a.{name}")
    if a is None:
        return y
    return y + (((x @ a) * weights["lora_mask"]) @ weights[f"lora_b.{name}"]).astype(y.dtype)


def _dequantized(weights: dict, dtype) -> dict:
    """A layer's weights with every quantized projection widened to `dtype` in `x @ W` layout
    (the MoE block's experts: one layer's copy at a time, inside the step)."""
    out = {name: w for name, w in weights.items() if not name.endswith("_scale")}
    for name in QUANTIZED_PARAMS & weights.keys():
        if scale_name(name) in weights:
            out[name] = dequantize(weights[name], weights[scale_name(name)], dtype)
    return out
