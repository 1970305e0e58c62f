"""Token-level pooling (`runner="pooling"`, vLLM's `token_classify` and `token_embed` tasks):
`LLM.encode`, `pooler_config` and `POST /pooling`.

Oracle: HF transformers on the same random-weight folders, one unpadded input at a time:
`AutoModelForTokenClassification`'s logits at every position through the activation vLLM applies
(softmax over the labels, sigmoid for one label); a sequence classifier's `score` head applied
to `AutoModel`'s `last_hidden_state` at every position; `AutoModel`'s `last_hidden_state` at
every position, L2-normalised row by row, for `token_embed`. Inputs are long enough to be
prefilled in several chunks (32 tokens a step); every KV block is free afterwards, a request
aborted mid-prompt included.
"""

import base64
import json

import httpx
import numpy as np
import pytest
import torch
import transformers
from hf_models import randomize_weights, save_random_model, save_word_level_tokenizer, torch_single_thread

pytest.importorskip("uvicorn")
from server_thread import serving  # noqa: E402

from jpaged import LLM, PoolingParams, PoolingRequestOutput  # noqa: E402
from jpaged.server.launch import create_app  # noqa: E402

VOCAB = 128
ENGINE_ARGS = dict(runner="pooling", num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)
LENGTHS = (5, 40, 17, 70, 33)
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def save_hf(folder, auto_class, config, seed: int):
    with torch_single_thread():
        torch.manual_seed(seed)
        model = auto_class.from_config(config, dtype=torch.float32, attn_implementation="eager")
        randomize_weights(model, seed)
        model.eval().save_pretrained(str(folder), safe_serialization=True)
    save_word_level_tokenizer(folder, VOCAB)
    return model


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(3, VOCAB, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def token_classifier(tmp_path_factory):
    # a Llama: transformers would read a Qwen2 folder's word-level tokenizer as Qwen2's
    folder = tmp_path_factory.mktemp("llama_token_classifier")
    config = transformers.LlamaConfig(**SMALL, num_labels=3, id2label={0: "O", 1: "B-PER", 2: "I-PER"})
    return folder, save_hf(folder, transformers.AutoModelForTokenClassification, config, seed=5)


def hf_token_logits(model, prompts) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].numpy().astype(np.float64) for p in prompts]


def test_token_classify_matches_hf_token_classification(token_classifier, prompts):
    folder, model = token_classifier
    assert model.score.bias is not None  # HF's token classifiers have a biased head: it must be read
    llm = LLM(str(folder), **ENGINE_ARGS)
    assert llm.engine.pooling_task == "token_classify"
    outputs = llm.encode([{"prompt_token_ids": p} for p in prompts], pooling_task="token_classify", use_tqdm=False)
    logits = hf_token_logits(model, prompts)
    assert all(isinstance(out, PoolingRequestOutput) and out.finished for out in outputs)
    for out, prompt, expected in zip(outputs, prompts, logits):
        assert out.prompt_token_ids == prompt and out.outputs.data.shape == (len(prompt), 3)
        assert out.outputs.data.dtype == np.float32
        np.testing.assert_allclose(out.outputs.data, softmax(expected), rtol=1e-4, atol=1e-5)
    raw = llm.encode({"prompt_token_ids": prompts[3]}, PoolingParams(use_activation=False),
                     pooling_task="token_classify", use_tqdm=False)
    np.testing.assert_allclose(raw[0].outputs.data, logits[3], rtol=1e-4, atol=1e-4)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_an_aborted_request_frees_its_blocks_mid_prompt(token_classifier, prompts):
    folder, model = token_classifier
    llm = LLM(str(folder), **ENGINE_ARGS)
    engine = llm.engine
    engine.add_request("long", {"prompt_token_ids": prompts[3]}, PoolingParams())
    assert engine.step() == [] and engine.stats().num_free_blocks < engine.stats().num_blocks  # one chunk of 32
    engine.abort_request("long")
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    engine.add_request("again", {"prompt_token_ids": prompts[3]}, PoolingParams())
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [out.request_id for out in outputs] == ["again"]
    np.testing.assert_allclose(outputs[0].outputs.data, softmax(hf_token_logits(model, prompts[3:4])[0]),
                               rtol=1e-4, atol=1e-5)
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_a_sequence_classifier_classifies_each_token_when_asked(tmp_path, prompts):
    config = transformers.Qwen2Config(**SMALL, num_labels=1)
    model = save_hf(tmp_path, transformers.AutoModelForSequenceClassification, config, seed=7)
    llm = LLM(str(tmp_path), **ENGINE_ARGS, pooler_config={"task": "token_classify"})
    outputs = llm.encode([{"prompt_token_ids": p} for p in prompts[:3]], pooling_task="token_classify",
                         use_tqdm=False)
    with torch.no_grad():
        states = [model.model(torch.tensor([p])).last_hidden_state[0] for p in prompts[:3]]
        logits = [model.score(s).numpy().astype(np.float64) for s in states]
    for out, expected in zip(outputs, logits):
        np.testing.assert_allclose(out.outputs.data, 1 / (1 + np.exp(-expected)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="LLM.classify cannot run on this model: it classifies each prompt token"):
        llm.classify({"prompt_token_ids": prompts[0]}, use_tqdm=False)


@pytest.fixture(scope="module")
def embedding_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_embedding")
    config = transformers.Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=True)
    save_random_model(folder, config, seed=2)
    return folder


def hf_states(folder, prompts) -> list[np.ndarray]:
    base = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return [base(torch.tensor([p])).last_hidden_state[0].numpy().astype(np.float64) for p in prompts]


def test_token_embed_gives_each_tokens_normalised_state(embedding_folder, prompts):
    llm = LLM(str(embedding_folder), **ENGINE_ARGS, pooler_config={"task": "token_embed"},
              hf_overrides={"is_matryoshka": True})
    outputs = llm.encode([{"prompt_token_ids": p} for p in prompts], pooling_task="token_embed", use_tqdm=False)
    states = hf_states(embedding_folder, prompts)
    for out, prompt, state in zip(outputs, prompts, states):
        assert out.outputs.data.shape == (len(prompt), 64)
        np.testing.assert_allclose(out.outputs.data, state / np.linalg.norm(state, axis=1, keepdims=True),
                                   rtol=1e-4, atol=1e-5)
    raw = llm.encode({"prompt_token_ids": prompts[1]}, PoolingParams(use_activation=False), pooling_task="token_embed",
                     use_tqdm=False)
    np.testing.assert_allclose(raw[0].outputs.data, states[1], rtol=1e-4, atol=1e-4)
    cut = llm.encode({"prompt_token_ids": prompts[2]}, PoolingParams(dimensions=8), pooling_task="token_embed",
                     use_tqdm=False)[0].outputs.data
    np.testing.assert_allclose(cut, states[2][:, :8] / np.linalg.norm(states[2][:, :8], axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="LLM.embed cannot run on this model: it embeds each prompt token"):
        llm.embed("t5 t6", use_tqdm=False)
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks


def test_a_token_embedding_model_scores_pairs_by_max_sim(embedding_folder, prompts):
    llm = LLM(str(embedding_folder), **ENGINE_ARGS, pooler_config={"task": "token_embed"})
    query, documents = "t5 t9 t40 t17", ["t5 t6 t7", "t100 t99 t40 t17 t5 t3", "t9"]
    tokenizer = llm.get_tokenizer()
    texts = [query, *documents]
    states = hf_states(embedding_folder, [tokenizer.encode(text) for text in texts])
    rows = [state / np.linalg.norm(state, axis=1, keepdims=True) for state in states]
    expected = [(rows[0] @ document.T).max(axis=1).sum() for document in rows[1:]]
    got = llm.score(query, documents, use_tqdm=False)
    np.testing.assert_allclose([out.outputs.score for out in got], expected, rtol=1e-5)
    assert [out.prompt_token_ids for out in got] == [tokenizer.encode(query) + tokenizer.encode(d) for d in documents]
    with serving(create_app(llm.engine)) as url:
        reply = httpx.post(f"{url}/rerank", json={"query": query, "documents": documents}, timeout=120)
        assert reply.status_code == 200, reply.text
        ranked = reply.json()["results"]
        assert [r["index"] for r in ranked] == list(np.argsort(expected)[::-1])
        np.testing.assert_allclose([r["relevance_score"] for r in ranked], sorted(expected, reverse=True), rtol=1e-5)
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks


def test_encode_runs_the_sequence_tasks_and_pooler_config_chooses_the_pooling(embedding_folder, prompts):
    llm = LLM(str(embedding_folder), **ENGINE_ARGS)
    encoded = llm.encode([{"prompt_token_ids": p} for p in prompts], pooling_task="embed", use_tqdm=False)
    embedded = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for out, emb in zip(encoded, embedded):
        assert isinstance(out, PoolingRequestOutput) and out.outputs.data.shape == (64,)
        np.testing.assert_allclose(out.outputs.data, emb.outputs.embedding, rtol=1e-5, atol=1e-6)  # (prefix-cached)
    with pytest.raises(ValueError, match="needs pooling_task"):
        llm.encode("t5", use_tqdm=False)
    with pytest.raises(ValueError, match=r"pooling_task='token_embed'\) cannot run on this model: it embeds prompts"):
        llm.encode("t5", pooling_task="token_embed", use_tqdm=False)
    with pytest.raises(ValueError, match="pooling_task must be one of"):
        llm.encode("t5", pooling_task="reward", use_tqdm=False)
    mean = LLM(str(embedding_folder), **ENGINE_ARGS, pooler_config={"pooling_type": "MEAN"})
    got = mean.encode([{"prompt_token_ids": p} for p in prompts[:2]], pooling_task="embed", use_tqdm=False)
    for out, state in zip(got, hf_states(embedding_folder, prompts[:2])):
        average = state.mean(0)
        np.testing.assert_allclose(out.outputs.data, average / np.linalg.norm(average), rtol=1e-4, atol=1e-5)


def test_pooler_config_is_checked(embedding_folder, token_classifier):
    refusals = [({"task": "classify"}, "pooler_config task 'classify' is not one this model runs"),
                ({"task": "reward"}, "pooler_config task must be one of"),
                ({"pooling_type": "STEP"}, "pooling_type must be one of LAST, MEAN, CLS, ALL"),
                ({"task": "token_embed", "pooling_type": "LAST"}, "does not suit the task 'token_embed'"),
                ({"normalize": True}, "'normalize' are not read by jpaged")]
    for pooler_config, message in refusals:
        with pytest.raises(ValueError, match=message):
            LLM(str(embedding_folder), **ENGINE_ARGS, pooler_config=pooler_config)
    with pytest.raises(ValueError, match="applies to runner='pooling' only"):
        LLM(str(embedding_folder), runner="generate", pooler_config={"task": "embed"})
    with pytest.raises(ValueError, match="task 'classify' is not one this model runs .*token_classify"):
        LLM(str(token_classifier[0]), **ENGINE_ARGS, pooler_config={"task": "classify"})
    with pytest.raises(ValueError, match=r"classification model .*runner='pooling' \(LLM.encode\(pooling_task="):
        LLM(str(token_classifier[0]), runner="generate")


def test_server_pooling_matches_llm_encode(token_classifier, prompts):
    folder, _ = token_classifier
    llm = LLM(str(folder), **ENGINE_ARGS)
    expected = [out.outputs.data for out in llm.encode(prompts[:3], pooling_task="token_classify", use_tqdm=False)]
    texts = [" ".join(f"t{i}" for i in p) for p in prompts[:2]]
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    with serving(create_app(llm.engine, served_model_name="ner", api_key="secret", chat_template=template)) as url, \
            httpx.Client(timeout=120, headers={"Authorization": "Bearer secret"}) as client:
        reply = client.post(f"{url}/pooling", json={"model": "ner", "input": prompts[:3]})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["id"].startswith("pool-") and body["object"] == "list" and body["model"] == "ner"
        assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"pooling"}
        for item, want in zip(body["data"], expected):
            np.testing.assert_allclose(item["data"], want, atol=1e-6)
        total = sum(LENGTHS[:3])
        assert body["usage"] == {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0}
        encoded = client.post(f"{url}/pooling", json={"input": texts, "encoding_format": "base64",
                                                     "task": "token_classify"})
        assert encoded.status_code == 200, encoded.text
        for item, want in zip(encoded.json()["data"], expected):
            rows = np.frombuffer(base64.b64decode(item["data"]), "<f4").reshape(-1, 3)
            np.testing.assert_allclose(rows, want, atol=1e-6)
        packed = client.post(f"{url}/pooling", json={"input": prompts[:3], "encoding_format": "bytes",
                                                    "embed_dtype": "float16", "endianness": "big"})
        assert packed.status_code == 200 and packed.headers["content-type"] == "application/octet-stream"
        items = json.loads(packed.headers["metadata"])["data"]
        assert [item["shape"] for item in items] == [[n, 3] for n in LENGTHS[:3]]
        for item, want in zip(items, expected):  # float16 rows, big-endian, one input after another
            rows = np.frombuffer(packed.content[item["start"]:item["end"]], ">f2").reshape(item["shape"])
            np.testing.assert_allclose(rows, want, rtol=1e-3, atol=1e-4)
        chat = client.post(f"{url}/pooling", json={"messages": [{"role": "user", "content": texts[0]},
                                                                {"role": "assistant", "content": texts[1]}]})
        assert chat.status_code == 200, chat.text
        joined = llm.encode(f"{texts[0]} {texts[1]} ", pooling_task="token_classify", use_tqdm=False)
        np.testing.assert_allclose(chat.json()["data"][0]["data"], joined[0].outputs.data, atol=1e-6)
        refusals = [({"input": "t5", "task": "embed"}, "task"), ({"input": "t5", "dimensions": 8}, "dimensions"),
                    ({"input": [[5] * 200]}, "input"), ({}, "input"),
                    ({"messages": [{"role": "user", "content": "t5 " * 130}]}, "messages"),
                    ({"input": "t5", "messages": [{"role": "user", "content": "t5"}]}, "input")]
        for request, param in refusals:
            reply = client.post(f"{url}/pooling", json=request)
            assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
        for route, request in (("/v1/embeddings", {"input": "t5"}), ("/classify", {"input": "t5"}),
                               ("/v1/completions", {"prompt": "t5", "max_tokens": 2}),
                               ("/score", {"queries": "t5", "documents": "t6"})):
            reply = client.post(f"{url}{route}", json=request)
            assert reply.status_code == 400 and "/pooling" in reply.json()["error"]["message"], route
        assert httpx.post(f"{url}/pooling", json={"input": "t5"}).status_code == 401
    assert llm.engine.stats().kv_cache_usage == 0
    with serving(create_app(llm.engine)) as url:  # no chat template: messages cannot be rendered
        reply = httpx.post(f"{url}/pooling", json={"messages": [{"role": "user", "content": "t5"}]}, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
        assert "send the text as input" in reply.json()["error"]["message"]


def test_truncate_prompt_tokens_keeps_each_prompts_last_tokens(token_classifier, prompts):
    folder, model = token_classifier
    llm = LLM(str(folder), **ENGINE_ARGS)
    cut = llm.encode([{"prompt_token_ids": p} for p in prompts[1:4]], pooling_task="token_classify", use_tqdm=False,
                     truncate_prompt_tokens=10)
    for out, prompt, logits in zip(cut, prompts[1:4], hf_token_logits(model, [p[-10:] for p in prompts[1:4]])):
        assert out.prompt_token_ids == prompt[-10:]
        np.testing.assert_allclose(out.outputs.data, softmax(logits), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="truncate_prompt_tokens 200 exceeds max_model_len 128"):
        llm.encode("t5", pooling_task="token_classify", use_tqdm=False, truncate_prompt_tokens=200)
    with pytest.raises(TypeError, match="truncate_prompt_tokens must be an int"):
        PoolingParams(truncate_prompt_tokens="10")


def test_runner_auto_picks_the_models_own_as_vllm():
    """vLLM's runner "auto": pooling for base models and classifiers (or where a pooler_config is
    given), generate otherwise; the CLI and `EngineConfig` default to it."""
    from jpaged.cli import _parser, engine_kwargs
    from jpaged.pooling import default_runner

    cases = [(["LlamaForCausalLM"], None, "generate"), (["Gemma3TextModel"], None, "pooling"),
             (["Qwen3Model"], None, "pooling"), (["Qwen2ForSequenceClassification"], None, "pooling"),
             (["BertForTokenClassification"], None, "pooling"), (["GPT2LMHeadModel"], None, "generate"),
             ([], None, "generate"), (["LlamaForCausalLM"], {"task": "embed"}, "pooling"),
             (["Qwen3Model", "Qwen3ForCausalLM"], None, "generate")]
    assert [default_runner(archs, pooler) for archs, pooler, _ in cases] == [want for _, _, want in cases]
    assert engine_kwargs(_parser().parse_args(["serve", "m"]))["runner"] == "auto"
