"""A step's working memory: prompt logprobs in tiles of positions, checked against the untiled
computation, against HF over a prompt of several tiles, and through XLA's memory analysis of the
compiled step (`EngineStats.step_temp_bytes`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.model_runner import PROMPT_LOGPROBS_TILE, tiled_prompt_logprobs
from jpaged.sampler import prompt_logprobs

VOCAB = 16384


@pytest.mark.parametrize("num_positions", [5, PROMPT_LOGPROBS_TILE, 2 * PROMPT_LOGPROBS_TILE + 88])
def test_tiles_give_what_all_positions_at_once_give(num_positions):
    rng = np.random.default_rng(num_positions)
    hidden = jnp.asarray(rng.normal(size=(num_positions + 7, 24)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(24, 300)), jnp.float32)
    indices = rng.integers(0, num_positions + 7, num_positions).astype(np.int32)
    indices[rng.random(num_positions) < 0.2] = -1  # positions no request asked for
    next_ids = rng.integers(0, 300, num_positions).astype(np.int32)

    def lm_head(rows):
        return jnp.dot(rows, head, precision="highest")

    got = jax.jit(tiled_prompt_logprobs, static_argnums=(0, 4))(lm_head, hidden, indices, next_ids, 4)
    want = prompt_logprobs(lm_head(hidden[np.maximum(indices, 0)]), next_ids, 4)
    for name, a, b in zip(want._fields, got, want):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def wide_vocab_llama(tmp_path_factory):
    """A random two-layer HF Llama with a 16K vocabulary (the oracle) and its folder."""
    import transformers
    from hf_models import save_random_model

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("wide_vocab_llama")
    return save_random_model(folder, config, seed=21), str(folder)


def test_long_prompt_logprobs_match_hf_and_the_step_holds_one_tile_of_logits(wide_vocab_llama):
    """A 1,500-token prompt in one step (six tiles): every position's logprob and top 2 equal
    HF's, and the compiled step's temporaries stay below one float32 logits array of its token
    count (computing all positions at once needed about two)."""
    from hf_models import hf_logits

    model, folder = wide_vocab_llama
    prompt = np.random.default_rng(4).integers(3, VOCAB, 1500).tolist()
    llm = LLM(folder, dtype="float32", num_blocks=100, max_num_batched_tokens=2048, enable_prefix_caching=False)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2),
                       use_tqdm=False)[0]
    logits = hf_logits(model, prompt)
    expected = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entry, row = out.prompt_logprobs[position], expected[position - 1]
        assert set(entry) == {prompt[position], *np.argsort(-row)[:2].tolist()}, position
        for token, value in entry.items():
            assert value.logprob == pytest.approx(row[token], abs=1e-4), (position, token)
    step_tokens = llm.engine.runner.shapes.num_tokens(len(prompt))
    temp_bytes = llm.engine.stats().step_temp_bytes
    assert 0 < temp_bytes < step_tokens * VOCAB * 4, (temp_bytes, step_tokens)
