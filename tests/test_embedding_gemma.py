"""EmbeddingGemma's shape: a Gemma 3 text model that reads each prompt bidirectionally
(`use_bidirectional_attention`; its windowed layers see the window both ways), mean pooling, two
`Dense` layers and `Normalize`, as sentence-transformers lays it out.

Oracle: sentence-transformers' own `SentenceTransformer` over a random-weight `Gemma3TextModel`
(HF's bidirectional masks) with its `Pooling`, `Dense` and `Normalize` modules, saved and read back
by both. The window (8 in config.json: each token sees 4 keys either way) is far shorter than
the longer texts, so a one-sided window, a causal mask or a missing Dense layer each fail.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from hf_models import SPECIAL_TOKENS, randomize_weights, save_word_level_tokenizer, torch_single_thread

sentence_transformers = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer import modules as st_modules  # noqa: E402

from jpaged import LLM, PoolingParams  # noqa: E402

VOCAB = 128
HIDDEN = 64
ENGINE_ARGS = dict(runner="pooling", num_blocks=64, max_num_seqs=4, max_num_batched_tokens=96, max_model_len=128)
LENGTHS = (3, 40, 17, 90, 9)


def save_embedding_gemma(folder, dense: list[dict]) -> sentence_transformers.SentenceTransformer:
    """A random-weight EmbeddingGemma-shaped sentence-transformers model saved in `folder`, with
    `Dense` layers of `dense`'s settings after mean pooling; returns the loaded oracle."""
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], use_bidirectional_attention=True,
        architectures=["Gemma3TextModel"])
    base_folder = folder / "base"
    with torch_single_thread():
        torch.manual_seed(3)
        base = transformers.Gemma3TextModel(config).eval()
        randomize_weights(base, seed=3)
        base.save_pretrained(str(base_folder), safe_serialization=True)
        save_word_level_tokenizer(base_folder, VOCAB)
        layers = [st_modules.Transformer(str(base_folder)), st_modules.Pooling(HIDDEN, "mean")]
        width = HIDDEN
        for settings in dense:
            layers.append(st_modules.Dense(width, **settings))
            width = settings["out_features"]
        layers.append(st_modules.Normalize())
        st = sentence_transformers.SentenceTransformer(modules=layers, device="cpu")
        st.save(str(folder / "model"))
        oracle = sentence_transformers.SentenceTransformer(str(folder / "model"), device="cpu")
    oracle.tokenizer.pad_token = "<unk>"  # it pads even a batch of one
    return oracle


def texts(lengths, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"t{i}" for i in rng.integers(len(SPECIAL_TOKENS), VOCAB, n)) for n in lengths]


def expected(oracle, prompts) -> np.ndarray:
    with torch_single_thread():
        return oracle.encode(prompts, batch_size=1)  # one at a time: no padding


@pytest.fixture(scope="module")
def embedding_gemma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedding_gemma")
    dense = [dict(out_features=256, bias=False, activation_function=torch.nn.Identity()),
             dict(out_features=HIDDEN, bias=False, activation_function=torch.nn.Identity())]
    return folder / "model", save_embedding_gemma(folder, dense)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_embeddings_match_sentence_transformers(embedding_gemma, backend):
    folder, oracle = embedding_gemma
    llm = LLM(str(folder), attention_backend=backend, **ENGINE_ARGS)
    prompts = texts(LENGTHS)
    outs = llm.embed(prompts, use_tqdm=False)
    got = np.stack([out.outputs.embedding for out in outs])
    np.testing.assert_allclose(got, expected(oracle, prompts), rtol=1e-4, atol=2e-5)
    assert got.shape == (len(prompts), HIDDEN)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_prompts_up_to_max_model_len_are_read_whole_by_default(embedding_gemma):
    """With max_num_batched_tokens unset, a step holds max_model_len tokens (here 1,024: the
    config's positions raised), as vLLM raises it for a model that cannot chunk a prompt; a
    prompt past the usual 512-token step matches the oracle."""
    folder, oracle = embedding_gemma
    llm = LLM(str(folder), runner="pooling", num_blocks=80, hf_overrides={"max_position_embeddings": 1024})
    assert llm.engine.config.scheduler.max_num_batched_tokens == llm.engine.max_model_len == 1024
    prompts = texts((700, 30), seed=4)
    got = np.stack([out.outputs.embedding for out in llm.embed(prompts, use_tqdm=False)])
    oracle.max_seq_length, kept = 1024, oracle.max_seq_length
    try:
        np.testing.assert_allclose(got, expected(oracle, prompts), rtol=1e-4, atol=2e-5)
    finally:
        oracle.max_seq_length = kept
    assert len(llm.engine.tokenizer.encode(prompts[0])) > 512
    with pytest.raises(ValueError, match=r"prompt of 103\d tokens is longer than max_model_len 1024"):
        llm.embed(texts((1030,)), use_tqdm=False)


def test_token_embeddings_go_through_the_dense_layers(embedding_gemma):
    """token_embed: every token's state through the Dense layers, then normalised (vLLM's); the
    oracle is sentence-transformers' token embeddings through its own Dense modules."""
    folder, oracle = embedding_gemma
    llm = LLM(str(folder), pooler_config={"task": "token_embed"}, **ENGINE_ARGS)
    prompt = texts((30,), seed=2)[0]
    got = np.asarray(llm.encode([prompt], pooling_task="token_embed", use_tqdm=False)[0].outputs.data)
    with torch_single_thread(), torch.no_grad():
        features = {"sentence_embedding": oracle.encode(prompt, output_value="token_embeddings", convert_to_tensor=True)}
        for module in (oracle[2], oracle[3]):
            features = module(features)
        expected = torch.nn.functional.normalize(features["sentence_embedding"], dim=-1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)


def test_dense_layers_with_biases_and_activations(tmp_path):
    """Dense layers of other sizes, with biases and Tanh / Sigmoid, and one with a residual."""
    dense = [dict(out_features=48, bias=True, activation_function=torch.nn.Tanh()),
             dict(out_features=48, bias=True, activation_function=torch.nn.Sigmoid(), use_residual=True),
             dict(out_features=32, bias=False, activation_function=torch.nn.Identity())]
    oracle = save_embedding_gemma(tmp_path, dense)
    llm = LLM(str(tmp_path / "model"), **ENGINE_ARGS)
    prompts = texts((12, 30), seed=1)
    got = np.stack([out.outputs.embedding for out in llm.embed(prompts, use_tqdm=False)])
    np.testing.assert_allclose(got, expected(oracle, prompts), rtol=1e-4, atol=2e-5)
    assert got.shape == (2, 32)
    raw = llm.embed(prompts[:1], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)[0]
    assert np.linalg.norm(raw.outputs.embedding) != pytest.approx(1.0)  # the Dense output, not normalised
    np.testing.assert_allclose(np.asarray(raw.outputs.embedding) / np.linalg.norm(raw.outputs.embedding), got[0],
                               rtol=1e-5, atol=1e-6)


def test_refusals_name_the_problem(embedding_gemma, tmp_path):
    folder, _ = embedding_gemma
    with pytest.raises(ValueError, match="reads each prompt bidirectionally.*runner='pooling'"):
        LLM(str(folder), num_blocks=16, runner="generate")
    auto = LLM(str(folder), **{**ENGINE_ARGS, "runner": "auto"})  # a base model (Gemma3TextModel): pooling, as vLLM's
    assert auto.engine.runner_type == "pooling" and auto.embed(texts((5,)), use_tqdm=False)[0].outputs.embedding
    with pytest.raises(ValueError, match="pipeline_parallel_size 2"):
        LLM(str(folder), pipeline_parallel_size=2, **ENGINE_ARGS)
    llm = LLM(str(folder), **{**ENGINE_ARGS, "max_num_batched_tokens": 16})
    with pytest.raises(ValueError, match="prompt of 20 tokens.*one step.*max_num_batched_tokens is 16"):
        llm.embed(texts((20,)), use_tqdm=False)
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks

    modules = json.loads((folder / "modules.json").read_text())
    dense_config = folder / modules[2]["path"] / "config.json"
    settings = json.loads(dense_config.read_text())
    broken = tmp_path / "broken"
    for change, message in (({"activation_function": "torch.nn.modules.activation.GELU"}, "names the activation"),
                            ({"in_features": HIDDEN + 1}, "linear.weight must have shape"),
                            ({"bias": True}, "linear.bias must be present")):
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(folder, broken)
        (broken / modules[2]["path"] / "config.json").write_text(json.dumps({**settings, **change}))
        with pytest.raises(ValueError, match=message):
            LLM(str(broken), **ENGINE_ARGS)
    (broken / modules[2]["path"] / "config.json").write_text("{in_features: 64}")
    with pytest.raises(ValueError, match=r"2_Dense/config.json is not valid JSON"):
        LLM(str(broken), **ENGINE_ARGS)
    (broken / modules[2]["path"] / "config.json").write_text(json.dumps(settings))
    (broken / modules[2]["path"] / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(ValueError, match=r"2_Dense/model.safetensors cannot be read"):
        LLM(str(broken), **ENGINE_ARGS)
