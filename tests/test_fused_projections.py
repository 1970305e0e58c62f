"""Fused q / k / v and gate / up projections: the loader's layout (`loader.weights.fuse_rows`,
`fuse_projections`) against the model's reading of it (`models.llama.split_columns`).

The oracle is the checkpoint's separate tensors: the fused product, split as the model splits it,
must equal each part's own product, for one shard and for tensor-parallel layouts; under a real
mesh the end-to-end check is `test_parallel_layouts.py` (sharded tokens equal one device's).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jpaged.config import ModelConfig, RopeConfig
from jpaged.loader.weights import fuse_rows, load_params
from jpaged.models.llama import LlamaForCausalLM, split_columns

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 32, 4, 2, 8, 48


def dense_config(num_layers: int = 2) -> ModelConfig:
    return ModelConfig(
        architecture="qwen2", vocab_size=40, hidden_size=HIDDEN, intermediate_size=INTER, num_layers=num_layers,
        num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, rms_norm_eps=1e-6, rope=RopeConfig(),
        max_position_embeddings=64, tie_word_embeddings=True, qkv_bias=True, qk_norm=False)


def checkpoint(cfg: ModelConfig, rng) -> dict[str, np.ndarray]:
    """HF-named random tensors (`[out, in]`) of a Qwen2-shaped dense model (q / k / v biases)."""
    h, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(cfg.num_layers):
        shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in {
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i)}.items()})
    return {name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_split_columns_reads_what_fuse_rows_wrote(shards):
    rng = np.random.default_rng(shards)
    parts = [rng.standard_normal((n, 24)).astype(np.float32) for n in (16, 8, 8)]
    fused = fuse_rows(parts, shards)
    for shard, rows in enumerate(np.split(fused, shards)):  # each shard's rows: its slice of every part
        np.testing.assert_array_equal(rows, np.concatenate([np.split(p, shards)[shard] for p in parts]))
    x = rng.standard_normal((5, 24)).astype(np.float32)
    got = split_columns(jnp.asarray(x @ fused.T), (16, 8, 8), shards)
    for piece, part in zip(got, parts):
        np.testing.assert_allclose(piece, x @ part.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shards", [1, 2])
def test_loaded_fused_projections_give_each_parts_product(shards):
    cfg = dense_config()
    tensors = checkpoint(cfg, np.random.default_rng(7))
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, tensor_parallel_size=shards))
    layers = load_params(model, cfg, tensors.items())["layers"]
    assert {"qkv_proj", "qkv_bias", "gate_up_proj"} <= set(layers[1])
    assert not {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} & set(layers[1])
    x = np.random.default_rng(8).standard_normal((3, HIDDEN)).astype(np.float32)
    q_dim, kv_dim = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for layer in range(cfg.num_layers):
        weights = layers[layer]
        prefix = f"model.layers.{layer}."
        qkv = split_columns(x @ weights["qkv_proj"] + weights["qkv_bias"], (q_dim, kv_dim, kv_dim), shards)
        for got, part in zip(qkv, "qkv"):
            want = x @ tensors[f"{prefix}self_attn.{part}_proj.weight"].T + tensors[f"{prefix}self_attn.{part}_proj.bias"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        gate, up = split_columns(x @ weights["gate_up_proj"], (INTER, INTER), shards)
        np.testing.assert_allclose(gate, x @ tensors[f"{prefix}mlp.gate_proj.weight"].T, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(up, x @ tensors[f"{prefix}mlp.up_proj.weight"].T, rtol=1e-5, atol=1e-4)


def test_a_missing_part_of_a_fused_projection_is_named():
    cfg = dense_config()
    tensors = checkpoint(cfg, np.random.default_rng(9))
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: model\.layers\.1\.self_attn\.v_proj\.weight"):
        load_params(model, cfg, tensors.items())
