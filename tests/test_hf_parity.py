"""jpaged against HF transformers, per supported architecture, on tiny random-weight models.

Each case builds an HF model from its config with random float32 weights (norm scales and
biases included), saves it with `save_pretrained`, loads the folder with `jpaged.LLM` and checks
  - prompt logits through the paged cache against HF's forward (atol/rtol 1e-4),
  - greedy continuations of a batch of three prompts (longer than one 16-token block, exactly
    one block, short) against HF's `generate`,
  - the same greedy continuations with chunked prefill (at most 8 tokens per step), on the cases
    whose attention or positions differ (`CHUNKED_CASES`).
Between them the cases cover GQA 2:1, MHA, GQA 8:1, tied and untied lm_head, llama3 rope
scaling, QKV bias (Qwen2) and q/k RMSNorm with an explicit head_dim (Qwen3), and mixtures of
experts: Mixtral (top-2 of 8, renormalised), Qwen3-MoE (top-3 of 6, `norm_topk_prob`) and
Qwen2-MoE (top-2 of 8 left as softmax probabilities) with its sigmoid-gated shared expert; and
Gemma 3 (GELU, (1 + w) norms before and after attention and the MLP, scaled embeddings, a query
scale of its own, a sliding-window layer with its own RoPE beside a global one with linear RoPE
scaling, soft-capped logits), and Gemma 2 (soft-capped attention scores, no q/k norm); Gemma
(GELU, (1 + w) norms, tied head), Phi-3 (checkpoint-fused projections, a window on every layer,
partial rotary, LongRoPE's short and long factors), Granite and GraniteMoE (multipliers, stacked
experts), OLMo 2 and 3 (norms after attention and the MLP only, q / k norms over all heads, a
windowed layer with its own RoPE beside a YaRN one), SmolLM3 (a layer without RoPE), YaRN on
Qwen3, and gpt-oss (attention sinks, biases everywhere, clamped SwiGLU experts). The MoE oracles are checked to route tokens to most experts, so wrong routing cannot hide
behind one favourite expert.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from hf_models import greedy_margin, hf_greedy, hf_logits, save_random_model  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402

MAX_TOKENS = 32
BLOCK_SIZE = 16
# One past two blocks, exactly one block, short. Each engine compiles one step per padded batch
# shape; these lengths, in this order, need 2 shapes unchunked and 6 chunked where e.g.
# (29, 16, 5) needs 3 and 9, and compiles are most of this file's runtime.
PROMPT_LENS = (33, BLOCK_SIZE, 5)
LOGITS_PROMPT_LEN = 29
MIN_GREEDY_MARGIN = 1e-3  # smallest accepted gap between HF's top two logits
MAX_PROMPT_DRAWS = 10

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.2,  # hf_models re-draws every weight at this scale anyway
    bos_token_id=1,
    eos_token_id=2,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head_dim 16 the 8 wavelengths (6 to 6e4 positions) fall in all three bands around
    # 64/4 and 64/1: kept, smoothed, divided by the factor.
    "original_max_position_embeddings": 64,
}

# Phi-3's LongRoPE with 8 rotary pairs (head_dim 16, three quarters rotated: 12 dims, 6 pairs).
PHI3_ROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.75,
    "short_factor": [1.0, 1.3, 1.9, 2.6, 4.0, 7.5],
    "long_factor": [1.5, 2.0, 3.0, 5.0, 9.0, 16.0],
    "original_max_position_embeddings": 128,
}

CASES = {
    # GQA 2:1, untied lm_head, default rope.
    "llama": ("LlamaConfig", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=False)),
    # MHA, tied embeddings, llama3 rope scaling (transformers 5 spells it `rope_parameters`).
    "llama3_tied": ("LlamaConfig", dict(vocab_size=320, num_attention_heads=4, num_key_value_heads=4,
                                        tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    # GQA 8:1, three layers, no sliding window.
    "mistral": ("MistralConfig", dict(vocab_size=384, num_attention_heads=8, num_key_value_heads=1,
                                      num_hidden_layers=3, sliding_window=None, tie_word_embeddings=False)),
    # QKV bias is part of the architecture.
    "qwen2": ("Qwen2Config", dict(vocab_size=448, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=False, use_sliding_window=False)),
    # q/k RMSNorm, head_dim 32 != hidden 64 / 4 heads.
    "qwen3": ("Qwen3Config", dict(vocab_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  tie_word_embeddings=False, use_sliding_window=False)),
    # YaRN rope scaling (static, as in HF): factor 4 over an original 32 positions, HF's default
    # attention factor (0.1 ln 4 + 1) and ramp (beta 32 / 1).
    "qwen3_yarn": ("Qwen3Config", dict(vocab_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       tie_word_embeddings=True, use_sliding_window=False,
                                       rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                        "original_max_position_embeddings": 32})),
    # Mixture of experts: top-2 of 8 experts of intermediate size 64, softmax then renormalised top-k.
    "mixtral": ("MixtralConfig", dict(vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
                                      sliding_window=None, tie_word_embeddings=False)),
    # q/k norm and experts, three layers, top-3 of 6 renormalised.
    "qwen3_moe": ("Qwen3MoeConfig", dict(vocab_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                         num_hidden_layers=3, num_experts=6, num_experts_per_tok=3,
                                         moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=False)),
    # QKV bias, top-2 of 8 experts plus a shared expert behind a sigmoid gate.
    "qwen2_moe": ("Qwen2MoeConfig", dict(vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=96, norm_topk_prob=False,
                                         tie_word_embeddings=False, use_sliding_window=False)),
    # Gemma 3: a windowed local layer (window 6, so the longer prompts reach past it) and a global one.
    "gemma3": ("Gemma3TextConfig", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        query_pre_attn_scalar=24, sliding_window=6,
                                        layer_types=["sliding_attention", "full_attention"],
                                        rope_scaling={"rope_type": "linear", "factor": 4.0},
                                        final_logit_softcapping=30.0, pad_token_id=0, tie_word_embeddings=False)),
    # Gemma 2: soft-capped attention scores (at 2.0, so that the cap bends most scores) beside
    # sliding (window 6) and global layers.
    "gemma2": ("Gemma2Config", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                    query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=30.0, pad_token_id=0, tie_word_embeddings=False)),
    # GraniteMoE: Granite's multipliers over top-2 of 6 experts stacked in one tensor per layer.
    "granitemoe": ("GraniteMoeConfig", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=32, num_local_experts=6, num_experts_per_tok=2,
                                            embedding_multiplier=3.0, attention_multiplier=0.09,
                                            residual_multiplier=0.5, logits_scaling=2.5, tie_word_embeddings=False)),
    # Gemma: GELU, (1 + w) norms, scaled embeddings, tied LM head (its default), MHA.
    "gemma": ("GemmaConfig", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                                  pad_token_id=0)),
    # Phi-3: q / k / v and gate / up fused in the checkpoint, a window on every layer (10, so the
    # longer prompts reach past it), a quarter of each head left unrotated, LongRoPE's short factors
    # (the engine's 128 tokens are within the original 128) and its attention factor.
    "phi3": ("Phi3Config", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, sliding_window=10,
                                max_position_embeddings=512, original_max_position_embeddings=128,
                                pad_token_id=0, tie_word_embeddings=False,
                                rope_parameters=PHI3_ROPE)),
    # Granite: embedding, attention, residual and logit multipliers.
    "granite": ("GraniteConfig", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2,
                                      embedding_multiplier=3.0, attention_multiplier=0.09, residual_multiplier=0.5,
                                      logits_scaling=2.5, tie_word_embeddings=False)),
    # OLMo 3: OLMo 2's layer with a window (6) on the first layer, whose RoPE (base 10,000) is not
    # the global layer's (YaRN, base 500,000).
    "olmo3": ("Olmo3Config", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                  tie_word_embeddings=False, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention"],
                                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                   "full_attention": {"rope_type": "yarn", "rope_theta": 5e5,
                                                                      "factor": 4.0,
                                                                      "original_max_position_embeddings": 64}})),
    # SmolLM3: the second of every two layers without RoPE (NoPE), tied embeddings (its default).
    "smollm3": ("SmolLM3Config", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                      no_rope_layer_interval=2)),
    # gpt-oss: attention sinks, q / k / v / o biases, a window (6) on every other layer, YaRN, and
    # top-2 of 6 experts with router and expert biases and the clamped SwiGLU (gate and up
    # interleaved in one stacked tensor per layer).
    "gpt_oss": ("GptOssConfig", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     intermediate_size=32, num_local_experts=6, num_experts_per_tok=2,
                                     sliding_window=6, tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                      "original_max_position_embeddings": 64})),
    # EXAONE 4: OLMo 2's post-norms with per-head q / k norms, a window (6) on the first layer and no
    # RoPE on the global one (`sliding_window_pattern` 2).
    "exaone4": ("Exaone4Config", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      pad_token_id=0, tie_word_embeddings=False, sliding_window=6,
                                      sliding_window_pattern=2)),
    # Ministral 3: YaRN (as its config defaults it, mscale terms included) and queries scaled up by
    # position (`llama_4_scaling_beta`, each 16 positions: the prompts and outputs reach past 48).
    "ministral3": ("Ministral3Config", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            tie_word_embeddings=False,
                                            rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                             "original_max_position_embeddings": 16,
                                                             "max_position_embeddings": 256, "beta_fast": 32.0,
                                                             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                                             "llama_4_scaling_beta": 0.4})),
    # ERNIE 4.5: RoPE on interleaved pairs of dims (GLM's pairing), tied embeddings (its default).
    "ernie4_5": ("Ernie4_5Config", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        pad_token_id=0)),
    # GLM-4: Gemma 2's four norms a layer (plain RMSNorms), q / k / v biases, gate and up fused in
    # the checkpoint, RoPE on interleaved pairs of the first half of each head's dims.
    "glm4": ("Glm4Config", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                pad_token_id=0, tie_word_embeddings=False)),
    # GLM (glm-4-9b-chat): Llama's layers with q / k / v biases, fused gate and up, RoPE on
    # interleaved pairs of half of each head's dims.
    "glm": ("GlmConfig", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              pad_token_id=0, tie_word_embeddings=False)),
    # Helium: Llama's layers with RoPE on interleaved pairs of all of each head's dims.
    "helium": ("HeliumConfig", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    pad_token_id=0)),
    # Seed-OSS: biases on q / k / v and (`attention_out_bias`) on o.
    "seed_oss": ("SeedOssConfig", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       attention_out_bias=True, tie_word_embeddings=False)),
    # OLMo 2: norms after attention and the MLP only, q / k norms over all heads.
    "olmo2": ("Olmo2Config", dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                  tie_word_embeddings=False)),
}
MOE_CASES = ("mixtral", "qwen3_moe", "qwen2_moe", "granitemoe", "gpt_oss")
# windows, sinks, soft caps, a layer without RoPE, partial rotary and YaRN; plain Llama; Mixtral's routing
PROMPT_LOGPROBS_CASES = ("llama3_tied", "gemma2", "granite", "qwen3_moe", "phi3")
CHUNKED_CASES = ("llama", "gemma3", "gemma2", "phi3", "olmo3", "smollm3", "gpt_oss", "mixtral")


@dataclass
class Case:
    name: str
    model: object  # the HF torch model, the oracle
    folder: str
    prompts: list[list[int]]
    continuations: list[list[int]]  # HF's greedy continuation of each prompt
    logits_prompt: list[int]


def engine_kwargs(**overrides):
    kwargs = dict(dtype="float32", num_blocks=64, block_size=BLOCK_SIZE, max_num_seqs=8,
                  max_num_batched_tokens=128, max_model_len=128)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> Case:
    name = request.param
    config_class, overrides = CASES[name]
    config = getattr(transformers, config_class)(**{**COMMON, **overrides})
    folder = tmp_path_factory.mktemp(f"hf_{name}")
    seed = list(CASES).index(name)
    model = save_random_model(folder, config, seed=seed)
    rng = np.random.default_rng(1000 + seed)
    # Greedy parity is only meaningful away from ties: draw prompts until HF's choices all win by
    # MIN_GREEDY_MARGIN, far above float32 rounding (deterministic: the draws are seeded).
    for _ in range(MAX_PROMPT_DRAWS):
        prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in PROMPT_LENS]
        continuations = [hf_greedy(model, prompt, MAX_TOKENS) for prompt in prompts]
        margin = min(greedy_margin(model, p, c) for p, c in zip(prompts, continuations))
        if margin >= MIN_GREEDY_MARGIN:
            break
    else:
        pytest.fail(f"{name}: no prompt draw without a near-tie (last margin {margin:.1e})")
    logits_prompt = rng.integers(0, config.vocab_size, LOGITS_PROMPT_LEN).tolist()
    return Case(name, model, str(folder), prompts, continuations, logits_prompt)


@pytest.fixture(scope="module")
def llm(case) -> LLM:
    return LLM(model=case.folder, **engine_kwargs())


def jpaged_greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def assert_same_greedy(case: Case, ours: list[list[int]], expected: list[list[int]]) -> None:
    """Token-for-token equality; on a mismatch, say where and how close HF's top two were there."""
    for prompt, got, want in zip(case.prompts, ours, expected):
        if got == want:
            continue
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        detail = ""
        if at < min(len(got), len(want)):
            row = hf_logits(case.model, prompt + want[:at])[-1]
            top2 = np.sort(row)[-2:]
            detail = f"; HF's top-2 logit gap there is {top2[1] - top2[0]:.2e}"
        pytest.fail(f"{case.name}: prompt of {len(prompt)} tokens diverges from HF at new token {at}: "
                    f"jpaged {got[at:at + 5]}..., HF {want[at:at + 5]}...{detail}\n"
                    f"jpaged {got}\nHF     {want}")


def test_config_reaches_engine(case, llm):
    """The saved config.json is HF's own, and the engine reads the feature each case is about."""
    saved = json.loads((Path(case.folder) / "config.json").read_text())
    cfg = llm.engine.model_config
    hf_cfg = case.model.config
    assert cfg.num_layers == hf_cfg.num_hidden_layers
    assert (cfg.num_heads, cfg.num_kv_heads) == (hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads)
    assert cfg.head_dim == case.model.model.layers[0].self_attn.head_dim
    assert cfg.tie_word_embeddings == saved.get("tie_word_embeddings", False)
    if case.name == "llama3_tied":
        assert saved["rope_parameters"]["rope_type"] == "llama3"
        assert cfg.rope.scaling_type == "llama3" and cfg.rope.factor == 8.0
        assert cfg.rope.original_max_position_embeddings == 64
    elif case.name == "gemma2":
        assert cfg.attn_logit_softcapping == 2.0 and cfg.sliding_windows == (6, 0) and cfg.local_rope is None
        assert cfg.rope.scaling_type == "default" and not cfg.qk_norm
    elif case.name == "gemma3":
        assert saved["rope_parameters"]["full_attention"]["rope_type"] == "linear"
        assert (cfg.rope.scaling_type, cfg.rope.factor, cfg.rope.theta) == ("linear", 4.0, 1e6)
        assert cfg.local_rope.theta == 1e4 and cfg.sliding_windows == (6, 0)
        assert cfg.norm_layout == "sandwich" and cfg.hidden_act == "gelu_tanh" and cfg.final_logit_softcapping == 30.0
    elif case.name == "phi3":
        assert "qkv_proj" in str(case.model.model.layers[0].self_attn) and cfg.sliding_windows == (10, 10)
        assert (cfg.rope.scaling_type, cfg.rope.use_long_factor, cfg.rotary_dim) == ("longrope", False, 12)
        assert cfg.rope.attention_factor == pytest.approx(case.model.model.rotary_emb.attention_scaling)
        assert cfg.rope.attention_factor > 1.05  # 512 / 128 positions: sqrt(1 + ln 4 / ln 128)
    elif case.name == "granite":
        assert (cfg.embedding_multiplier, cfg.attention_scale, cfg.residual_multiplier, cfg.logits_scaling) == \
            (3.0, 0.09, 0.5, 2.5)
    elif case.name == "qwen3_yarn":
        assert (cfg.rope.scaling_type, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("yarn", 4.0, 32)
        assert cfg.rope.attention_factor == pytest.approx(case.model.model.rotary_emb.attention_scaling)
        assert cfg.rope.attention_factor > 1.1  # 0.1 ln 4 + 1
    elif case.name == "smollm3":
        assert cfg.rope_layers == (True, False) and cfg.tie_word_embeddings and not cfg.sliding_windows
    elif case.name == "olmo3":
        assert cfg.sliding_windows == (6, 0) and (cfg.local_rope.theta, cfg.local_rope.scaling_type) == (1e4, "default")
        assert (cfg.rope.theta, cfg.rope.scaling_type, cfg.rope.factor) == (5e5, "yarn", 4.0)
    elif case.name == "olmo2":
        assert cfg.qk_norm_over_heads
    elif case.name == "ministral3":
        assert (cfg.query_scale_beta, cfg.query_scale_period) == (0.4, 16) and cfg.rope.scaling_type == "yarn"
        assert cfg.rope.attention_factor == pytest.approx(case.model.model.rotary_emb.attention_scaling)
    elif case.name == "glm4":
        assert cfg.rope_interleaved and cfg.rotary_dim == 8 and cfg.norm_layout == "sandwich"
        assert cfg.norm_weight_offset == 0.0
    elif case.name in ("glm", "helium"):
        assert cfg.rope_interleaved and cfg.rotary_dim == {"glm": 8, "helium": None}[case.name]
    elif case.name == "ernie4_5":
        assert cfg.rope_interleaved and cfg.tie_word_embeddings
    elif case.name == "exaone4":
        assert saved["layer_types"] == ["sliding_attention", "full_attention"]
        assert cfg.sliding_windows == (6, 0) and cfg.rope_layers == (True, False)
    elif case.name == "gpt_oss":
        assert cfg.sliding_windows == (6, 0) and cfg.attention_sinks and cfg.o_bias and cfg.moe_bias
        assert (cfg.rope.scaling_type, cfg.rope.truncate, cfg.swiglu_limit, cfg.swiglu_alpha) == ("yarn", False, 7.0, 1.702)
        assert cfg.rope.attention_factor == pytest.approx(case.model.model.rotary_emb.attention_scaling)
    else:
        assert cfg.rope.scaling_type == "default"
    assert cfg.qkv_bias == case.name.startswith(("qwen2", "gpt_oss", "seed_oss", "glm"))
    assert cfg.o_bias == case.name.startswith(("gpt_oss", "seed_oss"))
    assert cfg.qk_norm == case.name.startswith(("qwen3", "gemma3", "olmo", "exaone4"))
    assert cfg.qk_norm_over_heads == case.name.startswith("olmo")
    assert cfg.norm_layout == {"gemma2": "sandwich", "gemma3": "sandwich", "olmo2": "post", "olmo3": "post",
                               "exaone4": "post", "glm4": "sandwich"}.get(case.name, "pre")
    assert cfg.is_moe == (case.name in MOE_CASES)
    if cfg.is_moe:
        num_experts = getattr(hf_cfg, "num_experts", None) or hf_cfg.num_local_experts
        assert cfg.num_experts == num_experts and cfg.num_experts_per_tok == hf_cfg.num_experts_per_tok
        assert cfg.norm_topk_prob == getattr(hf_cfg, "norm_topk_prob", True)  # Mixtral always renormalises
        expert_size = hf_cfg.intermediate_size if case.name in ("mixtral", "granitemoe", "gpt_oss") \
            else hf_cfg.moe_intermediate_size
        assert cfg.moe_intermediate_size == expert_size
        assert cfg.shared_expert_intermediate_size == getattr(hf_cfg, "shared_expert_intermediate_size", 0)
    if case.name == "qwen3":
        assert cfg.head_dim == 32 != cfg.hidden_size // cfg.num_heads
    if case.name == "mistral":
        assert saved["sliding_window"] is None


def test_prompt_logprobs_match_hf(case, llm):
    """Every prompt position's logprobs (the token's and the top 20), from the scheduled prefill:
    on the cases whose logits differ on the way out (a tied head, soft caps, Granite's scaling,
    experts, partial rotary); every case's generated tokens' logprobs are checked with its greedy
    tokens."""
    if case.name not in PROMPT_LOGPROBS_CASES:
        pytest.skip("prompt logprobs are checked on the cases whose logits differ on the way out")
    prompt = case.logits_prompt
    expected = hf_logits(case.model, prompt)
    assert expected.std() > 0.1, "HF logits are nearly flat: the random weights are too small"
    expected = expected - np.logaddexp.reduce(expected, axis=-1, keepdims=True)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=20),
                       use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
        row = expected[position - 1]
        assert len(entry) >= 20 and prompt[position] in entry
        tokens = list(entry)
        np.testing.assert_allclose([entry[t].logprob for t in tokens], row[tokens], atol=1e-4, rtol=1e-4)


def test_float16_matches_hf_in_float16(case):
    """dtype="half" (vLLM's name for float16) keeps weights and KV cache in float16, and its
    prompt logprobs match HF's model cast to float16 within float16's rounding (HF's own float16
    and float32 logprobs differ by up to about 0.03 on these models)."""
    if case.name != "llama3_tied":  # one dense case (tied LM head) is enough for the dtype
        pytest.skip("float16 is checked on one architecture")
    half = LLM(model=case.folder, **engine_kwargs(dtype="half"))
    assert half.engine.runner.kv_cache[0].dtype == "float16"
    assert {leaf.dtype for leaf in jax.tree.leaves(half.engine.runner.state)} == {jnp.dtype("float16")}
    prompt = case.logits_prompt
    expected = hf_logits(copy.deepcopy(case.model).to(torch.float16), prompt)
    expected = expected - np.logaddexp.reduce(expected, axis=-1, keepdims=True)
    out = half.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=20),
                        use_tqdm=False)[0]
    for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
        tokens = list(entry)
        np.testing.assert_allclose([entry[t].logprob for t in tokens], expected[position - 1][tokens], atol=0.06)


def test_hf_oracle_is_not_degenerate(case):
    for prompt, tokens in zip(case.prompts, case.continuations):
        assert len(tokens) == MAX_TOKENS
        assert len(set(tokens)) >= 8, f"{case.name}: HF greedy from {len(prompt)} tokens is {tokens}"


def test_hf_moe_oracle_uses_many_experts(case):
    """Every layer of the MoE oracle sends the logits prompt's tokens to most of its experts."""
    if case.name not in MOE_CASES:
        pytest.skip("dense model")
    config = case.model.config
    with torch.no_grad():
        out = case.model(torch.tensor([case.logits_prompt]), output_router_logits=True)
    assert len(out.router_logits) == config.num_hidden_layers
    for layer, logits in enumerate(out.router_logits):
        chosen = torch.topk(logits.float().softmax(-1), config.num_experts_per_tok, dim=-1).indices
        used = len(torch.unique(chosen))
        num_experts = getattr(config, "num_experts", None) or config.num_local_experts
        assert used >= max(2, (num_experts * 3) // 4), f"{case.name} layer {layer}: {used} experts used"


def test_greedy_matches_hf(case, llm):
    """Greedy tokens, and each generated token's logprobs (its own and the top 5), against HF's
    forward over the prompt and its continuation."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in case.prompts], params, use_tqdm=False)
    assert_same_greedy(case, [list(out.outputs[0].token_ids) for out in outputs], case.continuations)
    for prompt, want, out in zip(case.prompts, case.continuations, outputs):
        logits = hf_logits(case.model, prompt + want[:-1])[len(prompt) - 1:]
        expected = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        for row, entry in zip(expected, out.outputs[0].logprobs):
            tokens = list(entry)
            np.testing.assert_allclose([entry[t].logprob for t in tokens], row[tokens], atol=1e-4, rtol=1e-4)


def test_greedy_with_chunked_prefill_matches_hf(case):
    """Prompts split over steps of at most 8 tokens: what the split can change is attention over
    the cached part and positions, so this runs on the cases whose attention or positions differ
    (and on plain Llama and one MoE), not on every architecture."""
    if case.name not in CHUNKED_CASES:
        pytest.skip("chunked prefill is checked where attention or positions differ")
    chunked = LLM(model=case.folder, **engine_kwargs(max_num_batched_tokens=8))
    assert_same_greedy(case, jpaged_greedy(chunked, case.prompts), case.continuations)


def test_phi3_long_factors_match_hf_past_the_original_context(case):
    """An engine whose max_model_len passes Phi-3's original context (128 here) rotates with
    LongRoPE's long factors, as vLLM does; HF takes them for a forward pass that reaches past it,
    so a 150-token prompt's logprobs are HF's (while the short factors give other values)."""
    if case.name != "phi3":
        pytest.skip("LongRoPE is Phi-3's")
    prompt = np.random.default_rng(7).integers(0, case.model.config.vocab_size, 150).tolist()
    expected = hf_logits(case.model, prompt)
    expected = expected - np.logaddexp.reduce(expected, axis=-1, keepdims=True)
    long = LLM(model=case.folder, **engine_kwargs(max_model_len=256, num_blocks=32))
    assert long.engine.model_config.rope.use_long_factor
    out = long.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=5),
                        use_tqdm=False)[0]
    got = np.array([entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])])
    want = expected[np.arange(len(prompt) - 1), prompt[1:]]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # The model's whole context (512) asked for, but a cache of 7 blocks lowers max_model_len to
    # 112: the short factors, and a 100-token prompt's logprobs are HF's.
    short = LLM(model=case.folder, **engine_kwargs(max_model_len=None, num_blocks=7))
    assert short.engine.max_model_len == 112 and not short.engine.model_config.rope.use_long_factor
    short_out = short.generate({"prompt_token_ids": prompt[:100]}, SamplingParams(max_tokens=1, prompt_logprobs=5),
                               use_tqdm=False)[0]
    short_got = np.array([entry[token].logprob for entry, token in zip(short_out.prompt_logprobs[1:], prompt[1:100])])
    expected_short = hf_logits(case.model, prompt[:100])
    expected_short = expected_short - np.logaddexp.reduce(expected_short, axis=-1, keepdims=True)
    np.testing.assert_allclose(short_got, expected_short[np.arange(99), prompt[1:100]], atol=1e-4, rtol=1e-4)
    assert np.abs(short_got - got[:99]).max() > 1e-2  # the two factor sets differ where it counts


@pytest.mark.parametrize("long_factor, message", [
    ([1.0] * 7, r"longrope long_factor has 7 entries, expected one per rotary pair: 8"),
    (2.0, r"longrope long_factor must be a list of positive numbers, one per rotary pair, got 2.0"),
    (["1.0x"] * 8, r"longrope long_factor must be a list of positive numbers"),
])
def test_longrope_factor_lists_are_checked_when_read(long_factor, message):
    """Both factor sets are checked when the config is read, whichever the engine will use (HF
    refuses such configs too)."""
    from jpaged.config import ModelConfig

    config = dict(architectures=["Phi3ForCausalLM"], vocab_size=64, hidden_size=64, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                  original_max_position_embeddings=64,
                  rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": long_factor})
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(config)


def test_ministral_windows_follow_layer_types():
    """Ministral's layers are Mistral's (the engine's Mistral case runs them), windowed where HF's
    `MinistralConfig` lays out `layer_types`, or every layer where it gives none."""
    from jpaged.config import ModelConfig

    sizes = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, sliding_window=6)
    for layer_types, windows in ((["full_attention", "sliding_attention", "full_attention"], (0, 6, 0)),
                                 (None, (6, 6, 6))):
        config = transformers.MinistralConfig(**sizes, layer_types=layer_types)
        ours = ModelConfig.from_hf({**config.to_dict(), "architectures": ["MinistralForCausalLM"]})
        assert (ours.architecture, ours.sliding_windows) == ("mistral", windows)
        assert windows == tuple(6 if kind == "sliding_attention" else 0 for kind in config.layer_types)


def test_olmo3_hub_config_read_as_hf_reads_it():
    """An OLMo 3 config.json in the Hub's older spelling (`rope_theta` and a YaRN `rope_scaling`
    at the top): the global layers' RoPE and the windowed layers' are what HF's own config class
    makes of it (the scaling on the global layers only)."""
    from jpaged.config import ModelConfig, RopeConfig

    hub = dict(architectures=["Olmo3ForCausalLM"], model_type="olmo3", vocab_size=100278, hidden_size=4096,
               intermediate_size=11008, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=32,
               max_position_embeddings=65536, rope_theta=500000.0, sliding_window=4096,
               rope_scaling={"attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1, "factor": 8.0,
                             "original_max_position_embeddings": 8192, "rope_type": "yarn"})
    ours = ModelConfig.from_hf(hub)
    theirs = transformers.Olmo3Config(**{k: v for k, v in hub.items() if k != "architectures"})
    for rope, layer_type in ((ours.rope, "full_attention"), (ours.local_rope, "sliding_attention")):
        expected = RopeConfig.from_params(theirs.rope_parameters[layer_type], max_position_embeddings=65536)
        assert rope == expected, layer_type
    assert ours.rope.scaling_type == "yarn" and ours.rope.attention_factor == pytest.approx(1.2079441541679836)
    assert ours.sliding_windows == tuple(4096 if kind == "sliding_attention" else 0 for kind in theirs.layer_types)


def test_gemma3_hub_config_read_as_hf_reads_it():
    """A Gemma 3 config.json in the Hub's older spelling (`rope_theta`, `rope_local_base_freq`,
    `rope_scaling`, `sliding_window_pattern`, no `layer_types`): jpaged's layer windows and RoPE
    are what HF's own config class makes of it."""
    from jpaged.config import ModelConfig

    hub = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
               intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
               head_dim=256, max_position_embeddings=32768, query_pre_attn_scalar=256, sliding_window=512,
               sliding_window_pattern=6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
               rope_scaling={"rope_type": "linear", "factor": 8.0}, hidden_activation="gelu_pytorch_tanh",
               final_logit_softcapping=None, attn_logit_softcapping=None, rms_norm_eps=1e-6, bos_token_id=2,
               eos_token_id=1)
    ours = ModelConfig.from_hf(hub)
    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in hub.items() if k != "architectures"})
    assert ours.sliding_windows == tuple(512 if kind == "sliding_attention" else 0 for kind in theirs.layer_types)
    assert ours.sliding_windows.count(0) == 4  # layers 5, 11, 17 and 23 are global
    full, local = theirs.rope_parameters["full_attention"], theirs.rope_parameters["sliding_attention"]
    assert (ours.rope.theta, ours.rope.scaling_type, ours.rope.factor) == (full["rope_theta"], "linear", full["factor"])
    assert (ours.local_rope.theta, ours.local_rope.scaling_type) == (local["rope_theta"], "default")
    assert ours.attention_scale == theirs.query_pre_attn_scalar**-0.5 and ours.final_logit_softcapping is None
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings  # the key absent: HF's Gemma default, tied
    # HF's Gemma 3 keeps attn_logit_softcapping but never applies it; Gemma 2 does (50 by default)
    assert ModelConfig.from_hf({**hub, "attn_logit_softcapping": 50.0}).attn_logit_softcapping is None
    gemma2 = {**{k: v for k, v in hub.items() if not k.endswith("softcapping")},
              "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}
    assert ModelConfig.from_hf(gemma2).attn_logit_softcapping == transformers.Gemma2Config().attn_logit_softcapping
    # a window past every context still marks Gemma 3's local layers, which keep their own RoPE
    assert ModelConfig.from_hf({**hub, "sliding_window": 40_000}).sliding_windows == tuple(
        40_000 if w else 0 for w in ours.sliding_windows)
    # without `architectures` (a config made by hand), its model_type says what it is, as for HF's Auto classes
    assert ModelConfig.from_hf({k: v for k, v in hub.items() if k != "architectures"}) == ours
    with pytest.raises(ValueError, match="'gemma3' is not supported"):
        ModelConfig.from_hf({**{k: v for k, v in hub.items() if k != "architectures"}, "model_type": "gemma3"})
    # EmbeddingGemma's bidirectional layers: HF's config halves the window (each way)
    bidirectional = ModelConfig.from_hf({**hub, "use_bidirectional_attention": True})
    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in hub.items() if k != "architectures"},
                                           use_bidirectional_attention=True)
    assert bidirectional.bidirectional and not ours.bidirectional
    assert bidirectional.sliding_windows == tuple(theirs.sliding_window if w else 0 for w in ours.sliding_windows)
    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in hub.items() if k not in ("architectures", "sliding_window")},
                                           use_bidirectional_attention=True, sliding_window=0)  # saved from a window of 1
    assert ModelConfig.from_hf({**hub, "use_bidirectional_attention": True, "sliding_window": 0}).sliding_windows == tuple(
        theirs.sliding_window if w else 0 for w in ours.sliding_windows)
    with pytest.raises(ValueError, match="gemma2: use_bidirectional_attention=True"):
        ModelConfig.from_hf({**gemma2, "use_bidirectional_attention": True})
