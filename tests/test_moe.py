"""The mixture-of-experts block (`jpaged/models/moe.py`), its config and its weight loading.

`sparse_moe` (sorted tokens, ragged matmuls) against a naive per-token loop over the chosen
experts in float64 numpy, on fresh random inputs; `route` against HF's own routers; padding
rows of `expert_ffn`; MoE fields read from HF configs; per-expert weights into each layer's params.
The end-to-end check against HF models is in `test_hf_parity.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jpaged.config import ModelConfig, RopeConfig
from jpaged.loader.weights import load_params
from jpaged.models.llama import LlamaForCausalLM
from jpaged.models.moe import expert_ffn, route, sparse_moe

HIDDEN, INTER, SHARED = 16, 8, 12


def moe_config(num_experts=8, top_k=2, norm_topk_prob=True, shared=0, num_layers=1) -> ModelConfig:
    return ModelConfig(
        architecture="qwen2_moe" if shared else "qwen3_moe", vocab_size=32, hidden_size=HIDDEN,
        intermediate_size=32, num_layers=num_layers, num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6,
        rope=RopeConfig(), max_position_embeddings=64, tie_word_embeddings=True, qkv_bias=False, qk_norm=False,
        num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=INTER,
        norm_topk_prob=norm_topk_prob, shared_expert_intermediate_size=shared,
    )


def random_weights(rng, cfg: ModelConfig) -> dict[str, np.ndarray]:
    e, s = cfg.num_experts, cfg.shared_expert_intermediate_size
    shapes = {"router": (HIDDEN, e), "expert_gate_proj": (e, HIDDEN, INTER), "expert_up_proj": (e, HIDDEN, INTER),
              "expert_down_proj": (e, INTER, HIDDEN)}
    if s:
        shapes.update(shared_gate_proj=(HIDDEN, s), shared_up_proj=(HIDDEN, s), shared_down_proj=(s, HIDDEN),
                      shared_expert_gate=(HIDDEN, 1))
    return {name: rng.normal(0, 0.5, shape).astype(np.float32) for name, shape in shapes.items()}


def silu(x):
    return x / (1 + np.exp(-x))


def naive_moe(x, w, cfg: ModelConfig) -> np.ndarray:
    """Token by token, in float64: softmax over experts, top-k, each chosen expert's FFN."""
    x = x.astype(np.float64)
    w = {name: v.astype(np.float64) for name, v in w.items()}
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ w["router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs)[:cfg.num_experts_per_tok]
        weights = probs[chosen] / (probs[chosen].sum() if cfg.norm_topk_prob else 1.0)
        for e, weight in zip(chosen, weights):
            h = silu(x[t] @ w["expert_gate_proj"][e]) * (x[t] @ w["expert_up_proj"][e])
            out[t] += weight * (h @ w["expert_down_proj"][e])
        if cfg.shared_expert_intermediate_size:
            h = silu(x[t] @ w["shared_gate_proj"]) * (x[t] @ w["shared_up_proj"])
            gate = 1 / (1 + np.exp(-(x[t] @ w["shared_expert_gate"])))
            out[t] += gate * (h @ w["shared_down_proj"])
    return out


@pytest.mark.parametrize("num_experts,top_k,norm,shared", [
    (8, 2, True, 0), (4, 1, False, 0), (8, 3, False, SHARED), (6, 6, True, SHARED),
])
def test_sparse_moe_matches_per_token_loop(num_experts, top_k, norm, shared):
    cfg = moe_config(num_experts, top_k, norm, shared)
    rng = np.random.default_rng(num_experts * 10 + top_k)
    w = random_weights(rng, cfg)
    moe = jax.jit(lambda x, w: sparse_moe(x, w, cfg))
    for num_tokens in (1, 2, 7, 33):
        x = rng.normal(0, 1, (num_tokens, HIDDEN)).astype(np.float32)
        ours = moe(jnp.asarray(x), {k: jnp.asarray(v) for k, v in w.items()})
        assert ours.shape == x.shape and ours.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(ours), naive_moe(x, w, cfg), rtol=1e-5, atol=1e-5)


def test_sparse_moe_uses_many_experts():
    """The inputs above are not degenerate: 33 tokens are routed to every one of 8 experts."""
    cfg = moe_config()
    rng = np.random.default_rng(82)
    w = random_weights(rng, cfg)
    x = rng.normal(0, 1, (33, HIDDEN)).astype(np.float32)
    _, ids = route(jnp.asarray(x @ w["router"]), cfg.num_experts_per_tok, True)
    assert len(np.unique(np.asarray(ids))) == cfg.num_experts


def test_sparse_moe_bfloat16_close_to_float32():
    cfg = moe_config(shared=SHARED)
    rng = np.random.default_rng(7)
    w = {k: jnp.asarray(v, jnp.bfloat16) for k, v in random_weights(rng, cfg).items()}
    x = jnp.asarray(rng.normal(0, 1, (9, HIDDEN)), jnp.bfloat16)
    ours = jax.jit(lambda x, w: sparse_moe(x, w, cfg))(x, w)
    assert ours.dtype == jnp.bfloat16
    expected = naive_moe(np.asarray(x, np.float32), {k: np.asarray(v, np.float32) for k, v in w.items()}, cfg)
    np.testing.assert_allclose(np.asarray(ours, np.float32), expected, rtol=3e-2, atol=3e-2)


def test_expert_ffn_ignores_padding_rows():
    rng = np.random.default_rng(3)
    gate, up = (jnp.asarray(rng.normal(0, 0.5, (3, HIDDEN, INTER)), jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.normal(0, 0.5, (3, INTER, HIDDEN)), jnp.float32)
    group_sizes = jnp.array([2, 0, 3], jnp.int32)
    x = rng.normal(0, 1, (5, HIDDEN)).astype(np.float32)
    padded = np.concatenate([x, np.full((3, HIDDEN), np.nan, np.float32), np.full((1, HIDDEN), 1e30, np.float32)])
    ffn = jax.jit(expert_ffn)
    out, out_padded = ffn(jnp.asarray(x), group_sizes, gate, up, down), ffn(jnp.asarray(padded), group_sizes,
                                                                           gate, up, down)
    np.testing.assert_array_equal(np.asarray(out_padded[:5]), np.asarray(out))
    assert not np.asarray(out_padded[5:]).any()
    for rows, e in ((slice(0, 2), 0), (slice(2, 5), 2)):
        h = jax.nn.silu(x[rows] @ gate[e]) * (x[rows] @ up[e])
        np.testing.assert_allclose(np.asarray(out[rows]), np.asarray(h @ down[e]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe_norm", "qwen3_moe"])
def test_route_matches_hf_router(arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kw = dict(hidden_size=HIDDEN, num_experts_per_tok=2)
    if arch == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter as Router
        config, norm = transformers.MixtralConfig(num_local_experts=8, **kw), True
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as Router
        norm = arch.endswith("norm")
        config = transformers.Qwen3MoeConfig(num_experts=8, norm_topk_prob=norm, **kw)
    router = Router(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
        hidden = torch.randn(13, HIDDEN, generator=generator)
        logits, hf_weights, hf_ids = router(hidden)
    weights, ids = route(jnp.asarray(logits.numpy()), 2, norm)
    assert weights.dtype == jnp.float32 and ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), hf_ids.numpy())
    np.testing.assert_allclose(np.asarray(weights), hf_weights.float().numpy(), rtol=1e-6, atol=1e-7)


def hf_config_dict(class_name: str, **overrides) -> dict:
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, class_name)(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                               **overrides)
    return {**config.to_dict(), "architectures": [class_name.replace("Config", "ForCausalLM")]}


def test_moe_fields_from_hf_configs():
    mixtral = ModelConfig.from_hf(hf_config_dict("MixtralConfig", num_local_experts=4, num_experts_per_tok=2))
    assert (mixtral.architecture, mixtral.num_experts, mixtral.num_experts_per_tok) == ("mixtral", 4, 2)
    assert mixtral.moe_intermediate_size == 128 and mixtral.norm_topk_prob and mixtral.is_moe
    assert mixtral.shared_expert_intermediate_size == 0 and not mixtral.qkv_bias and not mixtral.qk_norm
    qwen3 = ModelConfig.from_hf(hf_config_dict("Qwen3MoeConfig", num_experts=6, num_experts_per_tok=3,
                                               moe_intermediate_size=32, norm_topk_prob=True))
    assert (qwen3.architecture, qwen3.num_experts, qwen3.num_experts_per_tok) == ("qwen3_moe", 6, 3)
    assert qwen3.moe_intermediate_size == 32 and qwen3.norm_topk_prob and qwen3.qk_norm and not qwen3.qkv_bias
    qwen2 = ModelConfig.from_hf(hf_config_dict("Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32, shared_expert_intermediate_size=48))
    assert (qwen2.architecture, qwen2.num_experts, qwen2.shared_expert_intermediate_size) == ("qwen2_moe", 4, 48)
    assert not qwen2.norm_topk_prob and qwen2.qkv_bias and not qwen2.qk_norm
    dense = ModelConfig.from_hf(hf_config_dict("LlamaConfig"))
    assert not dense.is_moe and dense.num_experts == 0


@pytest.mark.parametrize("overrides", [dict(mlp_only_layers=[1]), dict(decoder_sparse_step=2)])
def test_partly_dense_moe_config_is_refused(overrides):
    hf = hf_config_dict("Qwen3MoeConfig", num_experts=4, num_experts_per_tok=2, **overrides)
    with pytest.raises(ValueError, match="mlp_only_layers"):
        ModelConfig.from_hf(hf)


def moe_checkpoint(cfg: ModelConfig, rng) -> dict[str, np.ndarray]:
    """HF-named tensors (`[out, in]` layout, per-expert) of a Qwen2-MoE-shaped model."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    tensors = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(cfg.num_layers):
        per_layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                     "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                     "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                     "mlp.gate.weight": (cfg.num_experts, h), "mlp.shared_expert_gate.weight": (1, h),
                     "mlp.shared_expert.gate_proj.weight": (SHARED, h), "mlp.shared_expert.up_proj.weight": (SHARED, h),
                     "mlp.shared_expert.down_proj.weight": (h, SHARED)}
        for e in range(cfg.num_experts):
            per_layer.update({f"mlp.experts.{e}.gate_proj.weight": (INTER, h), f"mlp.experts.{e}.up_proj.weight":
                              (INTER, h), f"mlp.experts.{e}.down_proj.weight": (h, INTER)})
        tensors.update({f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    return {name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in tensors.items()}


def test_per_expert_weights_load_into_each_layers_expert_params():
    cfg = moe_config(num_experts=3, shared=SHARED, num_layers=2)
    tensors = moe_checkpoint(cfg, np.random.default_rng(5))
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg))
    layers = load_params(abstract, cfg, tensors.items())["layers"]
    assert layers[0]["expert_down_proj"].shape == (3, INTER, HIDDEN)
    for param, (layer, *index), name in [("expert_gate_proj", (1, 2), "1.mlp.experts.2.gate_proj"),
                                         ("expert_down_proj", (0, 1), "0.mlp.experts.1.down_proj"),
                                         ("router", (1,), "1.mlp.gate"),
                                         ("shared_expert_gate", (0,), "0.mlp.shared_expert_gate")]:
        np.testing.assert_array_equal(layers[layer][param][tuple(index)], tensors[f"model.layers.{name}.weight"].T)
    assert "gate_proj" not in layers[0]

    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing from the checkpoint: model\.layers\.N\.mlp\.experts\.E\.up_proj\.weight "
                                         r"for \(layer, expert\) \[\(1, 2\)\]"):
        load_params(abstract, cfg, tensors.items())
    tensors["model.layers.0.mlp.experts.3.up_proj.weight"] = np.zeros((INTER, HIDDEN), np.float32)
    with pytest.raises(ValueError, match=r"is for expert 3, but the model has 3 experts \(0 to 2\)"):
        load_params(abstract, cfg, tensors.items())


def test_dense_config_has_no_moe_params():
    cfg = dataclasses.replace(moe_config(), num_experts=0, num_experts_per_tok=0)
    layer = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: LlamaForCausalLM(cfg)).layers[0]))
    assert {"gate_up_proj", "down_proj"} <= set(layer) and "router" not in layer
