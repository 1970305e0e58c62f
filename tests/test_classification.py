"""Sequence classification (`runner="pooling"` on HF `*ForSequenceClassification` checkpoints):
`LLM.classify` and `POST /classify`.

Oracle: HF transformers' `AutoModelForSequenceClassification` on the same random-weight folder
(one unpadded input at a time, so its pooled token is the input's last), its logits through the
activation vLLM applies for the config (softmax, sigmoid for one label or multi-label, none for
regression). Inputs are long enough to be prefilled in several chunks, and one repeats so that the
prefix cache serves it; every KV block is free afterwards.
"""

import httpx
import numpy as np
import pytest
import torch
import transformers
from hf_models import randomize_weights, save_word_level_tokenizer, torch_single_thread

pytest.importorskip("uvicorn")
from server_thread import serving  # noqa: E402

from jpaged import LLM, PoolingParams, SamplingParams  # noqa: E402
from jpaged.server.launch import create_app  # noqa: E402

VOCAB = 128
ENGINE_ARGS = dict(runner="pooling", num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)
LENGTHS = (5, 40, 17, 70, 40)  # the last repeats the second: a prefix-cache hit
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
CASES = {  # name: (config, the activation vLLM applies to its logits)
    "qwen2_three_labels": (transformers.Qwen2Config(**SMALL, num_labels=3,
                                                    id2label={0: "negative", 1: "neutral", 2: "positive"}), "softmax"),
    "llama_reward": (transformers.LlamaConfig(**SMALL, num_labels=1), "sigmoid"),
    "qwen3_regression": (transformers.Qwen3Config(**SMALL, head_dim=16, num_labels=2, problem_type="regression"),
                         "identity"),
    "mistral_multi_label": (transformers.MistralConfig(**SMALL, num_labels=4, problem_type="multi_label_classification"),
                            "sigmoid"),
}


def save_classifier(folder, config, seed: int):
    with torch_single_thread():
        torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32,
                                                                            attn_implementation="eager")
        randomize_weights(model, seed)
        model.eval().save_pretrained(str(folder), safe_serialization=True)
    save_word_level_tokenizer(folder, VOCAB)
    return model


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    if activation == "softmax":
        shifted = np.exp(logits - logits.max())
        return shifted / shifted.sum()
    return 1 / (1 + np.exp(-logits)) if activation == "sigmoid" else logits


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, VOCAB, n).tolist() for n in LENGTHS[:-1]]
    return ids + [ids[1]]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    config, activation = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model = save_classifier(folder, config, seed=len(request.param))
    return folder, model, activation


def test_probs_match_hf_sequence_classification(case, prompts):
    folder, model, activation = case
    llm = LLM(str(folder), **ENGINE_ARGS)
    outputs = llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    with torch.no_grad():
        logits = [model(torch.tensor([p])).logits[0].numpy().astype(np.float64) for p in prompts]
    expected = np.array([activate(x, activation) for x in logits])
    got = np.array([out.outputs.probs for out in outputs])
    raw = llm.classify({"prompt_token_ids": prompts[2]}, use_tqdm=False, pooling_params=PoolingParams(use_activation=False))
    np.testing.assert_allclose(raw[0].outputs.probs, logits[2], rtol=1e-4, atol=1e-5)
    assert got.shape == expected.shape == (len(prompts), model.config.num_labels)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert [out.outputs.label for out in outputs] == [model.config.id2label[int(np.argmax(p))] for p in expected]
    assert [out.prompt_token_ids for out in outputs] == prompts and all(out.finished for out in outputs)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hit_rate > 0 and stats.num_free_blocks == stats.num_blocks


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")  # (a Llama: transformers reads a Qwen2 folder's tokenizer as Qwen2's)
    save_classifier(folder, transformers.LlamaConfig(**SMALL, num_labels=3, id2label={0: "no", 1: "maybe", 2: "yes"}),
                    seed=3)
    return folder, LLM(str(folder), **ENGINE_ARGS)


def test_server_classify_matches_llm_classify(classifier, prompts):
    _, llm = classifier
    texts = [" ".join(f"t{i}" for i in p) for p in prompts[:2]]
    expected = [out.outputs for out in llm.classify(texts + prompts, use_tqdm=False)]
    with serving(create_app(llm.engine, served_model_name="sentiment", api_key="secret")) as url, \
            httpx.Client(timeout=120) as client:
        headers = {"Authorization": "Bearer secret"}
        reply = client.post(f"{url}/classify", json={"model": "sentiment", "input": texts}, headers=headers)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "list" and body["model"] == "sentiment" and body["id"].startswith("classify-")
        ids = client.post(f"{url}/classify", json={"input": prompts}, headers=headers).json()
        data = body["data"] + ids["data"]
        assert [d["index"] for d in data] == [0, 1] + list(range(len(prompts)))
        np.testing.assert_allclose([d["probs"] for d in data], [e.probs for e in expected], atol=1e-6)
        assert [d["label"] for d in data] == [e.label for e in expected]
        assert all(d["num_classes"] == 3 for d in data)
        assert ids["usage"] == {"prompt_tokens": sum(LENGTHS), "total_tokens": sum(LENGTHS), "completion_tokens": 0}
        raw = client.post(f"{url}/classify", json={"input": prompts[:2], "use_activation": False}, headers=headers)
        logits = [out.outputs.probs for out in llm.classify(prompts[:2], use_tqdm=False,
                                                            pooling_params=PoolingParams(use_activation=False))]
        np.testing.assert_allclose([d["probs"] for d in raw.json()["data"]], logits, atol=1e-6)
        np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), [e.probs for e in expected[
            len(texts):len(texts) + 2]], atol=1e-6)  # the probabilities are the logits' softmax
        refusals = [({"input": []}, "input"), ({"input": [[5] * 200]}, "input"),
                    ({"input": "t5", "model": "other"}, "model")]
        for request, param in refusals:
            reply = client.post(f"{url}/classify", json=request, headers=headers)
            assert reply.status_code == (404 if param == "model" else 400), reply.text
            assert reply.json()["error"]["param"] == param
        assert client.post(f"{url}/classify", json={"input": "t5"}).status_code == 401
        wrong_route = client.post(f"{url}/v1/embeddings", json={"input": "t5"}, headers=headers)
        assert wrong_route.status_code == 400 and "/classify" in wrong_route.json()["error"]["message"]
        for route, request in (("/v1/completions", {"prompt": "t5", "max_tokens": 2}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "t5"}]}),
                               ("/v1/responses", {"input": "t5"})):  # the model has no chat template either
            reply = client.post(f"{url}{route}", json=request, headers=headers)
            assert reply.status_code == 400 and "/classify" in reply.json()["error"]["message"], route
    assert llm.engine.stats().kv_cache_usage == 0


def test_a_classifier_refuses_other_tasks(classifier, stories_path):
    folder, llm = classifier
    with pytest.raises(ValueError, match="classification model .* runner='pooling'"):
        LLM(str(folder), num_blocks=16, runner="generate")
    assert LLM(str(folder), num_blocks=16).engine.runner_type == "pooling"  # runner "auto", as vLLM's
    with pytest.raises(ValueError, match="LLM.embed cannot run on this model: it classifies prompts"):
        llm.embed("t5 t6", use_tqdm=False)
    with pytest.raises(ValueError, match="it classifies prompts .LLM.classify. and generates nothing"):
        llm.generate("t5 t6", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="it classifies prompts .LLM.classify. and generates nothing"):
        llm.chat([{"role": "user", "content": "t5"}], use_tqdm=False)
    with pytest.raises(ValueError, match="runner='pooling' classifies prompts and samples nothing"):
        llm.engine.add_request("x", "t5 t6", SamplingParams())
    with pytest.raises(ValueError, match="LLM.classify needs an engine made with runner='pooling'"):
        LLM(stories_path, num_blocks=16).classify("Once upon a time", use_tqdm=False)
