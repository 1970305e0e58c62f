"""Weight-only int8 / fp8 quantization: the scheme, the CPU kernel against its jnp reference, and
whole models against HF transformers.

The model oracle is HF itself on a fake-quantized checkpoint: the test rounds each quantized
tensor of a saved random checkpoint to the scheme (symmetric, one scale per output row and group
of 32 inputs, or per row where its length is not a multiple of 32, written
here in torch) and back to float32, saves that, and runs HF's forward on it. jpaged loading the
original checkpoint with `quantization=...` must give the same prompt logprobs to float32
rounding. A looser check against the unquantized HF model bounds the quantization error itself.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jpaged import LLM, SamplingParams
from jpaged.models.quantization import gguf_packed, quantize
from pallas_kernels.cpu_quantized_matmul import cpu_block_matmul, cpu_quantized_matmul
from pallas_kernels.quantized_matmul import (
    BLOCK_FORMATS,
    block_format,
    block_matmul,
    dequantize,
    dequantize_blocks,
    quantized_matmul,
    row_bytes,
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
    """`weight [..., out, in]` rounded to the scheme per output row and group of 32 inputs (the
    whole row where `in` is not a multiple of 32) and back to float32 (torch)."""
    k = weight.shape[-1]
    group = 32 if k % 32 == 0 else k
    grouped = weight.reshape(*weight.shape[:-1], k // group, group)
    scale = grouped.abs().amax(dim=-1, keepdim=True) / LARGEST[scheme]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scheme == "int8":
        values = torch.clamp(torch.round(grouped / scale), -127, 127)
    else:
        values = torch.clamp(grouped / scale, -448, 448).to(torch.float8_e4m3fn).to(torch.float32)
    return (values * scale).reshape(weight.shape)


# --- the scheme ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("k, groups", [(24, 1), (96, 3)], ids=["per-channel", "groups"])
def test_quantize_matches_the_torch_scheme(scheme, k, groups):
    weight = np.random.default_rng(1).standard_normal((3, 40, k)).astype(np.float32)
    weight[0, 5] = 0.0  # an all-zero channel keeps scale 1
    weight[1, 2, -1] = 50.0  # an outlier coarsens its own group's scale only
    values, scale = quantize(weight, scheme)
    assert values.dtype == (np.int8 if scheme == "int8" else ml_dtypes.float8_e4m3fn)
    assert scale.shape == (3, 40, groups) and scale.dtype == np.float32 and (scale[0, 5] == 1.0).all()
    widened = np.asarray(jnp.swapaxes(dequantize(jnp.asarray(values), jnp.asarray(scale), jnp.float32), -1, -2))
    np.testing.assert_allclose(widened, fake_quantize(torch.from_numpy(weight), scheme).numpy(), rtol=1e-6, atol=1e-7)
    group = k // groups
    by_group = lambda a: np.abs(a).reshape(3, 40, groups, group).max(axis=-1)  # noqa: E731
    relative = by_group(widened - weight) / np.maximum(by_group(weight), 1e-9)
    assert relative.max() <= (0.5 / 127 if scheme == "int8" else 1 / 16) + 1e-6
    if groups > 1:
        assert scale[1, 2, 0] < scale[1, 2, -1] / 10


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="'int4'"):
        quantize(np.ones((2, 2), np.float32), "int4")
    with pytest.raises(ValueError, match="inf or nan"):
        quantize(np.array([[1.0, np.nan]], np.float32), "int8")
    with pytest.raises(ValueError, match="quantization must be"):
        LLM(quantization="int4")


# --- the CPU kernel -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kernels(cpu_kernels_built):
    pass


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


def test_cpu_kernel_gives_the_same_result_under_concurrent_calls(kernels):
    """Calls from several threads at once (as emulated devices or replicas make them) share the
    kernel's helper threads; each result equals the same call made alone."""
    rng = np.random.default_rng(7)
    cases = []
    for rows, k, n in [(1, 576, 1536), (4, 576, 192), (32, 256, 512)]:
        values, scale = quantize(rng.standard_normal((n, k)).astype(np.float32), "int8")
        cases.append((jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32)), values, scale))
    multiply = jax.jit(cpu_quantized_matmul)
    alone = [np.asarray(multiply(*case)) for case in cases]

    def repeat(i: int) -> bool:
        return all(np.array_equal(np.asarray(multiply(*cases[i % 3])), alone[i % 3]) for _ in range(40))

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(repeat, range(6)))


@pytest.mark.parametrize("rows", [1, 16], ids=["direct", "widened"])
def test_cpu_kernel_widens_every_fp8_value_exactly(kernels, rows):
    """Each of the 254 non-NaN float8_e4m3fn bit patterns (subnormals and both signs) read by the
    kernel as ml_dtypes reads it, in every vector lane: row i of w holds them all, rotated by i;
    x's one-hot rows pick one column, so each output is one weight times a power-of-two scale."""
    bits = np.array([b for b in range(256) if b & 0x7F != 0x7F], np.uint8)
    k = 40  # two vectors of 16 and a tail
    w = bits[(np.arange(len(bits))[:, None] + np.arange(k)[None, :]) % len(bits)]
    values = w.view(ml_dtypes.float8_e4m3fn)
    scale = np.full((len(bits), 1), 0.5, np.float32)
    x = np.zeros((rows, k), np.float32)
    x[np.arange(rows), np.arange(rows) * 7 % k] = 1.0
    got = np.asarray(jax.jit(cpu_quantized_matmul)(jnp.asarray(x), jnp.asarray(values), jnp.asarray(scale)))
    np.testing.assert_array_equal(got, x @ (values.astype(np.float32) * 0.5).T)


def test_cpu_kernel_scales_each_group():
    """Grouped scales of very different sizes: the kernel (both paths) against float64 with each
    group widened by its own scale; a scale of the wrong shape is refused."""
    rng = np.random.default_rng(7)
    n, k = 40, 128
    values = rng.integers(-127, 128, (n, k)).astype(np.int8)
    scale = (10.0 ** rng.uniform(-4, 1, (n, k // 32))).astype(np.float32)
    widened = values.astype(np.float64) * np.repeat(scale, 32, axis=1)
    for rows in (2, 9):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        got = np.asarray(jax.jit(cpu_quantized_matmul)(jnp.asarray(x), jnp.asarray(values), jnp.asarray(scale)))
        want = x.astype(np.float64) @ widened.T
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match=r"takes scales of shape \(40, 4\).*got \(40,\)"):
        cpu_quantized_matmul(jnp.ones((1, k)), jnp.asarray(values), jnp.asarray(scale[:, 0]))


# --- GGML blocks (GGUF kept packed) ---------------------------------------------------------------

K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
HALF_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of a block's float16 d (and dmin)


def gguf_blocks(weight: np.ndarray, kind: str) -> np.ndarray:
    """`weight [N, K]` quantized by the `gguf` package into GGML block rows, uint8 `[N, row bytes]`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    return gguf_quantize(weight, GGMLQuantizationType[kind])


def block_rows(rng: np.random.Generator, n: int, k: int, kind: str, scale: float = 1e-3) -> np.ndarray:
    """Rows `[n, row bytes]` of `n x k` weights in format `kind`: the `gguf` package's quantization
    of random weights (normal, std `scale` * 1000), or, for the formats it cannot quantize (the
    K-quants), random bytes with each block's float16 d and dmin normal with std `scale` (any
    bytes are valid elsewhere)."""
    try:
        return gguf_blocks(rng.standard_normal((n, k)).astype(np.float32) * (scale * 1e3), kind)
    except NotImplementedError:
        pass
    fmt = BLOCK_FORMATS[kind]
    blocks = rng.integers(0, 256, (n, k // fmt.block_weights, fmt.block_bytes), dtype=np.uint8)
    for offset in HALF_FIELDS[kind]:
        half = (rng.standard_normal(blocks.shape[:2]) * scale).astype(np.float16)
        blocks[..., offset:offset + 2] = half[..., None].view(np.uint8)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("kind", list(BLOCK_FORMATS))
def test_block_dequantization_matches_the_gguf_package(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    fmt = BLOCK_FORMATS[kind]
    n, k = 24, 3 * fmt.block_weights
    rows = block_rows(np.random.default_rng(2), n, k, kind)
    assert rows.dtype == np.uint8 and rows.shape == (n, row_bytes(kind, k)) == (n, 3 * fmt.block_bytes)
    assert block_format(rows, k, (kind,)) == kind
    expected = gguf_dequantize(rows, GGMLQuantizationType[kind])
    np.testing.assert_array_equal(np.asarray(dequantize_blocks(jnp.asarray(rows), kind)), expected)
    # leading axes (looked-up embedding rows) dequantize row by row
    np.testing.assert_array_equal(np.asarray(dequantize_blocks(jnp.asarray(rows.reshape(4, 6, -1)), kind)),
                                  expected.reshape(4, 6, k))
    with pytest.raises(ValueError, match="none of"):
        block_format(rows, k - fmt.block_weights)


def test_block_format_tells_formats_by_row_size_within_the_kinds_given():
    rows = np.zeros((2, 2 * 144), np.uint8)  # two Q4_K super-blocks, or sixteen Q4_0 blocks
    with pytest.raises(ValueError, match="288 bytes hold 512 weights in each of Q4_0, Q4_K"):
        block_format(rows, 512)
    assert block_format(rows, 512, ("Q4_K", "Q6_K", "Q8_0")) == "Q4_K"
    assert block_format(rows, 512, ("Q4_0", "Q6_K")) == "Q4_0"
    with pytest.raises(ValueError, match="none of Q4_K, Q5_K"):
        block_format(np.zeros((2, 18), np.uint8), 32, ("Q4_K", "Q5_K"))
    with pytest.raises(ValueError, match="multiple of 256 weights, got K = 576"):
        row_bytes("Q6_K", 576)
    assert row_bytes("Q6_K", 768) == 3 * 210 and row_bytes("Q4_1", 64) == 2 * 20


@pytest.mark.parametrize("matmul", [block_matmul, cpu_block_matmul], ids=["reference", "cpu"])
def test_block_matmul_rejects_rows_that_do_not_fit(kernels, matmul):
    w = jnp.zeros((4, 2 * 210), jnp.uint8)  # two Q6_K super-blocks a row
    with pytest.raises(ValueError, match="Q6_K rows of 256 weights take 210 bytes, got rows of 420"):
        matmul(jnp.ones((1, 256), jnp.float32), w, "Q6_K")
    with pytest.raises(ValueError, match="multiple of 256 weights, got K = 320"):
        matmul(jnp.ones((1, 320), jnp.float32), w, "Q6_K")
    with pytest.raises(ValueError, match="whole blocks of 144 bytes, got rows of 420"):
        dequantize_blocks(w, "Q4_K")


def test_gguf_packed_keeps_k_quants_and_one_format_per_row_size(caplog):
    layer = "model.layers.0."
    types = {"model.embed_tokens.weight": "Q4_K", f"{layer}self_attn.q_proj.weight": "Q4_K",
             f"{layer}self_attn.v_proj.weight": "Q6_K", f"{layer}mlp.down_proj.weight": "Q5_K",
             f"{layer}mlp.up_proj.weight": "Q4_0", "lm_head.weight": "Q8_0"}
    with caplog.at_level("WARNING", logger="jpaged"):
        kept = gguf_packed(types)
    # Q4_0 rows are the size of Q4_K's (K a multiple of 256): the rarer format is dequantized at load
    assert kept == {name: kind for name, kind in types.items() if kind != "Q4_0"}
    assert "Q4_0 have rows the size of the Q4_K tensors" in caplog.text
    assert gguf_packed({f"{layer}mlp.up_proj.weight": "Q4_0"}) == {f"{layer}mlp.up_proj.weight": "Q4_0"}


# (format, (rows, in, out)): rows on both sides of the kernel's direct / widened-once switch, out
# on and off multiples of 16 and past 32 blocks of 16 (several per work item)
BLOCK_CASES = [(kind, shape) for kind in ("Q4_0", "Q4_1", "Q8_0")
               for shape in [(1, 576, 1536), (5, 64, 37), (64, 1536, 192), (9, 32, 16)]]
BLOCK_CASES += [(kind, shape) for kind in K_QUANTS
                for shape in [(1, 256, 37), (3, 768, 200), (17, 512, 45), (64, 768, 130), (1, 512, 600)]]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}")
def test_cpu_kernel_matches_reference_on_blocks(kernels, case):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    kind, (rows, k, n) = case
    rng = np.random.default_rng(rows + k + n)
    w = block_rows(rng, n, k, kind)
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
    with jax.default_matmul_precision("highest"):
        expected = np.asarray(jax.jit(block_matmul, static_argnums=2)(x, jnp.asarray(w), kind))
    got = np.asarray(jax.jit(cpu_block_matmul, static_argnums=2)(x, jnp.asarray(w), kind))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # the same as the float64 product with the gguf package's dequantization
    oracle = np.asarray(x, np.float64) @ gguf_dequantize(w, GGMLQuantizationType[kind]).astype(np.float64).T
    np.testing.assert_allclose(got, oracle, rtol=1e-4, atol=1e-5 * np.abs(oracle).max())
    # a row's result does not depend on the rest of the batch
    alone = np.asarray(jax.jit(cpu_block_matmul, static_argnums=2)(x[-1:], jnp.asarray(w), kind))
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
    # q / k / v and gate / up fused in the checkpoint: quantized per output row, fused or split alike.
    "phi3": ("Phi3Config", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                tie_word_embeddings=False)),
}
CASES = [("llama", "int8"), ("llama", "fp8"), ("qwen2_tied", "int8"), ("mixtral", "int8"), ("qwen2_moe", "fp8"),
         ("phi3", "int8")]


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
    got = np.array([out.prompt_logprobs[1 + i][t].logprob for i, t in where])
    np.testing.assert_allclose(got, [expected[i, t] for i, t in where], atol=2e-3)
    # the quantization error itself, against the float model: small next to the logits' spread
    unquantized = log_softmax(hf_logits(float_model, prompt))
    error = np.abs(np.array([unquantized[i, t] for i, t in where]) - got)
    assert error.mean() < (0.05 if scheme == "int8" else 0.2) * unquantized.std()
    assert llm.engine.stats().weight_bytes < 0.5 * _float_bytes(tmp_path / "float")


def _float_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# --- the default model --------------------------------------------------------------------------

def default_model_run(quantization: str | None, kv_cache_dtype: str = "auto") -> dict:
    """Prompt logprobs of the first test chat prompt, greedy answers to all of them, weight and KV
    bytes."""
    from test_default_model import QUESTIONS

    from jpaged.llm import chat_token_ids

    llm = LLM(None, num_blocks=64, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    prompts = [chat_token_ids(llm.get_tokenizer(), [{"role": "user", "content": q}]) for q in QUESTIONS]
    scored = llm.generate({"prompt_token_ids": prompts[0]},
                          SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5), use_tqdm=False)[0]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=24),
                           use_tqdm=False)
    return {"logprobs": scored.prompt_logprobs, "answers": [o.outputs[0].token_ids for o in outputs],
            "weight_bytes": llm.engine.stats().weight_bytes, "kv_cache_bytes": llm.engine.stats().kv_cache_bytes}


@pytest.fixture(scope="module")
def float_run(model_path):
    return default_model_run(None)


def test_default_model_greedy_chat_answers_unchanged_with_int8(float_run):
    run = default_model_run("int8")
    assert run["answers"] == float_run["answers"]
    assert run["weight_bytes"] < 0.3 * float_run["weight_bytes"]


def test_default_model_greedy_chat_answers_unchanged_with_int8_kv_cache(float_run):
    run = default_model_run(None, kv_cache_dtype="int8")
    assert run["answers"] == float_run["answers"]
    assert run["kv_cache_bytes"] < 0.3 * float_run["kv_cache_bytes"]


def test_gguf_packed_default_model_matches_dequantized_at_load(float_run, model_path):
    """The default model's Q4_1 / Q8_0 tensors kept packed: the same prompt logprobs (to float
    rounding) and greedy answers as the same file dequantized at load, in about the file's size."""
    run = default_model_run("gguf")
    assert run["answers"] == float_run["answers"]
    for entry, packed_entry in zip(float_run["logprobs"][1:], run["logprobs"][1:]):
        shared = entry.keys() & packed_entry.keys()
        assert len(shared) >= 3
        np.testing.assert_allclose([packed_entry[t].logprob for t in shared], [entry[t].logprob for t in shared],
                                   atol=1e-3)
    assert run["weight_bytes"] < 0.25 * float_run["weight_bytes"]
    assert run["weight_bytes"] < 1.2 * model_path.stat().st_size


def write_k_quant_gguf(path: Path, vocab: int = 272, hidden: int = 256, intermediate: int = 512) -> None:
    """A 2-layer llama GGUF (4 heads of 64, 2 KV heads) of random block bytes in the K-quants
    (Q4_K, Q5_K, Q6_K) with Q8_0 and Q4_0 among them, and a word-level tokenizer. Layer 0's q / k
    / v and gate / up are of mixed types (kept as separate projections), layer 1's of one type
    each (fused)."""
    import gguf

    rng = np.random.default_rng(5)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 2, "context_length": 128, "embedding_length": hidden,
                       "feed_forward_length": intermediate, "attention.head_count": 4,
                       "attention.head_count_kv": 2, "vocab_size": vocab}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_token_types([1] * vocab)
    writer.add_token_scores([0.0] * vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def add(name, n, k, kind):
        rows = block_rows(rng, n, k, kind, scale=1e-4)
        writer.add_tensor(name, rows, raw_shape=rows.shape, raw_dtype=gguf.GGMLQuantizationType[kind])

    def add_norm(name):
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    add("token_embd.weight", vocab, hidden, "Q5_K")
    add("output.weight", vocab, hidden, "Q6_K")
    add_norm("output_norm.weight")
    for i in range(2):
        add_norm(f"blk.{i}.attn_norm.weight")
        add_norm(f"blk.{i}.ffn_norm.weight")
        for name, n, k, kind in [("attn_q", hidden, hidden, "Q4_K"), ("attn_k", 128, hidden, "Q4_K"),
                                 ("attn_v", 128, hidden, ("Q8_0", "Q4_K")[i]),
                                 ("attn_output", hidden, hidden, "Q5_K"), ("ffn_gate", intermediate, hidden, "Q4_K"),
                                 ("ffn_up", intermediate, hidden, ("Q4_0", "Q4_K")[i]),
                                 ("ffn_down", hidden, intermediate, "Q6_K")]:
            add(f"blk.{i}.{name}.weight", n, k, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_k_quants_packed_match_dequantized_at_load(tmp_path):
    """K-quant tensors kept packed (Q4_0 beside Q4_K dequantized at load): the same prompt
    logprobs (to float rounding) and greedy tokens as the same file dequantized at load."""
    path = tmp_path / "k_quants.gguf"
    write_k_quant_gguf(path)
    prompt = np.random.default_rng(3).integers(3, 272, 29).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=5)
    outputs, weight_bytes = {}, {}
    for quantization in (None, "gguf"):
        llm = LLM(str(path), dtype="float32", quantization=quantization, num_blocks=32, max_model_len=128)
        outputs[quantization] = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        weight_bytes[quantization] = llm.engine.stats().weight_bytes
    layers = nnx.to_pure_dict(llm.engine.runner.state)["layers"]  # the last one, packed
    assert {"q_proj", "gate_proj"} <= set(layers[0]) and {"qkv_proj", "gate_up_proj"} <= set(layers[1])
    dequantized, packed = outputs[None], outputs["gguf"]
    assert packed.outputs[0].token_ids == dequantized.outputs[0].token_ids
    for entry, packed_entry in zip(dequantized.prompt_logprobs[1:], packed.prompt_logprobs[1:]):
        shared = entry.keys() & packed_entry.keys()
        assert len(shared) >= 4
        np.testing.assert_allclose([packed_entry[t].logprob for t in shared], [entry[t].logprob for t in shared],
                                   atol=1e-3)
    assert weight_bytes["gguf"] < 0.4 * weight_bytes[None]


def test_gguf_packing_needs_a_gguf_model(tmp_path):
    config = transformers.LlamaConfig(**{**COMMON, **MODELS["llama"][1]})
    save_random_model(tmp_path, config, seed=1)
    with pytest.raises(ValueError, match="quantization='gguf'"):
        LLM(str(tmp_path), quantization="gguf", num_blocks=16, max_model_len=64)


def test_gguf_packing_refuses_a_device_layout_by_name():
    from jpaged.llm import engine_config
    from jpaged.model_runner import ModelRunner

    config = engine_config(None, quantization="gguf", data_parallel_size=2, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="runs on one device, not with tensor_parallel_size=2, data_parallel_size=2"):
        ModelRunner(None, config, None, None, mesh=object(), packed={"model.layers.0.mlp.up_proj.weight": "Q4_1"})


def test_cli_flag_reaches_the_engine():
    from jpaged.cli import _parser, engine_kwargs

    for flag in ("int8", "fp8", "gguf"):
        assert engine_kwargs(_parser().parse_args(["generate", "--quantization", flag]))["quantization"] == flag
    for flag in ("auto", "int8", "fp8_e4m3"):
        assert engine_kwargs(_parser().parse_args(["serve", "--kv-cache-dtype", flag]))["kv_cache_dtype"] == flag
