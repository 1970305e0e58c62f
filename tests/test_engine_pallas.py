"""The engine on the Pallas attention backend (interpret mode on CPU, compiled on a GPU) gives the reference's tokens."""

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from hf_models import save_random_model  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("llama_head_dim_16")
    save_random_model(folder, config, seed=7)
    return str(folder)


def greedy(folder, prompts, **engine_args):
    llm = LLM(folder, num_blocks=32, block_size=16, dtype="float32", max_num_batched_tokens=8, **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_pallas_backend_generates_the_reference_tokens(model_folder):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, n).tolist() for n in (33, 16, 5)]
    expected = greedy(model_folder, prompts, attention_backend="reference")
    assert len({t for tokens in expected for t in tokens}) > 8
    assert greedy(model_folder, prompts, attention_backend="pallas",
                  attention_interpret=jax.default_backend() == "cpu") == expected
