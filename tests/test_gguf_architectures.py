"""GGUF files of each architecture jpaged reads (llama, qwen2, qwen3, qwen2moe, qwen3moe, gemma, gemma2, gemma3,
phi3, granite, granitemoe, olmo2, smollm3), written from
random-weight HF models the way llama.cpp's converter lays them out, with a small byte-level BPE vocabulary:
the tokenizer, config and weights jpaged reads, and its greedy tokens and prompt logprobs, against
HF transformers' own GGUF loading of the same file (float32 tensors, and Q8_0 tensors that jpaged
keeps packed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from jpaged import LLM, SamplingParams
from jpaged.loader.gguf import load_gguf_config, load_gguf_tokenizer, load_gguf_weights

DATA = pathlib.Path(__file__).parent / "data" / "public_domain.txt"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_turn>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
CASES = {
    # GQA 2:1; llama.cpp interleaves each Q/K head's rows for llama models only.
    "llama": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    # QKV bias, tied embeddings (no output.weight tensor).
    "qwen2": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                             use_sliding_window=False)),
    # q/k RMSNorm; head_dim 128 is not hidden 64 / 4 heads (attention.key_length; transformers' GGUF
    # loading leaves head_dim at Qwen3Config's default, 128, as in the released Qwen3 models).
    "qwen3": (transformers.Qwen3Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                             use_sliding_window=False)),
    # Experts (one GGUF tensor per projection) and a sigmoid-gated shared expert, top-2 of 4 not
    # renormalised; expert sizes are Qwen2MoeConfig's defaults, which transformers' GGUF loading keeps.
    "qwen2moe": (transformers.Qwen2MoeConfig, dict(num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                                   num_experts_per_tok=2, moe_intermediate_size=1408,
                                                   shared_expert_intermediate_size=5632, use_sliding_window=False)),
    # Experts with q/k norms, top-3 of 6 renormalised, as llama.cpp always runs qwen3moe.
    "qwen3moe": (transformers.Qwen3MoeConfig, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                                   num_experts=6, num_experts_per_tok=3, moe_intermediate_size=768,
                                                   norm_topk_prob=True)),
    # Sandwich norms stored as 1 + w, GELU, scaled embeddings, a window of 4 on every other layer,
    # both soft caps; head_dim 256 (query_pre_attn_scalar as transformers' GGUF loading sets it).
    "gemma2": (transformers.Gemma2Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=256,
                                               query_pre_attn_scalar=256, sliding_window=4, tie_word_embeddings=True)),
    # Five windowed layers (RoPE base 10,000) then a global one (base 10^6); q/k norms.
    "gemma3": (transformers.Gemma3TextConfig, dict(num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=256, query_pre_attn_scalar=256, sliding_window=4,
                                                   tie_word_embeddings=True)),
    # q / k / v in one tensor (attn_qkv), gate and up in ffn_up.
    "phi3": (transformers.Phi3Config, dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
    # Half of each head rotated (rope.dimension_count), a window of 8, LongRoPE factors as tensors;
    # transformers' GGUF loading reads none of these, so the oracle is the HF model the file was written from.
    "phi3_longrope": (transformers.Phi3Config, dict(
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, sliding_window=8,
        original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.5, 2.0, 4.0], "long_factor": [2.0, 3.0, 5.0, 9.0]})),
    # Families transformers' GGUF loading does not read: their files are written with the tensor
    # names of llama.cpp's own map (gguf-py's `get_tensor_name_map`), and the oracle is the HF model
    # the file was written from. Gemma: (1 + w) norms stored as 1 + w, GELU, scaled embeddings.
    "gemma": (transformers.GemmaConfig, dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                             tie_word_embeddings=True)),
    # Granite: Q/K rows interleaved as llama's; its four multipliers as metadata.
    "granite": (transformers.GraniteConfig, dict(num_attention_heads=4, num_key_value_heads=2, embedding_multiplier=3.0,
                                                 attention_multiplier=0.09, residual_multiplier=0.5,
                                                 logits_scaling=2.5)),
    # GraniteMoE: Granite's multipliers, each layer's experts stacked (input_linear: gate then up),
    # top-2 of 4 under a softmax over the top-k logits.
    "granitemoe": (transformers.GraniteMoeConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                       num_local_experts=4, num_experts_per_tok=2,
                                                       embedding_multiplier=3.0, attention_multiplier=0.09,
                                                       residual_multiplier=0.5, logits_scaling=2.5)),
    # OLMo 2: norms after attention and the MLP only; q / k norms over all heads.
    "olmo2": (transformers.Olmo2Config, dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
    # SmolLM3: every fourth layer without RoPE (llama.cpp's fixed rule), Q/K rows interleaved.
    "smollm3": (transformers.SmolLM3Config, dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                                 pad_token_id=0, no_rope_layer_interval=4)),
}
GGUF_ARCH = {"phi3_longrope": "phi3"}  # a case's GGUF architecture, where not its name
ORACLE_IS_SOURCE = {"phi3_longrope", "gemma", "granite", "granitemoe", "olmo2", "smollm3"}
NAMED_BY_GGUF_PY = {"gemma", "granite", "granitemoe", "olmo2", "smollm3"}
PERMUTED = {"llama", "granite", "granitemoe", "smollm3"}  # llama.cpp runs these with consecutive-pair RoPE
LAYER_NAMES = {  # HF module: GGUF tensor, per layer
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
GEMMA_LAYER_NAMES = {**LAYER_NAMES, "pre_feedforward_layernorm": "ffn_norm",
                     "post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm"}
PHI3_LAYER_NAMES = {**LAYER_NAMES, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's llama_model.cpp tells the 27B models by these
PROMPTS = ["The old man looked at the sea and said", "Once there was a ship", "What is the capital of"]


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE of 400 tokens learned from the public-domain test text, with chat specials."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(DATA)], trainer)
    return tokenizer


def per_expert(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF's tensors with each layer's stacked experts (`mlp.experts.gate_up_proj [E, 2 * ff, hidden]`,
    `mlp.experts.down_proj [E, hidden, ff]`) as one tensor per expert and projection."""
    out = {}
    for name, array in state_dict.items():
        prefix, _, kind = name.rpartition(".experts.")
        if not prefix:
            out[name] = array
            continue
        for e, expert in enumerate(array):
            parts = dict(zip(("gate_proj", "up_proj"), np.split(expert, 2))) if kind == "gate_up_proj" else {kind: expert}
            out.update({f"{prefix}.experts.{e}.{proj}.weight": part for proj, part in parts.items()})
    return out


def gguf_tensors(state_dict: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    """HF's tensors under llama.cpp's names: a layer's experts stacked, one tensor per projection;
    Gemma's norm scales stored as 1 + w, as llama.cpp's converter writes them."""
    out = {}
    layer_names = GEMMA_LAYER_NAMES if arch.startswith("gemma") else PHI3_LAYER_NAMES if arch == "phi3" else LAYER_NAMES
    if arch in NAMED_BY_GGUF_PY:
        names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 8)
        for name in [n for n in state_dict if ".experts." in n or n.endswith("router.weight")]:  # GraniteMoE's
            layer, array = name.split(".")[2], state_dict.pop(name)
            if name.endswith("router.weight"):
                out[f"blk.{layer}.ffn_gate_inp.weight"] = array
            elif name.endswith("gate_up_proj"):
                out[f"blk.{layer}.ffn_gate_exps.weight"], out[f"blk.{layer}.ffn_up_exps.weight"] = np.split(array, 2, 1)
            else:
                out[f"blk.{layer}.ffn_down_exps.weight"] = array
        return {**out, **{names.get_name(name, try_suffixes=(".weight",)): array + (
            1 if arch == "gemma" and name.endswith("norm.weight") else 0) for name, array in state_dict.items()}}
    for name, array in state_dict.items():
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            array = array + 1
        if ".experts." not in name:  # llama.cpp keeps the shared expert's gate [1, hidden] as [hidden]
            out[gguf_name(name, layer_names)] = array.reshape(-1) if name.endswith("shared_expert_gate.weight") else array
            continue
        layer, kind = name.split(".")[2], name.rpartition(".experts.")[2]
        if kind == "gate_up_proj":
            out[f"blk.{layer}.ffn_gate_exps.weight"], out[f"blk.{layer}.ffn_up_exps.weight"] = np.split(array, 2, axis=1)
        else:
            out[f"blk.{layer}.ffn_down_exps.weight"] = array
    return out


def phi3_keys(cfg) -> dict:
    """A phi3 file's own metadata, as llama.cpp's converter writes it: the rotated dims of each head,
    the window (0: none), and LongRoPE's original context and attention factor."""
    rope = cfg.rope_parameters
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    keys = {"rope.dimension_count": int(rope.get("partial_rotary_factor", 1.0) * head_dim),
            "attention.sliding_window": cfg.sliding_window or 0}
    if rope.get("long_factor"):
        scale = cfg.max_position_embeddings / rope["original_max_position_embeddings"]
        keys.update({"rope.scaling.original_context_length": rope["original_max_position_embeddings"],
                     "rope.scaling.attn_factor": math.sqrt(1 + math.log(scale) / math.log(
                         rope["original_max_position_embeddings"]))})
    return keys


def gguf_name(hf_name: str, layer_names: dict[str, str]) -> str:
    if hf_name.startswith("rope_factors_"):
        return hf_name
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{layer_names[module]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order for llama models: each head's halves interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: pathlib.Path, arch: str, model, tokenizer: Tokenizer | None, quantize: bool,
               metadata: dict | None = None) -> None:
    """`model` as a GGUF file of `arch`; with `quantize`, its 2-D weights as Q8_0 blocks; without a
    `tokenizer`, no tokenizer metadata. `metadata` replaces keys (None drops one)."""
    cfg = model.config
    keys = {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
            "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
            "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
            "rope.freq_base": float(cfg.rope_parameters.get("full_attention", cfg.rope_parameters)["rope_theta"])}
    num_experts = getattr(cfg, "num_experts", 0) or getattr(cfg, "num_local_experts", 0)
    if num_experts:
        keys.update({"expert_count": num_experts, "expert_used_count": cfg.num_experts_per_tok,
                     "expert_feed_forward_length": getattr(cfg, "moe_intermediate_size", cfg.intermediate_size)})
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            keys["expert_shared_feed_forward_length"] = cfg.shared_expert_intermediate_size
    if arch.startswith("gemma"):
        keys["attention.sliding_window"] = getattr(cfg, "sliding_window", None)
    if arch in ("granite", "granitemoe"):
        keys.update({"embedding_scale": cfg.embedding_multiplier, "residual_scale": cfg.residual_multiplier,
                     "logit_scale": cfg.logits_scaling, "attention.scale": cfg.attention_multiplier})
    if arch == "phi3":
        keys.update(phi3_keys(cfg))
    if arch == "gemma2":
        keys.update(attn_logit_softcapping=float(cfg.attn_logit_softcapping),
                    final_logit_softcapping=float(cfg.final_logit_softcapping))
    if getattr(cfg, "head_dim", None):
        keys.update({"attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim})
    keys = {f"{arch}.{key}": value for key, value in keys.items()}
    if tokenizer is not None:
        keys.update({"tokenizer.ggml.bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
                     "tokenizer.ggml.eos_token_id": tokenizer.token_to_id("<|im_end|>")})
        if arch == "phi3":  # else transformers keeps Phi3Config's pad id, 32000, past this vocabulary
            keys["tokenizer.ggml.padding_token_id"] = tokenizer.token_to_id("<|endoftext|>")
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {**keys, **(metadata or {})}.items():
        if value is not None:
            (writer.add_string if isinstance(value, str) else writer.add_uint32 if isinstance(value, int)
             else writer.add_float32)(key, value)
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list([token for token, _ in vocab])
        writer.add_token_types([gguf.TokenType.CONTROL if token in SPECIALS else gguf.TokenType.NORMAL
                                for token, _ in vocab])
        merges = json.loads(tokenizer.to_str())["model"]["merges"]
        writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
        writer.add_chat_template(CHAT_TEMPLATE)
    state_dict = {name: t.detach().numpy().astype(np.float32) for name, t in model.state_dict().items()
                  if not (name == "lm_head.weight" and cfg.tie_word_embeddings)}
    if arch == "phi3" and cfg.rope_parameters.get("long_factor"):
        for kind in ("long", "short"):
            state_dict[f"rope_factors_{kind}.weight"] = np.asarray(cfg.rope_parameters[f"{kind}_factor"], np.float32)
    for name, array in gguf_tensors(state_dict, arch).items():
        if arch in PERMUTED and (".attn_q." in name or ".attn_k." in name):
            array = llama_cpp_permute(array, cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads)
        if quantize and array.ndim >= 2 and array.shape[-1] % 32 == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_model(arch: str, tokenizer: Tokenizer):
    config_class, overrides = CASES[arch]
    torch.manual_seed(0)
    config = config_class(**{**COMMON, **overrides, "vocab_size": tokenizer.get_vocab_size()})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # Gemma's norm scales start at 0 (for 1 + w), others' at 1: give them values
        for name, param in model.named_parameters():
            if arch.startswith("gemma") and name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
            elif arch in NAMED_BY_GGUF_PY and name.endswith("norm.weight"):
                param.normal_(1.0, 0.3)
    return model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer()


# Every architecture in float32; Q8_0 (kept packed) where the packed path meets something new: the
# Q/K row interleave, QKV biases, experts beside packed attention, scaled embeddings tied to the
# head, and q / k / v and gate / up fused in the file.
FILES = [(arch, False) for arch in CASES] + [(arch, True) for arch in ("llama", "qwen2", "qwen3moe", "gemma3", "phi3")]


@pytest.fixture(scope="module", params=FILES,
                ids=lambda case: f"{case[0]}-{'q8_0' if case[1] else 'f32'}")
def written(request, tokenizer, tmp_path_factory):
    """(arch, GGUF path, jpaged's engine arguments, HF's model loaded by transformers from that GGUF
    file); a Q8_0 file is run with its blocks kept packed."""
    arch, quantize = request.param
    model = random_model(arch, tokenizer)
    folder = tmp_path_factory.mktemp(f"gguf_{arch}")
    path = folder / f"{arch}.gguf"
    write_gguf(path, GGUF_ARCH.get(arch, arch), model, tokenizer, quantize)
    oracle = model if arch in ORACLE_IS_SOURCE else transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=path.name, dtype=torch.float32).eval()
    # HF rotates these short prompts with LongRoPE's short factors, which jpaged takes within the original context
    engine_args = dict(num_blocks=32, max_model_len=64 if arch == "phi3_longrope" else 256, compilation_cache=False,
                       quantization="gguf" if quantize else None)
    return arch, path, engine_args, oracle


@pytest.fixture(scope="module")
def llm(written):
    _, path, engine_args, _ = written
    return LLM(str(path), **engine_args)


def test_config_and_weights_equal_transformers_gguf_loading(written):
    arch, path, _, oracle = written
    config = load_gguf_config(path)
    assert config["model_type"] == oracle.config.model_type and config["architectures"] == [type(oracle).__name__]
    experts = ("num_local_experts",) if arch == "granitemoe" else ("num_experts",)  # (an alias of the other in Qwen's)
    for key in (*experts, "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                "shared_expert_intermediate_size"):
        assert config.get(key) == getattr(oracle.config, key, None), key
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert config[key] == getattr(oracle.config, key), key
    hf = oracle.config
    assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps)
    assert config["head_dim"] == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    expected = per_expert({name.replace("block_sparse_moe.router.", "mlp.gate.").replace(  # GraniteMoE's, as Qwen MoE's
        "block_sparse_moe.", "mlp."): t.detach().numpy() for name, t in oracle.state_dict().items()})
    ours = dict(load_gguf_weights(path))
    assert set(ours) == set(expected) - ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    for name, array in ours.items():
        np.testing.assert_allclose(array, expected[name], rtol=0, atol=1e-6, err_msg=name)


def test_tokenizer_and_chat_template(llm, tokenizer):
    ours = llm.get_tokenizer()
    for text in [*PROMPTS, "Numbers 1234 and  spaces\n\ttabs!"]:
        assert ours.encode(text, add_special_tokens=False) == tokenizer.encode(text).ids
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ours.eos_token_id == tokenizer.token_to_id("<|im_end|>")


def test_greedy_tokens_and_logprobs_equal_transformers(written, llm, tokenizer):
    arch, _, _, oracle = written
    prompts = [tokenizer.encode(text).ids for text in PROMPTS]
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=1),
                        use_tqdm=False)
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            expected = oracle.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
            logits = oracle(torch.tensor([ids])).logits[0].double()
        assert out.outputs[0].token_ids == expected, arch
        logprobs = torch.log_softmax(logits, -1).numpy()
        got = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:])]
        np.testing.assert_allclose(got, logprobs[np.arange(len(ids) - 1), ids[1:]], atol=2e-4)


def test_expert_sizes_missing_from_older_files_come_from_the_tensors(tokenizer, tmp_path):
    """Qwen2-MoE files converted before llama.cpp wrote the experts' sizes load as the same model."""
    model = random_model("qwen2moe", tokenizer)
    write_gguf(tmp_path / "new.gguf", "qwen2moe", model, tokenizer, False)
    write_gguf(tmp_path / "old.gguf", "qwen2moe", model, tokenizer, False,
               {"qwen2moe.expert_feed_forward_length": None, "qwen2moe.expert_shared_feed_forward_length": None})
    old = load_gguf_config(tmp_path / "old.gguf")
    assert old == load_gguf_config(tmp_path / "new.gguf")
    assert (old["moe_intermediate_size"], old["shared_expert_intermediate_size"]) == (1408, 5632)


def test_a_file_without_a_usable_tokenizer_runs_with_tokenizer_given(tokenizer, tmp_path):
    """No tokenizer metadata, or a special token id outside the vocabulary: the model alone refuses
    with the reason, and runs with the tokenizer given as `tokenizer=`; metadata of the wrong type
    is refused by name."""
    model = random_model("qwen2", tokenizer)
    hf_tokenizer = tmp_path / "hf_tokenizer"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>").save_pretrained(hf_tokenizer)
    write_gguf(tmp_path / "bare.gguf", "qwen2", model, None, False)
    write_gguf(tmp_path / "eos.gguf", "qwen2", model, tokenizer, False, {"tokenizer.ggml.eos_token_id": 9999})
    prompt = tokenizer.encode(PROMPTS[0]).ids
    expected = None
    for name, reason in (("bare", "holds no tokenizer"), ("eos", "eos_token_id 9999 is not a token of its vocabulary "
                                                                 f"of {tokenizer.get_vocab_size()}")):
        for _ in range(2):  # the first load and the cached one say the same
            with pytest.raises(ValueError, match=reason):
                LLM(str(tmp_path / f"{name}.gguf"), num_blocks=16, compilation_cache=False)
        llm = LLM(str(tmp_path / f"{name}.gguf"), tokenizer=str(hf_tokenizer), num_blocks=16, compilation_cache=False)
        out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
        assert out.prompt_token_ids == prompt
        expected = expected or out.outputs[0].token_ids
        assert out.outputs[0].token_ids == expected
    write_gguf(tmp_path / "typed.gguf", "qwen2", model, tokenizer, False, {"qwen2.embedding_length": "64"})
    with pytest.raises(ValueError, match="metadata 'qwen2.embedding_length' is str '64', expected an integer >= 1"):
        load_gguf_config(tmp_path / "typed.gguf")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_files_run_as_their_hf_configs_and_end_turns(arch, tokenizer, tmp_path):
    """A Gemma file's model settings (windows per layer, RoPE of local and global layers, soft caps,
    attention scale, norms) are those of the HF config it came from; its replies also end at
    <end_of_turn> (with that id as stop_reason, as an end token of generation_config.json does), as
    every released Gemma 2 / 3 generation_config.json says. llama.cpp scales the 27B models' queries
    by hidden / heads instead of head_dim (the layer count tells them apart)."""
    from jpaged.config import ModelConfig

    model = random_model(arch, tokenizer)
    write_gguf(tmp_path / "m.gguf", arch, model, tokenizer, False)
    config = load_gguf_config(tmp_path / "m.gguf")
    ours, hf = ModelConfig.from_hf(config), ModelConfig.from_hf(model.config.to_dict())
    end_of_turn, eos = tokenizer.token_to_id("<end_of_turn>"), tokenizer.token_to_id("<|im_end|>")
    assert ours.sliding_windows == hf.sliding_windows and any(ours.sliding_windows)
    assert ours == dataclasses.replace(hf, eos_token_ids=(eos, end_of_turn), bos_token_id=ours.bos_token_id,
                                       max_position_embeddings=ours.max_position_embeddings)

    llm = LLM(str(tmp_path / "m.gguf"), num_blocks=16, compilation_cache=False)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, logit_bias={end_of_turn: 100.0}), use_tqdm=False)[0]
    assert (out.outputs[0].token_ids, out.outputs[0].finish_reason, out.outputs[0].stop_reason) == \
        ([end_of_turn], "stop", end_of_turn)

    write_gguf(tmp_path / "27b.gguf", arch, model, tokenizer, False, {f"{arch}.block_count": GEMMA_27B_LAYERS[arch]})
    assert load_gguf_config(tmp_path / "27b.gguf")["query_pre_attn_scalar"] == model.config.hidden_size // 4
    assert config["query_pre_attn_scalar"] == model.config.head_dim


def test_phi3_file_runs_as_its_hf_config_and_ends_turns(tokenizer, tmp_path):
    """A phi3 file's model settings (partial rotary, window, LongRoPE factors, original context and
    attention factor) are those of the HF config it came from; its replies also end at <|end|>
    (with that id as stop_reason), as Phi-3's generation_config.json and llama.cpp do; an engine
    past the original context takes the long factors, as llama.cpp does for such a context."""
    from jpaged.config import ModelConfig

    model = random_model("phi3_longrope", tokenizer)
    write_gguf(tmp_path / "m.gguf", "phi3", model, tokenizer, False)
    ours = ModelConfig.from_hf(load_gguf_config(tmp_path / "m.gguf"))
    hf = ModelConfig.from_hf(model.config.to_dict())
    end, eos = tokenizer.token_to_id("<|end|>"), tokenizer.token_to_id("<|im_end|>")
    assert ours.rope.long_factor == hf.rope.long_factor == (2.0, 3.0, 5.0, 9.0) and ours.rotary_dim == 8
    assert ours.rope.attention_factor == pytest.approx(hf.rope.attention_factor) and ours.sliding_windows == (8, 8)
    assert ours == dataclasses.replace(hf, eos_token_ids=(eos, end), bos_token_id=ours.bos_token_id,
                                       rope=dataclasses.replace(hf.rope, attention_factor=ours.rope.attention_factor))
    llm = LLM(str(tmp_path / "m.gguf"), num_blocks=32, compilation_cache=False)
    assert llm.engine.model_config.rope.use_long_factor  # the default max_model_len, 256, passes 64
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, logit_bias={end: 100.0}), use_tqdm=False)[0]
    assert (out.outputs[0].token_ids, out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ([end], "stop", end)


def test_granite_scales_missing_from_metadata_are_what_llama_cpp_takes(tokenizer, tmp_path):
    """llama.cpp's converter writes Granite's multipliers only where they are not 0, and llama.cpp
    then scales queries by head_dim ** -0.5 and leaves the rest at 1; SmolLM3's files carry no
    NoPE setting, and llama.cpp leaves RoPE out of every fourth layer."""
    from jpaged.config import ModelConfig

    model = random_model("granite", tokenizer)
    write_gguf(tmp_path / "g.gguf", "granite", model, tokenizer, False,
               {f"granite.{key}": None for key in ("embedding_scale", "residual_scale", "logit_scale", "attention.scale")})
    config = ModelConfig.from_hf(load_gguf_config(tmp_path / "g.gguf"))
    assert (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling) == (1.0, 1.0, 1.0)
    assert config.attention_scale == pytest.approx((64 // 4) ** -0.5)
    write_gguf(tmp_path / "s.gguf", "smollm3", random_model("smollm3", tokenizer), tokenizer, False,
               {"smollm3.block_count": 8})
    assert ModelConfig.from_hf(load_gguf_config(tmp_path / "s.gguf")).rope_layers == (True, True, True, False) * 2


def test_gemma_sentencepiece_vocabulary_tokenizes_as_transformers_reads_it(tmp_path):
    """Gemma files carry a SentencePiece vocabulary (`tokenizer.ggml.model` "llama": pieces, scores,
    byte-fallback tokens): jpaged's tokenizer from its metadata gives the ids, BOS and text that
    transformers' own GGUF tokenizer gives for the same file."""
    words = ["▁", "▁the", "▁sea", "▁old", "▁man", "▁said", "▁and", "▁a", *"etaohsnrildmcwkpygu"]
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
              *(f"<0x{b:02X}>" for b in range(256)), *words]
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "gemma3")
    for key, value in {"block_count": 1, "context_length": 64, "embedding_length": 8, "feed_forward_length": 8,
                       "attention.head_count": 1, "attention.key_length": 8, "attention.sliding_window": 4}.items():
        writer.add_uint32(f"gemma3.{key}", value)
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * 262 + [-float(i) for i in range(len(words))])
    writer.add_token_types([gguf.TokenType.CONTROL] * 6 + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(words))
    for key, token_id in {"bos": 2, "eos": 1, "unknown": 3, "padding": 0}.items():
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", token_id)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).normal(size=(len(pieces), 8)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = load_gguf_tokenizer(tmp_path / "spm.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["the old man said", "The sea, and a ünïcode ☃ word", "  two  spaces\nnew<end_of_turn>"]:
        ids = ours(text).input_ids
        assert ids == theirs(text).input_ids and ids[0] == 2
        assert ours.decode(ids) == theirs.decode(ids)
