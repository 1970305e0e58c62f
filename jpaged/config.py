"""Configuration: what the model is, how the KV cache is sized, how the scheduler batches.

`ModelConfig` is read from an HF `config.json` (or built from GGUF metadata in the same shape);
`CacheConfig`, `SchedulerConfig` and `SpeculativeConfig` are the engine's knobs; `EngineConfig`
bundles them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from dataclasses import dataclass, field, fields

import numpy as np

from jpaged.image_tiles import num_image_tokens
from jpaged.pooling import CLASSIFIER_SUFFIX, RUNNERS, TOKEN_CLASSIFIER_SUFFIX, check_pooler_config
from jpaged.reasoning import REASONING_PARSERS
from jpaged.sampling_params import LOGPROBS_MODES, MAX_LOGPROBS, as_bool, is_integer

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Phi3ForCausalLM": "phi3",
    "GraniteForCausalLM": "granite",
    "GraniteMoeForCausalLM": "granitemoe",
    "Olmo2ForCausalLM": "olmo2",
    "Olmo3ForCausalLM": "olmo3",
    "SmolLM3ForCausalLM": "smollm3",
    "GptOssForCausalLM": "gpt_oss",
    "Exaone4ForCausalLM": "exaone4",
    "SeedOssForCausalLM": "seed_oss",
    "MinistralForCausalLM": "mistral",
    "Ministral3ForCausalLM": "mistral",
    "Ernie4_5ForCausalLM": "ernie4_5",
    "Glm4ForCausalLM": "glm4",
    "GlmForCausalLM": "glm",
    "HeliumForCausalLM": "helium",
}
# Base models without an LM head (an embedding model's checkpoint), and sequence and token
# classifiers (a `score` head instead of the LM head), all for runner "pooling"
SUPPORTED_ARCHITECTURES.update({name.replace("ForCausalLM", suffix).replace("Gemma3Model", "Gemma3TextModel"): arch
                                for name, arch in list(SUPPORTED_ARCHITECTURES.items())
                                for suffix in ("Model", CLASSIFIER_SUFFIX, TOKEN_CLASSIFIER_SUFFIX)})
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "mixtral",
               "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "gemma": "gemma", "gemma2": "gemma2",
               "gemma3_text": "gemma3", "phi3": "phi3", "granite": "granite", "granitemoe": "granitemoe",
               "olmo2": "olmo2", "olmo3": "olmo3", "smollm3": "smollm3", "gpt_oss": "gpt_oss", "exaone4": "exaone4",
               "seed_oss": "seed_oss", "ministral": "mistral", "ministral3": "mistral",
               "ernie4_5": "ernie4_5", "glm4": "glm4", "glm": "glm", "helium": "helium"}
# The projections the model keeps fused, each with its parts in order (`models/llama.py`); Phi-3's
# checkpoints (and so its LoRA adapters) name them so too.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# architectures whose `attention_bias` puts biases on q / k / v (gpt-oss's, also on o: `o_bias`)
_QKV_BIAS_FLAG = ("gpt_oss", "seed_oss", "glm4", "glm", "helium")
# settings config.json may leave out, as HF's config classes fill them
_HF_DEFAULTS = {"seed_oss": {"head_dim": 128, "attention_bias": True},
                "glm4": {"head_dim": 128, "attention_bias": True},
                "glm": {"head_dim": 128, "attention_bias": True},
                "helium": {"head_dim": 128, "attention_bias": False},
                "ernie4_5": {"head_dim": 128, "tie_word_embeddings": True}}
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512  # tokens per step where the config leaves it open
DTYPE_ALIASES = {"float": "float32", "half": "float16"}  # vLLM's other names for the compute dtypes


def _check_integers(config, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """ValueError naming the first of `names` on `config` that is not an integer (nor None, for
    the `optional` ones)."""
    for name in names:
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if not is_integer(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")


def _check_amount(config, name: str, allow_zero: bool = False) -> None:
    """ValueError naming `name` on `config` unless it is a finite number > 0 (>= 0 with `allow_zero`)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")


@dataclass(frozen=True)
class RopeConfig:
    """A model's rotary embedding: its base `theta` and scaling.

    `scaling_type` "default", "linear" (positions divided by `factor`), "llama3" (Llama 3.1's
    banded frequency scaling), "yarn" (YaRN, Peng et al. 2023: frequencies that turn fewer than
    `beta_slow` times over the original context divided by `factor`, those that turn more than
    `beta_fast` times kept, a linear ramp between, and cos / sin multiplied by `attention_factor`)
    or "longrope" (Phi-3's LongRoPE, Ding et al. 2024: each frequency divided by its own factor,
    `short_factor` or `long_factor`, and cos / sin multiplied by `attention_factor`). HF picks
    LongRoPE's factors per forward pass from the batch's longest position; jpaged, as vLLM, picks
    them once per engine (`for_context`): the long ones when `max_model_len` passes
    `original_max_position_embeddings`.
    """

    theta: float = 10000.0
    scaling_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0  # cos and sin are multiplied by it (YaRN, LongRoPE)
    use_long_factor: bool = False
    beta_fast: float = 32.0  # YaRN's ramp, in rotations over the original context
    beta_slow: float = 1.0
    truncate: bool = True  # YaRN: the ramp's ends rounded to whole dims, as HF by default
    # Qwen2-VL's multimodal RoPE: how many of the frequencies (in order) each of a token's three
    # positions (time, height, width) turns; interleaved (Qwen3-VL): t, h, w, t, h, w, ... instead
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False

    @classmethod
    def from_hf(cls, hf: dict, params: dict | None = None, default_theta: float | None = None) -> RopeConfig:
        """From HF config `hf`'s rope parameters (transformers 5 keeps theta and scaling in
        `rope_parameters`; older configs split them into `rope_theta` and `rope_scaling`), or from
        `params`, one layer type's, with `default_theta` where they name no `rope_theta`."""
        if params is None:
            params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        params = dict(params)
        if params.get("rope_type", params.get("type")) in ("llama3", "yarn", "longrope", "su"):
            # as HF's standardize_rope_params: the config's own (Phi-3 keeps it beside its rope
            # scaling) first, else the rope parameters', else max_position_embeddings
            if "original_max_position_embeddings" in hf:
                params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
            elif "max_position_embeddings" in hf:
                params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
        theta = default_theta if default_theta is not None else float(hf.get("rope_theta", 10000.0))
        return cls.from_params(params, theta, hf.get("max_position_embeddings"))

    @classmethod
    def from_params(cls, params: dict, default_theta: float = 10000.0,
                    max_position_embeddings: int | None = None) -> RopeConfig:
        """From one set of HF rope parameters (`rope_type`, `rope_theta`, `factor`, ...);
        `max_position_embeddings` sets LongRoPE's default factor, as in HF."""
        if params.get("mrope_section"):
            plain = {key: value for key, value in params.items() if key not in ("mrope_section", "mrope_interleaved")}
            return dataclasses.replace(cls.from_params(plain, default_theta, max_position_embeddings),
                                       mrope_section=tuple(int(n) for n in params["mrope_section"]),
                                       mrope_interleaved=bool(params.get("mrope_interleaved", False)))
        theta = float(params.get("rope_theta", default_theta))
        scaling_type = params.get("rope_type", params.get("type", "default")) or "default"
        # Phi-3's first name for LongRoPE; Qwen2-VL's for plain RoPE beside its sections (read above)
        scaling_type = {"su": "longrope", "mrope": "default"}.get(scaling_type, scaling_type)
        if scaling_type not in ("default", "linear", "llama3", "yarn", "longrope"):
            raise ValueError(f"rope scaling type {scaling_type!r} is not supported "
                             "(supported: default, linear, llama3, yarn, longrope)")
        if scaling_type == "default":
            return cls(theta=theta)
        if scaling_type == "linear":
            return cls(theta=theta, scaling_type="linear", factor=float(params["factor"]))
        if scaling_type == "longrope":
            return cls._longrope(params, theta, max_position_embeddings)
        if scaling_type == "yarn":
            return cls._yarn(params, theta, max_position_embeddings)
        return cls(
            theta=theta,
            scaling_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )

    @classmethod
    def _longrope(cls, params: dict, theta: float, max_position_embeddings: int | None) -> RopeConfig:
        """LongRoPE as HF's `_compute_longrope_parameters` reads it: `factor` defaults to
        max_position_embeddings / original_max_position_embeddings, and the attention factor to
        sqrt(1 + ln(factor) / ln(original)) (1 where factor <= 1)."""
        missing = [key for key in ("short_factor", "long_factor", "original_max_position_embeddings")
                   if key not in params]
        if missing:
            raise ValueError(f"longrope rope scaling needs {missing}")
        original, factor = _original_and_factor(params, max_position_embeddings, "longrope")
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return cls(theta=theta, scaling_type="longrope", factor=factor, original_max_position_embeddings=original,
                   short_factor=_factor_list(params, "short_factor"), long_factor=_factor_list(params, "long_factor"),
                   attention_factor=float(attention_factor))

    def check_rotary_dim(self, rotary_dim: int) -> None:
        """ValueError where LongRoPE's factor lists are not one per rotary pair, or where
        `mrope_section` needs more frequencies than a head has."""
        if self.mrope_section and sum(self.mrope_section) > rotary_dim // 2:
            raise ValueError(f"mrope_section {list(self.mrope_section)} covers {sum(self.mrope_section)} frequencies, "
                             f"more than the {rotary_dim // 2} of a head")
        for name in ("short_factor", "long_factor"):
            factors = getattr(self, name)
            if self.scaling_type == "longrope" and len(factors) != rotary_dim // 2:
                raise ValueError(f"longrope {name} has {len(factors)} entries, expected one per rotary pair: "
                                 f"{rotary_dim // 2} (rotary dims {rotary_dim} / 2)")

    @classmethod
    def _yarn(cls, params: dict, theta: float, max_position_embeddings: int | None) -> RopeConfig:
        """YaRN as HF's `_compute_yarn_parameters` reads it: `factor` defaults to
        max_position_embeddings / original_max_position_embeddings, the attention factor to
        0.1 ln(factor) + 1 (or the ratio of that at `mscale` and at `mscale_all_dim`, DeepSeek's)."""
        original, factor = _original_and_factor(params, max_position_embeddings, "yarn")

        def mscale(scale: float = 1.0) -> float:
            return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            scale, scale_all = params.get("mscale"), params.get("mscale_all_dim")
            attention_factor = mscale(scale) / mscale(scale_all) if scale and scale_all else mscale()
        return cls(theta=theta, scaling_type="yarn", factor=factor, original_max_position_embeddings=original,
                   attention_factor=float(attention_factor), beta_fast=float(params.get("beta_fast") or 32),
                   beta_slow=float(params.get("beta_slow") or 1), truncate=bool(params.get("truncate", True)))

    def for_context(self, max_model_len: int) -> RopeConfig:
        """This rotation for an engine of `max_model_len` tokens: LongRoPE takes its long
        factors where that passes `original_max_position_embeddings` (vLLM's choice), else its
        short ones; other scalings are unchanged."""
        if self.scaling_type != "longrope":
            return self
        return dataclasses.replace(self, use_long_factor=max_model_len > self.original_max_position_embeddings)

    def position_rows(self, rotary_dim: int) -> np.ndarray:
        """Which of a token's three multimodal positions (0 time, 1 height, 2 width) each of the
        `rotary_dim // 2` frequencies turns by (int32), as HF's Qwen2-VL / Qwen3-VL RoPE; the
        frequencies past the sections (none in the shipped configs) turn by time (sections that
        fit: `check_rotary_dim`, at config load)."""
        num = rotary_dim // 2
        rows = np.zeros(num, np.int32)
        if self.mrope_interleaved:
            for row in (1, 2):
                rows[row:3 * self.mrope_section[row]:3] = row
        else:
            rows[:sum(self.mrope_section)] = np.repeat(np.arange(len(self.mrope_section)), self.mrope_section)
        return rows

    def inv_freq(self, rotary_dim: int) -> np.ndarray:
        """Per-pair rotation frequencies, float32 [rotary_dim // 2]."""
        inv_freq = 1.0 / (self.theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
        if self.scaling_type == "llama3":
            inv_freq = self._llama3_scale(inv_freq)
        elif self.scaling_type == "linear":
            inv_freq = inv_freq / self.factor
        elif self.scaling_type == "yarn":
            inv_freq = self._yarn_scale(inv_freq, rotary_dim)
        elif self.scaling_type == "longrope":  # one factor per pair: checked by ModelConfig
            inv_freq = inv_freq / np.asarray(self.long_factor if self.use_long_factor else self.short_factor, np.float64)
        return inv_freq.astype(np.float32)

    def _yarn_scale(self, inv_freq: np.ndarray, rotary_dim: int) -> np.ndarray:
        def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times over the original context
            return rotary_dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        ramp = np.clip((np.arange(rotary_dim // 2) - low) / ((high + 0.001 if low == high else high) - low), 0, 1)
        return inv_freq / self.factor * ramp + inv_freq * (1 - ramp)

    def _llama3_scale(self, inv_freq: np.ndarray) -> np.ndarray:
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
        return np.where(is_medium, smoothed, scaled)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES' values
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (every layer alike: one layer body serves all); num_experts 0 = dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0 = none
    # Each layer's sliding attention window in tokens (0: it attends to the whole context); () when no
    # layer has one. A query at position p sees keys p - window + 1 .. p.
    sliding_windows: tuple[int, ...] = ()
    # Other families' differences from Llama (the defaults are Llama's): the gated MLP's activation
    # ("silu" or "gelu_tanh"); norms scale by (offset + weight) (Gemma); embeddings are multiplied
    # by `embedding_multiplier` (rounded to the model's dtype, as HF does; Gemma, Granite); where
    # the norms sit (`norm_layout`): "pre" (Llama: before attention and before the MLP),
    # "sandwich" (Gemma 2 / 3: also on attention's and the MLP's outputs) or "post" (OLMo 2: only
    # on their outputs); queries scaled by `attention_scale` (None: head_dim ** -0.5); the windowed
    # layers' own RoPE; attention scores and logits soft-capped at `attn_logit_softcapping` and
    # `final_logit_softcapping` (cap * tanh(x / cap)); RoPE on the first `rotary_dim` dims of each
    # head only (Phi-4-mini; None: all); attention's and the MLP's outputs multiplied by
    # `residual_multiplier` and logits divided by `logits_scaling` (Granite); q / k norms over all
    # heads at once rather than per head (`qk_norm_over_heads`, OLMo 2); which layers apply RoPE
    # at all (`rope_layers`, one bool per layer; () where all do: SmolLM3's NoPE layers do not);
    # queries after RoPE multiplied by 1 + `query_scale_beta` * ln(1 + floor(position /
    # `query_scale_period`)) (Ministral 3's `llama_4_scaling_beta`: 0, none).
    # `multiplies_input_embeds`: the multiplier also scales embeddings given in place of tokens
    # (images, embeds prompts), as HF's Granite scales its `inputs_embeds`; otherwise it is part of
    # the table lookup, as HF's Gemma embedding module applies it.
    hidden_act: str = "silu"
    norm_weight_offset: float = 0.0
    embedding_multiplier: float = 1.0
    multiplies_input_embeds: bool = False
    norm_layout: str = "pre"
    attention_scale: float | None = None
    local_rope: RopeConfig | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    rotary_dim: int | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    qk_norm_over_heads: bool = False
    rope_layers: tuple[bool, ...] = ()
    query_scale_beta: float = 0.0
    query_scale_period: int = 1
    # RoPE pairs dims 2i and 2i + 1 (GLM, ERNIE 4.5) rather than i and i + d/2: the q / k rows are
    # reordered when read (`loader/rope_rows.py`), and the model computes rotate-half RoPE as always
    rope_interleaved: bool = False
    # gpt-oss: a bias on attention's output projection (`o_bias`); a learned logit per query head
    # that joins each softmax's denominator (`attention_sinks`, Xiao et al. 2023's attention sinks as
    # gpt-oss learns them); biases on the router and on every expert's projections (`moe_bias`);
    # experts whose SwiGLU clamps the gate at `swiglu_limit` from above and the up projection to
    # [-limit, limit], then computes `(up + 1) * gate * sigmoid(swiglu_alpha * gate)`
    # (`swiglu_limit` None: the plain SiLU-gated experts).
    o_bias: bool = False
    attention_sinks: bool = False
    moe_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.0
    # Every token of a prompt sees every other, later ones too (EmbeddingGemma's
    # `use_bidirectional_attention`: an embedding model, read whole in one step); a windowed
    # layer's query at position p sees keys p - window + 1 .. p + window - 1
    bidirectional: bool = False
    # Qwen3-VL's DeepStack: image embeddings for this many first layers, each added to the image
    # tokens' hidden states after its layer (set by the engine when it reads images)
    deepstack_layers: int = 0

    def __post_init__(self):
        for rope in (self.rope, self.local_rope):
            if rope is not None:
                rope.check_rotary_dim(self.rotary_dim or self.head_dim)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def kv_window(self) -> int | None:
        """The most keys a query of any layer sees back, itself included, when every layer has a
        sliding window; None when some layer attends to the whole context."""
        if self.sliding_windows and all(self.sliding_windows):
            return max(self.sliding_windows)
        return None

    @classmethod
    def from_hf(cls, hf: dict, generation_config: dict | None = None) -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and not archs:  # a config without `architectures`: its model_type, as HF's Auto classes read it
            arch = MODEL_TYPES.get(hf.get("model_type"))
        if arch is None:
            raise ValueError(
                f"architecture {archs or hf.get('model_type')!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if arch == "gpt_oss":
            hf = _gpt_oss_defaults(hf)
        hf = {**_HF_DEFAULTS.get(arch, {}), **hf}
        if arch == "ernie4_5" and hf.get("use_bias"):
            raise ValueError("ernie4_5: use_bias=True (biases on every projection) is not supported")
        if not arch.startswith("gemma") and hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (supported: silu)")
        for flag, what in (("attention_bias", "q / k / v / o projection biases"), ("mlp_bias", "MLP biases")):
            if hf.get(flag) and not (arch in _QKV_BIAS_FLAG and flag == "attention_bias"):
                raise ValueError(f"{flag}=True ({what}) is not supported: jpaged's Llama-family layers have "
                                 "biases only on q / k / v, as Qwen2's")
        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        eos = (generation_config or {}).get("eos_token_id", hf.get("eos_token_id"))
        max_positions = int(hf.get("max_position_embeddings", 2048))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        fields = dict(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(hf),
            rotary_dim=_rotary_dim(hf, int(head_dim)),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch.startswith("gemma") or arch == "smollm3")),
            qkv_bias=arch == "qwen2" or (arch == "qwen2_moe" and bool(hf.get("qkv_bias", True)))
            or (arch in _QKV_BIAS_FLAG and bool(hf.get("attention_bias", True))),
            qk_norm=arch in ("qwen3", "qwen3_moe", "olmo2", "olmo3", "exaone4"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_windows=layer_windows(arch, hf),
            **_query_scale(hf),
            **ModelConfig._moe_fields(arch, hf),
        )
        for key, name in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                          ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads"),
                          ("num_key_value_heads", "num_kv_heads"), ("max_position_embeddings", "max_position_embeddings")):
            if fields[name] < 1:
                raise ValueError(f"config.json's {key} must be >= 1, got {fields[name]}")
        family = _gemma_fields(arch, hf) if arch.startswith("gemma") else _FAMILY_FIELDS.get(arch, lambda hf: {})(hf)
        return cls(**{**fields, **family})

    @staticmethod
    def _moe_fields(arch: str, hf: dict) -> dict:
        """The MoE fields of `ModelConfig`, read as HF's modeling code reads them (defaults included).

        Mixtral always renormalises its top-k softmax weights; Qwen MoE models do so when
        `norm_topk_prob`, and Qwen2-MoE adds a shared expert behind a sigmoid gate.
        """
        if arch not in ("mixtral", "granitemoe", "qwen2_moe", "qwen3_moe", "gpt_oss"):
            return {}
        if arch in ("mixtral", "granitemoe", "gpt_oss"):  # a softmax over the top-k logits is the same
            num_experts = int(hf.get("num_local_experts", hf.get("num_experts", 8)))
            fields = dict(moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True,
                          num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)))
        else:
            defaults = {"qwen2_moe": (60, 4, 1408), "qwen3_moe": (128, 8, 768)}[arch]
            num_experts = int(hf.get("num_experts", hf.get("num_local_experts", defaults[0])))
            fields = dict(moe_intermediate_size=int(hf.get("moe_intermediate_size", defaults[2])),
                          norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                          num_experts_per_tok=int(hf.get("num_experts_per_tok", defaults[1])))
            if num_experts == 0:
                return {}  # HF builds every layer as a dense MLP
            if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1)) != 1:
                raise ValueError(
                    f"{arch}: mlp_only_layers {hf.get('mlp_only_layers')!r} / decoder_sparse_step "
                    f"{hf.get('decoder_sparse_step')!r} make some layers dense; jpaged runs every layer through one layer body, "
                    "so all must be MoE (supported: mlp_only_layers [] and decoder_sparse_step 1)"
                )
            if arch == "qwen2_moe":
                fields["shared_expert_intermediate_size"] = int(hf.get("shared_expert_intermediate_size", 5632))
        if not 0 < fields["num_experts_per_tok"] <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {num_experts}] (num_experts), "
                             f"got {fields['num_experts_per_tok']}")
        return dict(num_experts=num_experts, **fields)


def _gemma_fields(arch: str, hf: dict) -> dict:
    """The `ModelConfig` fields of Gemma (HF's `GemmaConfig`), Gemma 2 (`Gemma2Config`) and Gemma 3's text model
    (`Gemma3TextConfig`, old and new spellings of its RoPE settings, and bidirectional attention);
    ValueError for what jpaged does not run (bidirectional attention outside Gemma 3, activations
    other than tanh-approximated GELU)."""
    key = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
    act = hf.get(key) or "gelu_pytorch_tanh"
    if arch == "gemma" and act == "gelu":  # Gemma's first releases' name for the tanh GELU, as HF reads it
        act = "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):  # HF's names of the tanh-approximated GELU
        raise ValueError(f"{arch}: {key} {act!r} is not supported (supported: gelu_pytorch_tanh, gelu_new)")
    if hf.get("use_bidirectional_attention") and arch != "gemma3":
        raise ValueError(f"{arch}: use_bidirectional_attention=True (bidirectional attention) is not supported")
    # HF's Gemma 3 keeps attn_logit_softcapping in its config but never applies it.
    defaults = {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0} if arch == "gemma2" else {}
    caps = {name: float(cap) if (cap := hf.get(name, defaults.get(name))) else None
            for name in ("final_logit_softcapping", "attn_logit_softcapping")[:2 if arch == "gemma2" else 1]}
    common = dict(hidden_act="gelu_tanh", norm_weight_offset=1.0, embedding_multiplier=float(hf["hidden_size"]) ** 0.5)
    if arch == "gemma":
        return common
    common.update(norm_layout="sandwich", attention_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5, **caps)
    if arch == "gemma2":
        return common
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        rope = RopeConfig.from_hf(hf, params.get("full_attention") or {}, 1_000_000.0)
        local_rope = RopeConfig.from_hf(hf, params.get("sliding_attention") or {}, 10_000.0)
    else:
        rope = RopeConfig.from_hf(hf, default_theta=float(hf.get("rope_theta", 1e6)))
        local_rope = RopeConfig(theta=float(hf.get("rope_local_base_freq", 10_000.0)))
    fields = dict(common, rope=rope, local_rope=local_rope, qk_norm=True)
    if hf.get("use_bidirectional_attention"):  # EmbeddingGemma: HF's config halves the window (0 too), each way
        window = hf.get("sliding_window")
        halved = {**hf, "sliding_window": window // 2 + 1} if is_integer(window) and window >= 0 else hf
        fields.update(bidirectional=True, sliding_windows=layer_windows(arch, halved))
    return fields


def _original_and_factor(params: dict, max_position_embeddings: int | None, kind: str) -> tuple[int, float]:
    """`(original_max_position_embeddings, factor)` of YaRN or LongRoPE parameters; `factor`
    defaults to max_position_embeddings / original, as HF's. ValueError where the original is missing."""
    if "original_max_position_embeddings" not in params:
        raise ValueError(f"{kind} rope scaling needs original_max_position_embeddings")
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor")
    return original, float(factor) if factor is not None else (max_position_embeddings or original) / original


def _factor_list(params: dict, name: str) -> tuple[float, ...]:
    """LongRoPE's `name` factors as floats; ValueError naming them where they are not a list of numbers."""
    value = params[name]
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(f, numbers.Real) and not isinstance(f, bool) and math.isfinite(f) and f > 0 for f in value):
        raise ValueError(f"longrope {name} must be a list of positive numbers, one per rotary pair, got {value!r:.80}")
    return tuple(float(f) for f in value)


def _rotary_dim(hf: dict, head_dim: int) -> int | None:
    """The dims of each head that RoPE rotates (HF's `partial_rotary_factor`, at the top of the
    config or in its rope parameters), None for all of them."""
    factor = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if not 0.0 < float(factor) <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {factor!r}")
    rotary_dim = int(head_dim * float(factor))
    if rotary_dim % 2:
        raise ValueError(f"partial_rotary_factor {factor} leaves {rotary_dim} rotary dims of {head_dim}: RoPE "
                         "rotates pairs, so they must be even")
    return None if rotary_dim == head_dim else rotary_dim


def _gpt_oss_defaults(hf: dict) -> dict:
    """A gpt-oss config.json with the settings it leaves out filled in as HF's `GptOssConfig` fills
    them: 128 experts, 4 per token, every other layer windowed (128 tokens), YaRN RoPE (factor 32
    over 4,096 positions, base 150,000, ramp ends not rounded)."""
    yarn = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 4096}
    filled = {"num_local_experts": 128, "num_experts_per_tok": 4, "sliding_window": 128, "head_dim": 64,
              "rope_theta": (hf.get("rope_parameters") or {}).get("rope_theta", 150_000.0), **hf}
    if not hf.get("rope_parameters") and not hf.get("rope_scaling"):
        filled["rope_parameters"] = {**yarn, "rope_theta": filled["rope_theta"]}
    return filled


def _gpt_oss_fields(hf: dict) -> dict:
    """gpt-oss's sinks, biases and clamped SwiGLU experts (see `ModelConfig`)."""
    return dict(o_bias=bool(hf.get("attention_bias", True)), attention_sinks=True, moe_bias=True,
                swiglu_limit=float(hf.get("swiglu_limit", 7.0)), swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)))


def _granite_fields(hf: dict) -> dict:
    """Granite's multipliers, as HF's `GraniteConfig` names them (1.0 where absent)."""
    return dict(embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)), multiplies_input_embeds=True,
                residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
                attention_scale=float(hf.get("attention_multiplier", 1.0)),
                logits_scaling=float(hf.get("logits_scaling", 1.0)))


def _olmo3_ropes(hf: dict) -> dict:
    """OLMo 3's RoPE of its full and its windowed layers, as HF's `Olmo3Config` reads them: from
    `rope_parameters` per layer type, or in an older config.json the `rope_scaling` and
    `rope_theta` of the full layers, the windowed ones then at the default base of 500,000."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, sliding = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        full, sliding = {**(hf.get("rope_scaling") or {}), **params, "rope_theta": hf.get("rope_theta", 500_000.0)}, {}
    rope, local = (RopeConfig.from_hf(hf, p, 500_000.0) for p in (full, sliding))
    return dict(rope=rope, local_rope=None if local == rope else local)


def _rope_flags(hf: dict) -> list[bool]:
    """Which layers of a SmolLM3 config apply RoPE: `no_rope_layers` (1: RoPE, 0: none), or
    every layer but each `no_rope_layer_interval`-th, as HF's `SmolLM3Config` fills it in."""
    num_layers = int(hf["num_hidden_layers"])
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = int(hf.get("no_rope_layer_interval", 4))
        return [(i + 1) % interval != 0 for i in range(num_layers)]
    if len(flags) != num_layers:
        raise ValueError(f"no_rope_layers must have one entry per layer ({num_layers}), got {len(flags)}")
    return [bool(flag) for flag in flags]


# Fields of the families whose configs need more than `from_hf`'s common reading.
_FAMILY_FIELDS = {
    "granite": _granite_fields,
    "granitemoe": _granite_fields,
    "olmo2": lambda hf: dict(norm_layout="post", qk_norm_over_heads=True),
    "olmo3": lambda hf: dict(norm_layout="post", qk_norm_over_heads=True, **_olmo3_ropes(hf)),
    "smollm3": lambda hf: dict(rope_layers=() if all(flags := _rope_flags(hf)) else tuple(flags)),
    "gpt_oss": _gpt_oss_fields,
    "exaone4": lambda hf: dict(norm_layout="post", rope_layers=_exaone4_rope_layers(hf)),
    "seed_oss": lambda hf: dict(o_bias=bool(hf.get("attention_out_bias", False))),
    "ernie4_5": lambda hf: dict(rope_interleaved=True),
    "glm4": lambda hf: dict(rope_interleaved=True, norm_layout="sandwich"),
    "glm": lambda hf: dict(rope_interleaved=True),
    "helium": lambda hf: dict(rope_interleaved=True),
}


def _query_scale(hf: dict) -> dict:
    """The query scaling by position of Ministral 3 (its rope parameters' `llama_4_scaling_beta`,
    over their `original_max_position_embeddings`), as HF's `Ministral3Attention` applies it."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    beta = params.get("llama_4_scaling_beta")
    if not beta:
        return {}
    period = params.get("original_max_position_embeddings")
    if not is_integer(period) or period < 1:
        raise ValueError(f"llama_4_scaling_beta needs the rope parameters' original_max_position_embeddings, an "
                         f"integer >= 1, got {period!r}")
    return dict(query_scale_beta=float(beta), query_scale_period=int(period))


def _exaone4_rope_layers(hf: dict) -> tuple[bool, ...]:
    """Which layers of an EXAONE 4 config apply RoPE: with windows, only the windowed ones (its
    global layers are NoPE, as HF's `Exaone4Attention` reads them); () where every layer does."""
    windows = layer_windows("exaone4", hf)
    return tuple(window > 0 for window in windows) if windows and not all(windows) else ()


def layer_windows(arch: str, hf: dict) -> tuple[int, ...]:
    """Each layer's sliding window (0: none) as HF's modeling code applies them, or () where no
    layer has one (a window past every context still marks its layer as local: Gemma 3's local
    layers have a RoPE of their own).

    `layer_types` ("sliding_attention" / "full_attention") names the windowed layers where the
    config has it; otherwise Mistral and Mixtral window every layer, and the Qwen families the
    layers from `max_window_layers` on. The Qwen families have no window without `use_sliding_window`.
    """
    num_layers = int(hf["num_hidden_layers"])
    window = hf.get("sliding_window")
    if not window or ((arch.startswith("qwen") or arch == "smollm3") and not hf.get("use_sliding_window", False)):
        return ()
    if not is_integer(window) or window < 1:
        raise ValueError(f"sliding_window must be an integer >= 1, got {window!r}")
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
            raise ValueError(f"layer_types must name 'sliding_attention' or 'full_attention' for each of the "
                             f"{num_layers} layers, got {layer_types!r}")
        windowed = [kind == "sliding_attention" for kind in layer_types]
    elif arch in ("mistral", "mixtral", "phi3"):
        windowed = [True] * num_layers
    elif arch in ("gemma2", "gpt_oss"):  # every other layer, as HF's Gemma2Config and GptOssConfig lay them out
        windowed = [i % 2 == 0 for i in range(num_layers)]
    elif arch == "olmo3":  # HF's default: every fourth layer is global
        windowed = [(i + 1) % 4 != 0 for i in range(num_layers)]
    elif arch == "smollm3":  # HF's default: the NoPE layers are windowed
        windowed = [not rope for rope in _rope_flags(hf)]
    elif arch == "gemma3":  # configs from before `layer_types`: every `sliding_window_pattern`-th layer is global
        pattern = int(hf.get("sliding_window_pattern", 6))
        windowed = [(i + 1) % pattern != 0 for i in range(num_layers)]
    elif arch == "exaone4":  # `sliding_window_pattern`: every N-th layer global, or a string such as "LLLG" repeated
        pattern = hf.get("sliding_window_pattern", 4)
        windowed = ([pattern[i % len(pattern)] == "L" for i in range(num_layers)] if isinstance(pattern, str)
                    else [(i + 1) % int(pattern) != 0 for i in range(num_layers)])
    elif hf.get("use_sliding_window", False):
        first = int(hf.get("max_window_layers", num_layers))
        windowed = [i >= first for i in range(num_layers)]
    else:
        windowed = [False] * num_layers
    if not any(windowed):
        return ()
    return tuple(int(window) if w else 0 for w in windowed)


VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")
# a vision_config's settings where it leaves them out: LLaVA's CLIP ViT-L/14-336, and SigLIP's as transformers defaults them
_TOWER_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
}


@dataclass(frozen=True)
class VisionConfig:
    """A LLaVA model's vision tower and projector (`LlavaForConditionalGeneration`'s and
    `LlavaNextForConditionalGeneration`'s config.json): a CLIP tower (with a `class_token` before
    the patches) or a SigLIP one (without), images of `image_size` pixels cut into `patch_size`
    patches, the states of `feature_layers` (indices into the tower's states, the embeddings' being
    0; several are concatenated), the first position's state (CLIP's class token) dropped where
    `drop_cls` (vLLM's and transformers' "default" feature selection), and a two-layer projector
    into the language model's embeddings.
    Each image becomes `image_tokens(height, width)` embeddings that replace as many
    `image_token_id` placeholders in the prompt: `tokens_per_image` for LLaVA, and for LLaVA-NeXT
    (`grid_pinpoints`, its `image_grid_pinpoints` as (height, width) pairs) that many for the
    whole image and more for its tiles (`jpaged/image_tiles.py`); LLaVA-OneVision's as
    LLaVA-NeXT's, its grid capped at `max_tiles` tiles (`vision_aspect_ratio` "anyres_max_N").

    Gemma 3 (`Gemma3ForConditionalGeneration`, `projector` "gemma3") takes its SigLIP tower's last
    states after the post-layernorm, average-pools them to `pooled_tokens` embeddings, then applies
    an RMSNorm and one projection. A prompt writes its start-of-image token (`prompt_token_id`)
    per image, widened to start, `pooled_tokens` image tokens and end (`placeholder_ids`), set
    apart by two newlines on each side that merge with newline tokens beside them
    (`newline_ids[k - 1]`: the token of k newlines, `with_newlines`), as Gemma 3's processor and
    tokenizer write them. Its language model reads each image's tokens bidirectionally (they see
    each other; `bidirectional`).

    PaliGemma (`PaliGemmaForConditionalGeneration`, `projector` "paligemma") projects the SigLIP
    tower's last states after the post-layernorm by one linear layer. Its images come before the
    prompt's text (`jpaged.images.prefix_images`), and its language model reads the whole prompt,
    images and text, bidirectionally (`prefix_lm`: a prefix LM); the output attends causally."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    feature_layers: tuple[int, ...]
    drop_cls: bool
    projector_act: str
    image_token_id: int
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    class_token: bool = True
    max_tiles: int = 0  # LLaVA-OneVision's cap on an image's grid (0: none, LLaVA-NeXT)
    projector: str = "mlp"  # "gemma3": pooled, normed and projected; "paligemma": one linear layer (see above)
    pooled_tokens: int = 0  # Gemma 3's embeddings per image (`mm_tokens_per_image`)
    start_token_id: int | None = None  # Gemma 3's start- and end-of-image tokens
    end_token_id: int | None = None
    newline_ids: tuple[int, ...] = ()

    @property
    def tokens_per_image(self) -> int:
        if self.pooled_tokens:
            return self.pooled_tokens
        return (self.image_size // self.patch_size) ** 2 + self.class_token - self.drop_cls

    @property
    def bidirectional(self) -> bool:
        """Whether the language model reads each image's tokens bidirectionally (Gemma 3)."""
        return self.projector == "gemma3"

    @property
    def prefix_lm(self) -> bool:
        """Whether the language model reads the whole prompt bidirectionally (PaliGemma)."""
        return self.projector == "paligemma"

    @property
    def prompt_token_id(self) -> int:
        """The token a prompt writes for each image (widened to `placeholder_ids`)."""
        return self.image_token_id if self.start_token_id is None else self.start_token_id

    @property
    def template_image_ids(self) -> list[int]:
        """The tokens a chat template that takes text gets for each image part."""
        return [self.prompt_token_id]

    def with_newlines(self, vocab: dict[str, int]) -> VisionConfig:
        """Gemma 3's newline tokens from the tokenizer's `vocab` (runs of one newline and up, while
        the vocabulary has them). ValueError for a vocabulary without the tokens of one and two
        newlines."""
        ids = []
        while "\n" * (len(ids) + 1) in vocab:
            ids.append(vocab["\n" * (len(ids) + 1)])
        if len(ids) < 2:
            raise ValueError("Gemma 3's tokenizer must hold tokens of one and two newlines, which set its images apart")
        return dataclasses.replace(self, newline_ids=tuple(ids))

    def image_tokens(self, height: int, width: int) -> int:
        """How many embeddings (and placeholders) an image of `height` x `width` pixels becomes."""
        if not self.grid_pinpoints:
            return self.tokens_per_image
        return num_image_tokens(height, width, self.grid_pinpoints, self.image_size, self.image_size // self.patch_size,
                                self.max_tiles)

    def placeholder_ids(self, height: int, width: int) -> list[int]:
        """The token ids an image of `height` x `width` pixels widens to: `image_tokens` image
        tokens (Gemma 3's between its start and end tokens)."""
        tokens = [self.image_token_id] * self.image_tokens(height, width)
        return tokens if self.start_token_id is None else [self.start_token_id, *tokens, self.end_token_id]

    @classmethod
    def from_hf(cls, hf: dict) -> VisionConfig:
        """From a LLaVA, LLaVA-NeXT or LLaVA-OneVision config.json; ValueError for a vision tower
        or setting jpaged does not run."""
        architectures = hf.get("architectures") or []
        if "Gemma3ForConditionalGeneration" in architectures:
            return cls._gemma3(hf)
        if "PaliGemmaForConditionalGeneration" in architectures:
            return cls._paligemma(hf)
        onevision = "LlavaOnevisionForConditionalGeneration" in architectures
        vision = hf.get("vision_config") or {}
        tower = vision.get("model_type", "siglip_vision_model" if onevision else "clip_vision_model")
        if tower not in _TOWER_DEFAULTS:
            raise ValueError(f"LLaVA's vision tower {tower!r} is not supported (supported: {', '.join(_TOWER_DEFAULTS)})")
        vision = _TOWER_DEFAULTS[tower] | vision
        tiled = onevision or "LlavaNextForConditionalGeneration" in architectures
        pinpoints = _grid_pinpoints(hf.get("image_grid_pinpoints"), int(vision["image_size"])) if tiled else ()
        if pinpoints and not onevision and tower != "clip_vision_model":
            raise ValueError(f"LLaVA-NeXT's vision tower {tower!r} is not supported (supported: clip_vision_model)")
        strategy = hf.get("vision_feature_select_strategy", "full" if onevision else "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported (supported: default, full)")
        if pinpoints and strategy != ("full" if onevision else "default"):
            raise ValueError(f"{'LLaVA-OneVision' if onevision else 'LLaVA-NeXT'}'s vision_feature_select_strategy "
                             f"{strategy!r} is not supported (supported: {'full' if onevision else 'default'})")
        num_layers = int(vision["num_hidden_layers"])
        layers = hf.get("vision_feature_layer", -1 if onevision else -2)
        layers = tuple(int(i) for i in (layers if isinstance(layers, list) else [layers]))
        if any(not -num_layers - 1 <= i <= num_layers for i in layers):
            raise ValueError(f"vision_feature_layer {layers} is outside the tower's {num_layers + 1} states")
        for name, act in (("vision_config.hidden_act", vision["hidden_act"]),
                          ("projector_hidden_act", hf.get("projector_hidden_act", "gelu"))):
            if act not in VISION_ACTIVATIONS:
                raise ValueError(f"{name} {act!r} is not supported (supported: {', '.join(VISION_ACTIVATIONS)})")
        return cls(
            hidden_size=int(vision["hidden_size"]),
            intermediate_size=int(vision["intermediate_size"]),
            num_layers=num_layers,
            num_heads=int(vision["num_attention_heads"]),
            image_size=int(vision["image_size"]),
            patch_size=int(vision["patch_size"]),
            layer_norm_eps=float(vision["layer_norm_eps"]),
            hidden_act=vision["hidden_act"],
            feature_layers=tuple(i % (num_layers + 1) for i in layers),
            drop_cls=strategy == "default",
            projector_act=hf.get("projector_hidden_act", "gelu"),
            image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 32000))),
            grid_pinpoints=pinpoints,
            class_token=tower == "clip_vision_model",
            max_tiles=_max_tiles(hf.get("vision_aspect_ratio", "anyres_max_9")) if onevision else 0,
        )

    @classmethod
    def _paligemma(cls, hf: dict) -> VisionConfig:
        """PaliGemma's SigLIP tower and linear projector, from its config.json (HF's
        `PaliGemmaConfig` defaults where it is silent)."""
        return cls(**_last_siglip_state(hf), image_token_id=int(hf.get("image_token_index", hf.get("image_token_id",
                                                                                                     256000))),
                   projector="paligemma")

    @classmethod
    def _gemma3(cls, hf: dict) -> VisionConfig:
        """Gemma 3's SigLIP tower and projector, from its config.json (HF's `Gemma3Config` defaults
        where it is silent). ValueError where the pooled tokens do not tile the patch grid."""
        tower = _last_siglip_state(hf)
        tokens = int(hf.get("mm_tokens_per_image", 256))
        side, patches = math.isqrt(tokens), tower["image_size"] // tower["patch_size"]
        if side * side != tokens or patches % side:
            raise ValueError(f"mm_tokens_per_image {tokens} must be a square whose side divides the tower's "
                             f"{patches} x {patches} patches")
        return cls(
            **tower, image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 262144))),
            projector="gemma3", pooled_tokens=tokens,
            start_token_id=int(hf.get("boi_token_index", hf.get("boi_token_id", 255999))),
            end_token_id=int(hf.get("eoi_token_index", hf.get("eoi_token_id", 256000))),
        )


def _last_siglip_state(hf: dict) -> dict:
    """`VisionConfig` fields of a SigLIP tower whose last state (after its post-layernorm) a
    projector reads (Gemma 3's, PaliGemma's); `vision_config` over SigLIP's defaults. ValueError
    for an activation jpaged does not run."""
    vision = _TOWER_DEFAULTS["siglip_vision_model"] | (hf.get("vision_config") or {})
    if vision["hidden_act"] not in VISION_ACTIVATIONS:
        raise ValueError(f"vision_config.hidden_act {vision['hidden_act']!r} is not supported (supported: "
                         f"{', '.join(VISION_ACTIVATIONS)})")
    num_layers = int(vision["num_hidden_layers"])
    return dict(hidden_size=int(vision["hidden_size"]), intermediate_size=int(vision["intermediate_size"]),
                num_layers=num_layers, num_heads=int(vision["num_attention_heads"]),
                image_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]),
                layer_norm_eps=float(vision["layer_norm_eps"]), hidden_act=vision["hidden_act"],
                feature_layers=(num_layers,), drop_cls=False, projector_act="gelu", class_token=False)


# HF's defaults for what a Qwen2-VL / Qwen2.5-VL vision_config leaves out
_QWEN_TOWER_DEFAULTS = {
    "Qwen2VLForConditionalGeneration": dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu",
                                            mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
                                            temporal_patch_size=2),
    "Qwen2_5_VLForConditionalGeneration": dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420,
                                               num_heads=16, patch_size=14, spatial_merge_size=2,
                                               temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                                               fullatt_block_indexes=[7, 15, 23, 31]),
    "Qwen3VLForConditionalGeneration": dict(depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh",
                                            intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
                                            temporal_patch_size=2, out_hidden_size=3584, num_position_embeddings=2304,
                                            deepstack_visual_indexes=[8, 16, 24]),
}
QWEN_VISION_VERSIONS = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
                        "Qwen3VLForConditionalGeneration": "qwen3_vl"}


class _ImageTokenWidened:
    """What Qwen-VL's and Pixtral's configs share: the prompt writes each image's own image token,
    which widens in place, and the language model reads the images causally, as text."""

    bidirectional = prefix_lm = False
    newline_ids = ()

    @property
    def prompt_token_id(self) -> int:
        """The token a prompt writes for each image (widened to `placeholder_ids`)."""
        return self.image_token_id

    @property
    def template_image_ids(self) -> list[int]:
        """The tokens a chat template that takes text gets for each image part."""
        return [self.image_token_id]


@dataclass(frozen=True)
class QwenVisionConfig(_ImageTokenWidened):
    """Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's vision tower (config.json's `vision_config`). The
    model's image processor resizes an image to a grid of `patch_size` patches whose sides are
    multiples of `spatial_merge_size`, each patch `temporal_patch_size` frames deep (a still image
    repeats its one); a ViT with 2D RoPE over the grid encodes them, and a merger turns each
    `spatial_merge_size` x `spatial_merge_size` patches into one embedding for the language model,
    which reads the image's tokens at multimodal RoPE positions (`jpaged/mrope.py`). Qwen2-VL's
    blocks take LayerNorm and a two-layer MLP; Qwen2.5-VL's RMSNorm and a gated MLP, and attend
    within windows of `window_size` pixels but in `full_attention_layers`. Qwen3-VL's add a
    learned position grid of `num_position_embeddings` (resampled to each image's grid) to the
    patches, and merge the states after each of `deepstack_layers` too: those embeddings are added
    to the image tokens' hidden states after the language model's first layers (DeepStack)."""

    version: str  # "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    hidden_act: str
    rope_theta: float
    image_token_id: int
    window_size: int = 0
    full_attention_layers: tuple[int, ...] = ()
    num_position_embeddings: int = 0
    deepstack_layers: tuple[int, ...] = ()
    min_pixels: int = 56 * 56  # the image processor's bounds on a resized image's area (`with_pixel_limits`)
    max_pixels: int = 28 * 28 * 1280
    start_token_id: int = 151652  # <|vision_start|> and <|vision_end|>, which the chat template writes around an image
    end_token_id: int = 151653

    @property
    def windowed(self) -> bool:
        return self.version == "qwen2_5_vl"

    def with_pixel_limits(self, limits: tuple[int, int] | None) -> QwenVisionConfig:
        """This config with the image processor's (min_pixels, max_pixels) (None: as it is)."""
        return self if limits is None else dataclasses.replace(self, min_pixels=limits[0], max_pixels=limits[1])

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the embeddings of an image of `height` x `width` pixels: its size
        once the processor resizes it (HF's `smart_resize`: sides rounded to multiples of a merged
        patch, scaled, the aspect kept, into the pixel limits) in merged patches. ValueError for
        an aspect ratio over 200, as the processor's."""
        if max(height, width) / min(height, width) > 200:
            raise ValueError(f"a {height}x{width} image's aspect ratio is over 200, the most Qwen-VL's image processor "
                             "takes")
        factor = self.patch_size * self.spatial_merge_size
        rows, cols = round(height / factor), round(width / factor)
        if rows * cols * factor ** 2 > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            rows, cols = max(1, math.floor(height / beta / factor)), max(1, math.floor(width / beta / factor))
        elif rows * cols * factor ** 2 < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            rows, cols = math.ceil(height * beta / factor), math.ceil(width * beta / factor)
        return rows, cols

    def image_tokens(self, height: int, width: int) -> int:
        """How many embeddings (and placeholders) an image of `height` x `width` pixels becomes."""
        rows, cols = self.grid(height, width)
        return rows * cols

    @property
    def template_image_ids(self) -> list[int]:
        """The tokens a chat template that takes text gets for each image part: the image token
        between the vision start and end tokens, as Qwen's templates write it (and vLLM's)."""
        return [self.start_token_id, self.image_token_id, self.end_token_id]

    def placeholder_ids(self, height: int, width: int) -> list[int]:
        """The token ids an image of `height` x `width` pixels widens to: `image_tokens` image tokens."""
        return [self.image_token_id] * self.image_tokens(height, width)

    @property
    def patch_features(self) -> int:
        """Values of one patch as the processor flattens it (channels x frames x pixels)."""
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_hf(cls, hf: dict) -> QwenVisionConfig:
        """From a Qwen2-VL, Qwen2.5-VL or Qwen3-VL config.json. ValueError for a setting jpaged does
        not run."""
        architecture = next(name for name in hf["architectures"] if name in _QWEN_TOWER_DEFAULTS)
        vision = _QWEN_TOWER_DEFAULTS[architecture] | (hf.get("vision_config") or {})
        version = QWEN_VISION_VERSIONS[architecture]
        windowed, qwen2 = version == "qwen2_5_vl", version == "qwen2_vl"
        if vision["hidden_act"] not in VISION_ACTIVATIONS + ("silu",):
            raise ValueError(f"vision_config.hidden_act {vision['hidden_act']!r} is not supported "
                             f"(supported: {', '.join(VISION_ACTIVATIONS + ('silu',))})")
        if int(vision.get("in_channels", vision.get("in_chans", 3))) != 3:
            raise ValueError("vision_config.in_channels must be 3 (RGB images)")
        width = int(vision["embed_dim"] if qwen2 else vision["hidden_size"])
        if width % int(vision["num_heads"]):
            raise ValueError(f"the vision tower's width {width} is not a multiple of its {vision['num_heads']} heads")
        theta = (vision.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        deepstack = tuple(int(i) for i in vision.get("deepstack_visual_indexes", ())) if version == "qwen3_vl" else ()
        if any(not 0 <= i < int(vision["depth"]) for i in deepstack):
            raise ValueError(f"deepstack_visual_indexes {list(deepstack)} name blocks outside the tower's "
                             f"{vision['depth']}")
        return cls(
            version=version,
            hidden_size=width,
            intermediate_size=int(width * vision["mlp_ratio"] if qwen2 else vision["intermediate_size"]),
            num_layers=int(vision["depth"]),
            num_heads=int(vision["num_heads"]),
            out_hidden_size=int(vision["hidden_size"] if qwen2 else vision["out_hidden_size"]),
            patch_size=int(vision["patch_size"]),
            temporal_patch_size=int(vision["temporal_patch_size"]),
            spatial_merge_size=int(vision["spatial_merge_size"]),
            hidden_act=vision["hidden_act"],
            rope_theta=float(theta),
            image_token_id=int(hf.get("image_token_id", 151655)),
            start_token_id=int(hf.get("vision_start_token_id", 151652)),
            end_token_id=int(hf.get("vision_end_token_id", 151653)),
            window_size=int(vision.get("window_size", 0)) if windowed else 0,
            full_attention_layers=tuple(int(i) for i in vision.get("fullatt_block_indexes", ())) if windowed else (),
            num_position_embeddings=int(vision.get("num_position_embeddings", 0)) if version == "qwen3_vl" else 0,
            deepstack_layers=deepstack,
        )


# HF's defaults for what a Pixtral vision_config leaves out (Mistral 3's; Pixtral-12B's differ in sizes it writes)
_PIXTRAL_TOWER_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=1540, patch_size=14, hidden_act="gelu")


@dataclass(frozen=True)
class PixtralVisionConfig(_ImageTokenWidened):
    """A Pixtral vision tower and its projector: Mistral 3's (`Mistral3ForConditionalGeneration`:
    Mistral Small 3.1 / 3.2, Magistral Small), and Pixtral-12B's as transformers ships it
    (`LlavaForConditionalGeneration` with a `pixtral` vision_config). The image processor scales
    an image down to fit `longest_edge` pixels, then up to whole `patch_size x
    spatial_merge_size` squares; a ViT with 2D RoPE over the patch grid encodes it, and the
    projector (Mistral 3: an RMSNorm, each `spatial_merge_size`^2 patches merged by a linear
    layer; both: linear, activation, linear) makes one embedding per square. In the prompt an
    image is its rows of `image_token_id` placeholders, each row ended by `break_token_id`, the
    last by `end_token_id` (those keep their own token embeddings, as in transformers)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    spatial_merge_size: int
    hidden_act: str
    rope_theta: float
    feature_layers: tuple[int, ...]  # indices into the tower's states, 0 the patches after ln_pre
    projector_act: str
    projector_norm_eps: float | None  # Mistral 3's norm before the patch merger (None: no norm, no merger)
    image_token_id: int
    longest_edge: int
    break_token_id: int = 12  # "[IMG_BREAK]" and "[IMG_END]" in Mistral's tokenizers (`with_special_tokens`)
    end_token_id: int = 13

    def with_longest_edge(self, longest_edge: int | None) -> PixtralVisionConfig:
        """This config with the image processor's `size["longest_edge"]` (None: as it is)."""
        return self if longest_edge is None else dataclasses.replace(self, longest_edge=int(longest_edge))

    def with_special_tokens(self, break_token_id: int, end_token_id: int) -> PixtralVisionConfig:
        return dataclasses.replace(self, break_token_id=break_token_id, end_token_id=end_token_id)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the embeddings of an image of `height` x `width` pixels, as the
        processor resizes it (transformers' Pixtral `get_resize_output_image_size`: scaled down,
        sides floored, to fit `longest_edge`, then rounded up to whole merged patches).
        ValueError for an image too thin to keep a pixel across once scaled."""
        ratio = max(height, width) / self.longest_edge
        scaled = (math.floor(height / ratio), math.floor(width / ratio)) if ratio > 1 else (height, width)
        if not all(scaled):
            raise ValueError(f"a {height}x{width} (height x width) image is too thin: scaled to fit longest_edge "
                             f"{self.longest_edge} pixels it keeps no pixel across")
        factor = self.patch_size * self.spatial_merge_size
        return -(-scaled[0] // factor), -(-scaled[1] // factor)

    def image_tokens(self, height: int, width: int) -> int:
        """How many placeholders an image of `height` x `width` pixels becomes: a row of
        embeddings and a break (or end) token per row of its grid."""
        rows, cols = self.grid(height, width)
        return rows * (cols + 1)

    def placeholder_ids(self, height: int, width: int) -> list[int]:
        """The token ids an image of `height` x `width` pixels widens to (`image_tokens` of them)."""
        rows, cols = self.grid(height, width)
        ids = ([self.image_token_id] * cols + [self.break_token_id]) * rows
        ids[-1] = self.end_token_id
        return ids

    @classmethod
    def from_hf(cls, hf: dict) -> PixtralVisionConfig:
        """From a Mistral 3 config.json, or a LLaVA one with a `pixtral` vision_config. ValueError
        for a setting jpaged does not run."""
        mistral3 = "Mistral3ForConditionalGeneration" in (hf.get("architectures") or [])
        vision = _PIXTRAL_TOWER_DEFAULTS | (hf.get("vision_config") or {})
        for name, act in (("vision_config.hidden_act", vision["hidden_act"]),
                          ("projector_hidden_act", hf.get("projector_hidden_act", "gelu"))):
            if act not in VISION_ACTIVATIONS + ("silu",):
                raise ValueError(f"{name} {act!r} is not supported (supported: {', '.join(VISION_ACTIVATIONS + ('silu',))})")
        if int(vision["hidden_size"]) % (4 * int(vision["num_attention_heads"])):
            raise ValueError(f"the vision tower's width {vision['hidden_size']} is not a multiple of 4 x its "
                             f"{vision['num_attention_heads']} heads (2D RoPE turns a quarter of a head by rows, a "
                             "quarter by columns)")
        if int(vision.get("num_channels", 3)) != 3:
            raise ValueError("vision_config.num_channels must be 3 (RGB images)")
        if not mistral3 and hf.get("vision_feature_select_strategy", "default") != "full":
            raise ValueError(f"a Pixtral tower's vision_feature_select_strategy "
                             f"{hf.get('vision_feature_select_strategy', 'default')!r} is not supported (supported: full)")
        num_layers = int(vision["num_hidden_layers"])
        layers = hf.get("vision_feature_layer", -1)
        layers = tuple(int(i) for i in (layers if isinstance(layers, list) else [layers]))
        if any(not -num_layers - 1 <= i <= num_layers for i in layers):
            raise ValueError(f"vision_feature_layer {layers} is outside the tower's {num_layers + 1} states")
        theta = (vision.get("rope_parameters") or {}).get("rope_theta", vision.get("rope_theta", 10000.0))
        return cls(
            hidden_size=int(vision["hidden_size"]),
            intermediate_size=int(vision["intermediate_size"]),
            num_layers=num_layers,
            num_heads=int(vision["num_attention_heads"]),
            patch_size=int(vision["patch_size"]),
            spatial_merge_size=int(hf.get("spatial_merge_size", 2)) if mistral3 else 1,
            hidden_act=vision["hidden_act"],
            rope_theta=float(theta),
            feature_layers=tuple(i % (num_layers + 1) for i in layers),
            projector_act=hf.get("projector_hidden_act", "gelu"),
            projector_norm_eps=float((hf.get("text_config") or {}).get("rms_norm_eps", 1e-5)) if mistral3 else None,
            image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 10))),
            longest_edge=int(vision["image_size"]),
        )


def vision_config_of(hf: dict) -> VisionConfig | QwenVisionConfig | PixtralVisionConfig:
    """The vision tower a config.json of a model that reads images describes."""
    if any(name in _QWEN_TOWER_DEFAULTS for name in hf.get("architectures") or []):
        return QwenVisionConfig.from_hf(hf)
    if ("Mistral3ForConditionalGeneration" in (hf.get("architectures") or [])
            or (hf.get("vision_config") or {}).get("model_type") == "pixtral"):
        return PixtralVisionConfig.from_hf(hf)
    return VisionConfig.from_hf(hf)


def _max_tiles(aspect_ratio) -> int:
    """N of LLaVA-OneVision's `vision_aspect_ratio` "anyres_max_N". ValueError otherwise."""
    match = re.fullmatch(r"anyres_max_([1-9][0-9]*)", str(aspect_ratio))
    if match is None:
        raise ValueError(f"vision_aspect_ratio {aspect_ratio!r} is not supported (supported: anyres_max_N)")
    return int(match.group(1))


def _check_mm_limits(limits) -> None:
    """ValueError unless `limits` is None or a dict of "image" to a count >= 0."""
    if limits is None:
        return
    if not isinstance(limits, dict) or set(limits) - {"image"}:
        raise ValueError(f"limit_mm_per_prompt takes {{'image': N}} (images are the one modality read), got "
                         f"{limits!r:.100}")
    count = limits.get("image", 0)
    if not is_integer(count) or count < 0:
        raise ValueError(f"limit_mm_per_prompt['image'] must be an integer >= 0, got {count!r}")


def _grid_pinpoints(pinpoints, side: int) -> tuple[tuple[int, int], ...]:
    """LLaVA-NeXT's `image_grid_pinpoints` as (height, width) pairs, each a multiple of the
    tower's `image_size` (`side`). ValueError otherwise."""
    try:
        pairs = tuple((int(h), int(w)) for h, w in pinpoints)
    except (TypeError, ValueError):
        pairs = ()
    if not pairs or any(h <= 0 or w <= 0 or h % side or w % side for h, w in pairs):
        raise ValueError(f"image_grid_pinpoints {pinpoints!r} must be (height, width) pairs, each a positive multiple "
                         f"of the vision tower's image_size {side}")
    return pairs


@dataclass
class CacheConfig:
    """How the paged KV cache is sized.

    `num_blocks` fixes the block count; otherwise it comes from `gpu_memory_utilization` of the
    device's free memory on accelerators, or from `cpu_kv_cache_gib` on CPU. `kv_cache_dtype`
    "auto" keeps K/V in the model's dtype; "int8" and "fp8_e4m3" keep them quantized with one
    float32 scale per token and KV head (`pallas_kernels/quantized_kv.py`), so a budget holds
    about 2x (vs bfloat16) or 4x (vs float32) the blocks.
    """

    block_size: int = 16
    kv_cache_dtype: str = "auto"  # "auto" | "int8" | "fp8_e4m3" (or "fp8")
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True
    swap_space_gib: float = 1.0  # host memory for swapped-out blocks

    def __post_init__(self):
        _check_integers(self, ("block_size", "num_blocks"), optional=("num_blocks",))
        as_bool("enable_prefix_caching", self.enable_prefix_caching)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.kv_cache_dtype == "fp8":  # vLLM's name for the same format
            self.kv_cache_dtype = "fp8_e4m3"
        if self.kv_cache_dtype not in ("auto", "int8", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype must be 'auto', 'int8' or 'fp8_e4m3' ('fp8'), got {self.kv_cache_dtype!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check_amount(self, "cpu_kv_cache_gib")
        _check_amount(self, "swap_space_gib", allow_zero=True)


@dataclass
class SchedulerConfig:
    """Continuous-batching limits: sequences per step, tokens per step, model length."""

    max_num_seqs: int = 64
    # None: 512, or max_model_len for a model that computes each prompt in one step (EmbeddingGemma,
    # PaliGemma), as vLLM raises it where it cannot chunk a prompt
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    preemption_mode: str = "recompute"  # "recompute" | "swap"
    scheduling_policy: str = "fcfs"  # "fcfs" | "priority": requests' `priority` first, then arrival

    def __post_init__(self):
        _check_integers(self, ("max_num_seqs", "max_num_batched_tokens", "max_model_len"),
                        optional=("max_num_batched_tokens", "max_model_len"))
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")

    def with_step_budget(self, max_model_len: int, reads_prompt_whole: bool) -> SchedulerConfig:
        """This config with `max_num_batched_tokens` set where it is None: 512 tokens, or, for a
        model that computes each prompt in one step, enough for a prompt of `max_model_len`."""
        if self.max_num_batched_tokens is not None:
            return self
        budget = max(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_model_len) if reads_prompt_whole \
            else DEFAULT_MAX_NUM_BATCHED_TOKENS
        return dataclasses.replace(self, max_num_batched_tokens=budget)


@dataclass
class SpeculativeConfig:
    """N-gram speculative decoding (prompt lookup, as vLLM's ``"ngram"`` method): before each step
    a decoding sequence looks for the latest earlier occurrence of its last n tokens (n from
    `prompt_lookup_max` down to `prompt_lookup_min`) in its prompt and output, proposes the up to
    `num_speculative_tokens` tokens that followed it, and the step verifies them all at once.
    Off while `num_speculative_tokens` is 0. Every decoding sequence drafts (see
    `jpaged/ngram_proposer.py`); the tokens are those of decoding without drafts (with a seed,
    the same tokens).
    """

    method: str | None = None  # None (off) | "ngram"
    num_speculative_tokens: int = 0
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    def __post_init__(self):
        if self.method not in (None, "ngram"):
            raise ValueError(f"speculative method must be 'ngram', got {self.method!r}")
        _check_integers(self, ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"))
        if self.method is None and self.num_speculative_tokens:
            raise ValueError(f"num_speculative_tokens {self.num_speculative_tokens} needs method 'ngram'")
        if self.method == "ngram" and self.num_speculative_tokens < 1:
            raise ValueError(f"method 'ngram' needs num_speculative_tokens >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min {self.prompt_lookup_min} and prompt_lookup_max "
                             f"{self.prompt_lookup_max} must satisfy 1 <= min <= max")

    @classmethod
    def from_dict(cls, settings) -> SpeculativeConfig:
        """From vLLM's `speculative_config` dict (None: off); ValueError for anything else."""
        if settings is None:
            return cls()
        if not isinstance(settings, dict):
            raise ValueError(f"speculative_config must be a dict such as {{'method': 'ngram', "
                             f"'num_speculative_tokens': 4}}, got {settings!r}")
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"speculative_config keys {unknown} are not among {[f.name for f in fields(cls)]}")
        missing = [key for key in ("method", "num_speculative_tokens") if key not in settings]
        if missing:
            raise ValueError(f"speculative_config needs {missing}, e.g. {{'method': 'ngram', "
                             f"'num_speculative_tokens': 4}}; got {settings!r}")
        return cls(**settings)

    @property
    def enabled(self) -> bool:
        return self.num_speculative_tokens > 0


@dataclass
class LoRAConfig:
    """Multi-LoRA serving, as vLLM's `enable_lora`: requests may name a PEFT LoRA adapter
    (`LoRARequest`, `jpaged/lora.py`), and the adapters of up to `max_loras` requests' worth run
    in one step, each of rank at most `max_lora_rank` (`jpaged/lora_slots.py`)."""

    enable_lora: bool = False
    max_loras: int = 1  # adapters held on the device at once, so at most this many in one step
    max_lora_rank: int = 16

    def __post_init__(self):
        as_bool("enable_lora", self.enable_lora)
        _check_integers(self, ("max_loras", "max_lora_rank"))
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ParallelConfig:
    """How devices split the model: each size is one named axis of the device mesh.

    Tensor parallelism splits every layer's heads and MLP columns; pipeline parallelism splits
    the layers into stages that micro-batches flow through; expert parallelism splits a
    mixture-of-experts model's experts; data parallelism runs that many replicas of the whole
    engine, each on its own devices with its own scheduler and KV cache.

    A pipelined step that prefills is cut into `prefill_micro_batches` micro-batches (default:
    twice the stage count), so that stages overlap on compute-bound prompt work. A decode-only
    step is cut into `decode_micro_batches` (default 1): a step is synchronous, so each extra
    micro-batch makes every stage read its weights once more, and those reads bound decoding.
    A step is never cut into more micro-batches than it has new tokens.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    data_parallel_size: int = 1
    prefill_micro_batches: int | None = None
    decode_micro_batches: int = 1

    def __post_init__(self):
        _check_integers(self, tuple(f.name for f in fields(self)), optional=("prefill_micro_batches",))
        if self.prefill_micro_batches is None:
            self.prefill_micro_batches = 2 * self.pipeline_parallel_size
        for name in (f.name for f in fields(self)):  # in field order: a bad stage count before its default
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def replica_size(self) -> int:
        """Devices of one data-parallel replica."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.expert_parallel_size

    @property
    def world_size(self) -> int:
        return self.data_parallel_size * self.replica_size


@dataclass
class EngineConfig:
    model: str | None = None  # HF folder, .gguf file, or None for the default model
    tokenizer: str | None = None  # HF folder or hub id of the tokenizer; None: the model's own
    revision: str | None = None  # branch, tag or commit of a hub model; None: main
    # keys set over the model's config.json (vLLM's hf_overrides), such as those that read a causal LM
    # as a reranker (`classifier_from_token`, `method`: jpaged/pooling.py)
    hf_overrides: dict | None = None
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16" (vLLM's "float" and "half" too)
    quantization: str | None = None  # weight-only: None | "int8" | "fp8" | "gguf" (jpaged/models/quantization.py)
    attention_backend: str = "auto"  # "auto" | "pallas" | "cpu" | "reference" (pallas_kernels/backend.py)
    attention_interpret: bool = False  # Pallas kernels in interpret mode (tests on CPU)
    compilation_cache: bool = True  # jax's persistent compilation cache in <cache dir>/xla (compile_cache.py)
    compile_warmup: bool = False  # compile every step program at start-up (LLMEngine.warm_up)
    offload_weights: str | None = None  # None | "host" | "disk": stream layers past the budget (weight_streaming.py)
    device_weight_budget_gib: float | None = None  # device bytes for weights with offload_weights; None: stream all layers
    seed: int = 0
    # the reasoning model family's <think> markers (jpaged/reasoning.py): structured outputs apply
    # once reasoning ends; the server splits replies into reasoning and content. None: neither
    reasoning_parser: str | None = None
    # "generate" (sample tokens), "pooling" (embed each prompt, jpaged/pooling.py) or "auto" (the
    # model's: pooling for base models and classifiers, `pooling.default_runner`); vLLM's runner
    runner: str = "auto"
    # under runner "pooling", vLLM's pooler_config: `task` (embed, classify, token_embed,
    # token_classify; None: the model's own) and `pooling_type` (LAST, MEAN, CLS, ALL)
    pooler_config: dict | None = None
    max_logprobs: int = MAX_LOGPROBS  # most top logprobs a request may ask for per token; -1: the whole vocabulary
    # what sampled tokens' logprobs hold (vLLM's; jpaged/sampler.py): "raw_logprobs", "raw_logits",
    # "processed_logprobs" or "processed_logits" (of the distribution drawn from)
    logprobs_mode: str = "raw_logprobs"
    # prompts may be given as embeddings (`{"prompt_embeds": [length, hidden_size]}`, vLLM's): each
    # step then takes a [tokens, hidden_size] float32 array beside the token ids
    enable_prompt_embeds: bool = False
    # most images a prompt may hold, vLLM's {"image": N}; {"image": 0} serves an image model's text
    # alone, its vision tower not loaded. None: no limit
    limit_mm_per_prompt: dict | None = None
    # a chat template that takes text gets each image's token where its part is (vLLM's
    # interleave_mm_strings); otherwise the images a message's text does not name go first
    interleave_mm_strings: bool = False
    # allow `sleep()` / `wake_up()`, which free and give back the device memory of the weights and
    # KV cache between uses (vLLM's sleep mode, levels 1 and 2)
    enable_sleep_mode: bool = False
    # allow `start_profile()` / `stop_profile()`, jax profiler traces written under this folder
    # (jpaged/profiler.py; vLLM's profiler dir)
    profiler_dir: str | None = None
    # sampling defaults: "auto" (the model's generation_config.json), "none", or a folder holding one
    generation_config: str = "auto"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        _check_integers(self, ("seed", "max_logprobs"))
        for name in ("attention_interpret", "compilation_cache", "compile_warmup", "enable_prompt_embeds",
                     "interleave_mm_strings", "enable_sleep_mode"):
            as_bool(name, getattr(self, name))
        if self.hf_overrides is not None and not (isinstance(self.hf_overrides, dict)
                                                  and all(isinstance(key, str) for key in self.hf_overrides)):
            raise ValueError(f"hf_overrides must be a dict of config.json keys, got {self.hf_overrides!r:.100}")
        _check_mm_limits(self.limit_mm_per_prompt)
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs_mode!r:.50}")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (the whole vocabulary) or >= 0, got {self.max_logprobs}")
        if self.profiler_dir is not None and (not isinstance(self.profiler_dir, (str, os.PathLike))
                                              or not os.fspath(self.profiler_dir).strip()):
            raise ValueError(f"profiler_dir must be a folder, got {self.profiler_dir!r:.80}")
        if not isinstance(self.generation_config, str):
            raise ValueError(f"generation_config must be 'auto', 'none' or a folder, got {self.generation_config!r}")
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of 'auto', 'float32' ('float'), 'bfloat16', 'float16' ('half'), "
                             f"got {self.dtype!r}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        check_pooler_config(self.pooler_config)
        if self.enable_sleep_mode and self.offload_weights:
            raise ValueError(f"enable_sleep_mode frees device memory between uses; with offload_weights "
                             f"{self.offload_weights!r} the weights already live in host memory")
        if self.pooler_config and self.runner == "generate":
            raise ValueError(f"pooler_config {self.pooler_config!r:.100} applies to runner='pooling' only")
        if self.runner == "pooling" and (self.speculative.enabled or self.reasoning_parser):
            raise ValueError("runner='pooling' generates nothing, so it takes no speculative_config or "
                             "reasoning_parser")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be None or one of {', '.join(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}")
        if self.quantization not in (None, "int8", "fp8", "gguf"):
            raise ValueError(f"quantization must be None, 'int8', 'fp8' or 'gguf', got {self.quantization!r}")
        self._check_offload()
        self._check_lora()
        self._check_prompt_embeds()
        if self.speculative.enabled and self.parallel.pipeline_parallel_size > 1:
            raise ValueError(f"speculative decoding runs without pipeline parallelism; pipeline_parallel_size="
                             f"{self.parallel.pipeline_parallel_size} must be 1")
        if self.attention_backend not in ("auto", "pallas", "cpu", "reference"):
            raise ValueError("attention_backend must be one of 'auto', 'pallas', 'cpu', 'reference', "
                             f"got {self.attention_backend!r}")

    def _check_offload(self) -> None:
        if self.offload_weights not in (None, "host", "disk"):
            raise ValueError(f"offload_weights must be None, 'host' or 'disk', got {self.offload_weights!r}")
        budget = self.device_weight_budget_gib
        if budget is not None and self.offload_weights is None:
            raise ValueError(f"device_weight_budget_gib={budget} needs offload_weights ('host' or 'disk')")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget < math.inf):
            raise ValueError(f"device_weight_budget_gib must be a positive, finite number of GiB, got {budget!r}")
        parallel = self.parallel
        if self.offload_weights and (parallel.pipeline_parallel_size > 1 or parallel.expert_parallel_size > 1):
            raise ValueError(f"offload_weights={self.offload_weights!r} streams layers on one device or under tensor "
                             f"parallelism; pipeline_parallel_size={parallel.pipeline_parallel_size} and "
                             f"expert_parallel_size={parallel.expert_parallel_size} must be 1")

    def _check_lora(self) -> None:
        if not self.lora.enable_lora:
            return
        if self.parallel.pipeline_parallel_size > 1 or self.offload_weights:
            raise ValueError(f"enable_lora runs without pipeline parallelism and offload_weights: "
                             f"pipeline_parallel_size must be 1 (got {self.parallel.pipeline_parallel_size}) and "
                             f"offload_weights None (got {self.offload_weights!r})")

    def _check_prompt_embeds(self) -> None:
        if not self.enable_prompt_embeds:
            return
        if self.runner == "pooling" or self.parallel.pipeline_parallel_size > 1 or self.offload_weights:
            raise ValueError(f"enable_prompt_embeds runs under runner 'generate' without pipeline parallelism and "
                             f"offload_weights: got runner {self.runner!r}, pipeline_parallel_size "
                             f"{self.parallel.pipeline_parallel_size}, offload_weights {self.offload_weights!r}")
