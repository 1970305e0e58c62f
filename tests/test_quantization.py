"""Weight-only int8 / fp8 quantization: the scheme, the CPU kernel against its jnp reference, and
whole models against HF transformers.

The model oracle is HF itself on a fake-quantized checkpoint: the test rounds each quantized
tensor of a saved random checkpoint to the scheme (symmetric, one scale per output row, written
here in torch) and back to float32, saves that, and runs HF's forward on it. jpaged loading the
original checkpoint with `quantization=...` must give the same prompt logprobs to float32
rounding. A looser check against the unquantized HF model bounds the quantization error itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.cache_dir import cache_dir
from jpaged.models.quantization import quantize
from pallas_kernels import cpu_kernels
from pallas_kernels.cpu_quantized_matmul import cpu_block_matmul, cpu_quantized_matmul
from pallas_kernels.quantized_matmul import (
    BLOCK_FORMATS,
    block_format,
    block_matmul,
    dequantize,
    dequantize_blocks,
    quantized_matmul,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from hf_models import hf_logits, save_random_model, torch_single_thread  # noqa: E402

# HF tensor names the schemes quantize: projections, experts, embeddings, LM head (not routers).
QUANTIZED_SUFFIXES = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight", "embed_tokens.weight",
                      "lm_head.weight")
LARGEST = {"int8": 127.0, "fp8": 448.0}


def fake_quantize(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """`weight [out, in]` rounded to the scheme per output row and back to float32 (torch)."""
    scale = weight.abs().amax(dim=-1, keepdim=True) / LARGEST[scheme]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scheme == "int8":
        values = torch.clamp(torch.round(weight / scale), -127, 127)
    else:
        values = torch.clamp(weight / scale, -448, 448).to(torch.float8_e4m3fn).to(torch.float32)
    return values * scale


# --- the scheme ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantize_matches_the_torch_scheme(scheme):
    weight = np.random.default_rng(1).standard_normal((3, 40, 24)).astype(np.float32)
    weight[0, 5] = 0.0  # an all-zero channel keeps scale 1
    values, scale = quantize(weight, scheme)
    assert values.dtype == (np.int8 if scheme == "int8" else ml_dtypes.float8_e4m3fn)
    assert scale.shape == (3, 40) and scale.dtype == np.float32 and scale[0, 5] == 1.0
    widened = values.astype(np.float32) * scale[..., None]
    np.testing.assert_allclose(widened, fake_quantize(torch.from_numpy(weight), scheme).numpy(), rtol=1e-6, atol=1e-7)
    relative = np.abs(widened - weight).max(axis=-1) / np.maximum(np.abs(weight).max(axis=-1), 1e-9)
    assert relative.max() <= (0.5 / 127 if scheme == "int8" else 1 / 16) + 1e-6


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="'int4'"):
        quantize(np.ones((2, 2), np.float32), "int4")
    with pytest.raises(ValueError, match="inf or nan"):
        quantize(np.array([[1.0, np.nan]], np.float32), "int8")
    with pytest.raises(ValueError, match="quantization must be"):
        LLM(quantization="int4")


# --- the CPU kernel -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kernels():
    if cpu_kernels.compiler() is None:
        pytest.skip("no C++ compiler")
    cpu_kernels.start_build(cache_dir() / "kernels")
    if reason := cpu_kernels.wait():
        pytest.fail(reason)


# (rows, in, out): one and many rows, in and out on and off multiples of 16, wide and narrow.
SHAPES = [(1, 576, 1536), (3, 64, 37), (7, 33, 200), (64, 576, 192), (130, 1536, 576), (5, 96, 16), (1, 8, 5)]


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_matches_reference(kernels, scheme, shape):
    rows, k, n = shape
    rng = np.random.default_rng(rows * k + n)
    values, scale = quantize(rng.standard_normal((n, k)).astype(np.float32), scheme)
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
    with jax.default_matmul_precision("highest"):
        expected = np.asarray(jax.jit(quantized_matmul)(x, values, scale))
    got = np.asarray(jax.jit(cpu_quantized_matmul)(x, values, scale))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # the same as the float product with the weight widened
    widened = np.asarray(dequantize(jnp.asarray(values), jnp.asarray(scale), jnp.float32))
    np.testing.assert_allclose(got, np.asarray(x) @ widened, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # a row's result does not depend on the rest of the batch
    alone = np.asarray(jax.jit(cpu_quantized_matmul)(x[-1:], values, scale))
    np.testing.assert_array_equal(alone[0], got[-1])


# --- GGML blocks (GGUF kept packed) ---------------------------------------------------------------

def gguf_blocks(weight: np.ndarray, kind: str) -> np.ndarray:
    """`weight [N, K]` quantized by the `gguf` package into GGML block rows, uint8 `[N, row bytes]`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    return gguf_quantize(weight, GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind", list(BLOCK_FORMATS))
def test_block_dequantization_matches_the_gguf_package(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    weight = np.random.default_rng(2).standard_normal((24, 96)).astype(np.float32) * 3
    rows = gguf_blocks(weight, kind)
    assert rows.dtype == np.uint8 and rows.shape == (24, 96 // 32 * BLOCK_FORMATS[kind][1])
    assert block_format(rows, 96) == kind
    expected = gguf_dequantize(rows, GGMLQuantizationType[kind])
    np.testing.assert_array_equal(np.asarray(dequantize_blocks(jnp.asarray(rows), kind)), expected)
    with pytest.raises(ValueError, match="none of"):
        block_format(rows, 64)


@pytest.mark.parametrize("kind", list(BLOCK_FORMATS))
@pytest.mark.parametrize("shape", [(1, 576, 1536), (5, 64, 37), (64, 1536, 192), (9, 32, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_matches_reference_on_blocks(kernels, kind, shape):
    rows, k, n = shape
    rng = np.random.default_rng(rows + k + n)
    w = jnp.asarray(gguf_blocks(rng.standard_normal((n, k)).astype(np.float32), kind))
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
    with jax.default_matmul_precision("highest"):
        expected = np.asarray(jax.jit(block_matmul, static_argnums=2)(x, w, kind))
    got = np.asarray(jax.jit(cpu_block_matmul, static_argnums=2)(x, w, kind))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    alone = np.asarray(jax.jit(cpu_block_matmul, static_argnums=2)(x[-1:], w, kind))
    np.testing.assert_array_equal(alone[0], got[-1])


# --- whole models against HF --------------------------------------------------------------------

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
MODELS = {
    "llama": ("LlamaConfig", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=False)),
    "qwen2_tied": ("Qwen2Config", dict(vocab_size=320, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True, use_sliding_window=False)),
    "mixtral": ("MixtralConfig", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None, tie_word_embeddings=False)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, norm_topk_prob=False,
                                         tie_word_embeddings=False, use_sliding_window=False)),
}
CASES = [("llama", "int8"), ("llama", "fp8"), ("qwen2_tied", "int8"), ("mixtral", "int8"), ("qwen2_moe", "fp8")]


def save_fake_quantized(folder: Path, target: Path, scheme: str) -> list[str]:
    """Copy the checkpoint in `folder` to `target` with every quantized tensor fake-quantized;
    returns the names of those tensors."""
    shutil.copytree(folder, target)
    changed = []
    for file in target.glob("*.safetensors"):
        tensors = safetensors_torch.load_file(file)
        for name, tensor in tensors.items():
            if name.endswith(QUANTIZED_SUFFIXES):
                tensors[name] = fake_quantize(tensor.float(), scheme).contiguous()
                changed.append(name)
        safetensors_torch.save_file(tensors, file, metadata={"format": "pt"})
    return changed


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_quantized_model_matches_hf_on_fake_quantized_weights(case, tmp_path):
    name, scheme = case
    config_class, overrides = MODELS[name]
    config = getattr(transformers, config_class)(**{**COMMON, **overrides})
    float_model = save_random_model(tmp_path / "float", config, seed=7)
    changed = save_fake_quantized(tmp_path / "float", tmp_path / "fake", scheme)
    assert any("embed_tokens" in n for n in changed) and any("down" in n or "w2" in n for n in changed)
    with torch_single_thread():
        oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fake", dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    prompt = np.random.default_rng(3).integers(3, config.vocab_size, 29).tolist()
    expected = log_softmax(hf_logits(oracle, prompt))

    llm = LLM(str(tmp_path / "float"), dtype="float32", quantization=scheme, num_blocks=32, max_model_len=128)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=20),
                       use_tqdm=False)[0]
    where = [(i, t) for i, entry in enumerate(out.prompt_logprobs[1:]) for t in entry]
    got = np.array([out.prompt_logprobs[1 + i][t] for i, t in where])
    np.testing.assert_allclose(got, [expected[i, t] for i, t in where], atol=2e-3)
    # the quantization error itself, against the float model: small next to the logits' spread
    unquantized = log_softmax(hf_logits(float_model, prompt))
    error = np.abs(np.array([unquantized[i, t] for i, t in where]) - got)
    assert error.mean() < (0.05 if scheme == "int8" else 0.2) * unquantized.std()
    assert llm.engine.stats().weight_bytes < 0.5 * _float_bytes(tmp_path / "float")


def _float_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# --- the default model --------------------------------------------------------------------------

def default_model_run(quantization: str | None) -> dict:
    """Prompt logprobs of the first test chat prompt, greedy answers to all of them, weight bytes."""
    from test_default_model import QUESTIONS

    from jpaged.llm import chat_token_ids

    llm = LLM(None, num_blocks=64, quantization=quantization)
    prompts = [chat_token_ids(llm.get_tokenizer(), [{"role": "user", "content": q}]) for q in QUESTIONS]
    scored = llm.generate({"prompt_token_ids": prompts[0]},
                          SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5), use_tqdm=False)[0]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=24),
                           use_tqdm=False)
    return {"logprobs": scored.prompt_logprobs, "answers": [o.outputs[0].token_ids for o in outputs],
            "weight_bytes": llm.engine.stats().weight_bytes}


@pytest.fixture(scope="module")
def float_run(model_path):
    return default_model_run(None)


def test_default_model_greedy_chat_answers_unchanged_with_int8(float_run):
    run = default_model_run("int8")
    assert run["answers"] == float_run["answers"]
    assert run["weight_bytes"] < 0.3 * float_run["weight_bytes"]


def test_gguf_packed_default_model_matches_dequantized_at_load(float_run, model_path):
    """The default model's Q4_1 / Q8_0 tensors kept packed: the same prompt logprobs (to float
    rounding) and greedy answers as the same file dequantized at load, in about the file's size."""
    run = default_model_run("gguf")
    assert run["answers"] == float_run["answers"]
    for entry, packed_entry in zip(float_run["logprobs"][1:], run["logprobs"][1:]):
        shared = entry.keys() & packed_entry.keys()
        assert len(shared) >= 3
        np.testing.assert_allclose([packed_entry[t] for t in shared], [entry[t] for t in shared], atol=1e-3)
    assert run["weight_bytes"] < 0.25 * float_run["weight_bytes"]
    assert run["weight_bytes"] < 1.2 * model_path.stat().st_size


def test_gguf_packing_needs_a_gguf_model(tmp_path):
    config = transformers.LlamaConfig(**{**COMMON, **MODELS["llama"][1]})
    save_random_model(tmp_path, config, seed=1)
    with pytest.raises(ValueError, match="quantization='gguf'"):
        LLM(str(tmp_path), quantization="gguf", num_blocks=16, max_model_len=64)


def test_cli_flag_reaches_the_engine():
    from jpaged.cli import _parser, engine_kwargs

    for flag in ("int8", "fp8", "gguf"):
        assert engine_kwargs(_parser().parse_args(["generate", "--quantization", flag]))["quantization"] == flag
