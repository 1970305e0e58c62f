"""gpt-oss as it ships: experts in MXFP4 (`*_blocks` / `*_scales` tensors), read into the model.

Oracles: transformers' own MXFP4 dequantization (`convert_moe_packed_tensors`) for the values, and
HF's `GptOssForCausalLM` holding those dequantized experts for the tokens and logprobs of a
folder whose experts are stored as MXFP4, as openai/gpt-oss-20b stores them. The architecture's
other parts (sinks, biases, windows, the clamped SwiGLU) are `test_hf_parity.py`'s gpt_oss case.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
from hf_models import hf_greedy, hf_logits, save_random_model  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402
from jpaged.config import ModelConfig  # noqa: E402
from jpaged.loader.weights import dequantize_mxfp4, split_fused_tensors  # noqa: E402

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
              max_position_embeddings=256, tie_word_embeddings=False)


def random_mxfp4(rng, experts: int, rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks and scales of an `[experts, rows, columns]` MXFP4 tensor (values of order 0.1)."""
    blocks = rng.integers(0, 256, (experts, rows, columns // 32, 16), dtype=np.uint8)
    scales = rng.integers(122, 126, (experts, rows, columns // 32), dtype=np.uint8)
    return blocks, scales


def test_mxfp4_values_are_transformers_own():
    rng = np.random.default_rng(0)
    blocks, scales = random_mxfp4(rng, 3, 10, 128)
    scales[0, 0, 0], scales[1, 2, 3] = 0, 255  # the smallest and largest powers of two
    want = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales), want.numpy())
    with pytest.raises(ValueError, match="do not pair"):
        dequantize_mxfp4(blocks, scales[..., :2])


@pytest.fixture(scope="module")
def mxfp4_folder(tmp_path_factory):
    """A random gpt-oss folder whose experts' projections are stored as MXFP4, and HF's model
    holding the same experts dequantized by transformers."""
    folder = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    model = save_random_model(folder, transformers.GptOssConfig(**CONFIG), seed=7)
    tensors = load_file(folder / "model.safetensors")
    rng = np.random.default_rng(1)
    hidden, intermediate, experts = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_local_experts"]
    for i, layer in enumerate(model.model.layers):
        for proj, rows, columns in (("gate_up_proj", 2 * intermediate, hidden), ("down_proj", hidden, intermediate)):
            blocks, scales = random_mxfp4(rng, experts, rows, columns)
            name = f"model.layers.{i}.mlp.experts.{proj}"
            del tensors[name]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            dequantized = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                           dtype=torch.float32)
            with torch.no_grad():
                getattr(layer.mlp.experts, proj).copy_(dequantized)
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                         "model.layers.*.mlp.router"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, model


def test_an_mxfp4_checkpoint_gives_hf_tokens_and_logprobs(mxfp4_folder):
    folder, model = mxfp4_folder
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, CONFIG["vocab_size"], n).tolist() for n in (21, 6)]
    llm = LLM(str(folder), dtype="float32", num_blocks=32, max_num_batched_tokens=64, max_model_len=128)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=1),
                           use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert list(out.outputs[0].token_ids) == hf_greedy(model, prompt, 12)
        logits = hf_logits(model, prompt)
        expected = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        got = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
        np.testing.assert_allclose(got, [expected[i, t] for i, t in enumerate(prompt[1:])], atol=1e-4)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_an_mxfp4_tensor_without_its_scales_is_refused(mxfp4_folder):
    folder, _ = mxfp4_folder
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    tensors = load_file(folder / "model.safetensors")
    weights = [(name, tensor) for name, tensor in tensors.items() if name != "model.layers.1.mlp.experts.down_proj_scales"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts.down_proj_scales"):
        list(split_fused_tensors(weights, cfg))
