"""Scoring text pairs: `LLM.score`, `POST /score` and `POST /rerank` (also /v1/rerank, /v2/rerank).

Oracles: sentence-transformers, the library these models ship for: its `CrossEncoder` (`predict`
and `rank`) on a random-weight Llama `*ForSequenceClassification` folder of one label, whose
tokenizer puts separators around and between a pair's texts (`<s> query </s></s> document
</s>`); its `SentenceTransformer` (last-token pooling, `Normalize`) and `similarity` (cosine) on a
random-weight Qwen3 embedding folder; HF transformers on the joined texts for a reranker whose
config.json sets `use_sep_token` false; Cohere's official client on /v2/rerank. Some documents
are long enough to be prefilled in several chunks, and repeated pairs hit the prefix cache; every
KV block is free afterwards.
"""

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from hf_models import (
    SPECIAL_TOKENS,
    randomize_weights,
    save_random_model,
    sentence_transformers_files,
    torch_single_thread,
)

sentence_transformers = pytest.importorskip("sentence_transformers")
cohere = pytest.importorskip("cohere")
pytest.importorskip("uvicorn")
from server_thread import serving  # noqa: E402

from jpaged import LLM, PoolingParams  # noqa: E402
from jpaged.chat_template import chat_text  # noqa: E402
from jpaged.scoring import truncated_text  # noqa: E402
from jpaged.server.launch import create_app  # noqa: E402

VOCAB = 128
ENGINE_ARGS = dict(runner="pooling", num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def words(rng, n: int) -> str:
    return " ".join(f"t{i}" for i in rng.integers(len(SPECIAL_TOKENS), VOCAB, n))


@pytest.fixture(scope="module")
def texts():
    """A query and documents of 2 to 60 words (the longest take several 32-token chunks)."""
    rng = np.random.default_rng(7)
    return words(rng, 6), [words(rng, n) for n in (9, 2, 60, 17, 33)]


def save_pair_tokenizer(folder) -> None:
    """A word-level tokenizer (`<unk> <s> </s> t3 t4 ...`) that encodes a text as `<s> A </s>` and
    a pair as `<s> A </s></s> B </s>` (RoBERTa's template), with `<unk>` as its pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)} | {f"t{i}": i for i in range(3, VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>", pad_token="<unk>",
                                         model_input_names=["input_ids", "attention_mask"]).save_pretrained(str(folder))


def save_reranker(folder, seed: int, st_config: dict | None = None, **config):
    with torch_single_thread():
        torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_config(
            transformers.LlamaConfig(**SMALL, num_labels=1, pad_token_id=0, **config), dtype=torch.float32,
            attn_implementation="eager")
        randomize_weights(model, seed)
        if st_config is not None:  # as sentence-transformers' CrossEncoder saves it
            model.config.sentence_transformers = st_config
        model.eval().save_pretrained(str(folder), safe_serialization=True)
    save_pair_tokenizer(folder)
    return model


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reranker")
    save_reranker(folder, seed=5)
    with torch_single_thread():
        oracle = sentence_transformers.CrossEncoder(str(folder), device="cpu")
    return oracle, LLM(str(folder), **ENGINE_ARGS)


def test_cross_encoder_scores_match_sentence_transformers(reranker, texts):
    oracle, llm = reranker
    query, documents = texts
    with torch_single_thread():
        expected = oracle.predict([(query, document) for document in documents], batch_size=1)
        expected_pairs = oracle.predict(list(zip(documents, documents[::-1])), batch_size=1)
    one_to_n = llm.score(query, documents, use_tqdm=False)
    np.testing.assert_allclose([out.outputs.score for out in one_to_n], expected, rtol=1e-5, atol=1e-6)
    assert [out.prompt_token_ids for out in one_to_n] == [oracle.tokenizer(query, document)["input_ids"]
                                                         for document in documents]
    assert one_to_n[1].prompt_token_ids[:9] == [1, *oracle.tokenizer(query)["input_ids"][1:-1], 2, 2]
    n_to_n = llm.score(documents, documents[::-1], use_tqdm=False)
    np.testing.assert_allclose([out.outputs.score for out in n_to_n], expected_pairs, rtol=1e-5, atol=1e-6)
    logits = llm.score(query, documents, use_tqdm=False, pooling_params=PoolingParams(use_activation=False))
    np.testing.assert_allclose([out.outputs.score for out in logits], np.log(expected / (1 - expected)), atol=1e-4)
    again = llm.score([query], documents[2:3], use_tqdm=False)  # one pair; its prompt is in the prefix cache
    assert again[0].outputs.score == pytest.approx(float(expected[2]), rel=1e-5)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hit_rate > 0 and stats.num_free_blocks == stats.num_blocks


def test_pairs_truncate_as_the_tokenizer_truncates(reranker, texts, tmp_path):
    """`truncate_prompt_tokens` cuts a pair as sentence-transformers' `CrossEncoder(max_length=...)`
    does (the tokenizer's own truncation: the longer text first, separators kept)."""
    _, llm = reranker
    query, documents = texts
    with torch_single_thread():
        oracle = sentence_transformers.CrossEncoder(str(llm.engine.model_name), device="cpu", max_length=12)
        expected = oracle.predict([(query, document) for document in documents], batch_size=1)
    outputs = llm.score(query, documents, truncate_prompt_tokens=12, use_tqdm=False)
    assert [len(out.prompt_token_ids) for out in outputs] == [min(12, 4 + 6 + len(d.split())) for d in documents]
    np.testing.assert_allclose([out.outputs.score for out in outputs], expected, rtol=1e-5, atol=1e-6)
    with serving(create_app(llm.engine)) as url:
        reply = httpx.post(f"{url}/score", json={"text_1": query, "text_2": documents, "truncate_prompt_tokens": 12},
                           timeout=60)
        np.testing.assert_allclose([d["score"] for d in reply.json()["data"]], expected, rtol=1e-5, atol=1e-6)


def test_texts_keep_at_most_their_first_tokens():
    """`max_tokens_per_query` / `max_tokens_per_doc` (`truncated_text`) on a byte-level tokenizer,
    where an emoji or an accented letter is several tokens: the kept text is a prefix that encodes
    to at most the limit, and the longest such prefix that ends between characters of tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    text = "😀😀 café ok"
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    for limit in range(1, count(text) + 2):
        kept = truncated_text(tokenizer, text, limit)
        assert text.startswith(kept) and count(kept) <= limit
        longer = [text[:end] for end in range(len(kept) + 1, len(text) + 1)]
        assert all(count(prefix) > limit for prefix in longer), (limit, kept)
    assert truncated_text(tokenizer, text, 0) == text


def test_the_activation_a_cross_encoders_config_names(tmp_path, texts):
    """config.json's `sentence_transformers.activation_fn` (here Identity: raw logits), as
    sentence-transformers' `CrossEncoder` and vLLM read it."""
    save_reranker(tmp_path, seed=9, st_config={"activation_fn": "torch.nn.modules.linear.Identity"})
    query, documents = texts
    with torch_single_thread():
        expected = sentence_transformers.CrossEncoder(str(tmp_path), device="cpu").predict(
            [(query, document) for document in documents], batch_size=1)
    assert expected.min() < 0 or expected.max() > 1  # logits, not probabilities
    outputs = LLM(str(tmp_path), **ENGINE_ARGS).score(query, documents, use_tqdm=False)
    np.testing.assert_allclose([out.outputs.score for out in outputs], expected, rtol=1e-5, atol=1e-5)


def test_a_reranker_without_separators_reads_the_joined_texts(tmp_path, texts):
    """config.json's `use_sep_token` false (an LLM turned reranker): the pair is `query + document`
    encoded as one text; oracle: HF's model on that encoding."""
    model = save_reranker(tmp_path, seed=8, use_sep_token=False)
    query, documents = texts
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    with torch.no_grad(), torch_single_thread():
        logits = [model(torch.tensor([tokenizer(query + document)["input_ids"]])).logits[0, 0].item()
                  for document in documents]
    outputs = LLM(str(tmp_path), **ENGINE_ARGS).score(query, documents, use_tqdm=False)
    np.testing.assert_allclose([out.outputs.score for out in outputs], 1 / (1 + np.exp(-np.array(logits))),
                               rtol=1e-5, atol=1e-6)
    assert outputs[0].prompt_token_ids == tokenizer(query + documents[0])["input_ids"]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedder")
    save_random_model(folder, transformers.Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=True), seed=4)
    sentence_transformers_files(folder)
    with torch_single_thread():
        oracle = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    oracle.tokenizer.pad_token = "<unk>"  # it pads even a batch of one (encode runs one text at a time here)
    return oracle, LLM(str(folder), **ENGINE_ARGS)


def test_bi_encoder_scores_match_sentence_transformers(embedder, texts):
    oracle, llm = embedder
    query, documents = texts
    with torch_single_thread():
        query_embedding = oracle.encode([query], batch_size=1)
        document_embeddings = oracle.encode(documents, batch_size=1)
    expected = oracle.similarity(query_embedding, document_embeddings)[0].numpy()
    expected_pairs = np.diag(oracle.similarity(document_embeddings, document_embeddings[::-1].copy()).numpy())
    one_to_n = llm.score(query, documents, use_tqdm=False)
    np.testing.assert_allclose([out.outputs.score for out in one_to_n], expected, rtol=1e-4, atol=1e-5)
    query_ids = llm.get_tokenizer().encode(query)
    assert one_to_n[2].prompt_token_ids == query_ids + llm.get_tokenizer().encode(documents[2])
    n_to_n = llm.score(documents, documents[::-1], use_tqdm=False)
    np.testing.assert_allclose([out.outputs.score for out in n_to_n], expected_pairs, rtol=1e-4, atol=1e-5)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hit_rate > 0 and stats.num_free_blocks == stats.num_blocks


def test_score_refusals(reranker, embedder, stories_path, tmp_path):
    _, llm = reranker
    for data_1, data_2, message in ((["t5", "t6"], ["t7", "t8", "t9"], "got 2 queries for 3 documents"),
                                    ([], ["t7"], "data_1 is empty"), ("t5", [], "data_2 is empty"),
                                    ("t5", ["t7", 7], r"data_2\[1\] must be a text; got int")):
        with pytest.raises(ValueError, match=message):
            llm.score(data_1, data_2, use_tqdm=False)
    with pytest.raises(ValueError, match="pair 1: prompt of 135 tokens is longer than max_model_len 128"):
        llm.score("t5", ["t6", " ".join(["t9"] * 130)], use_tqdm=False)
    with pytest.raises(ValueError, match=r"data_2\[0\]: .*empty"):
        embedder[1].score("t5", [""], use_tqdm=False)
    with pytest.raises(ValueError, match=r"data_2\[1\] holds '\\ud800' at character 3, a lone UTF-16 surrogate"):
        llm.score("t5", ["t6", "t7 \ud800"], use_tqdm=False)
    with pytest.raises(ValueError, match="pair 0: truncate_prompt_tokens 3 cannot be met: the pair keeps 6 tokens"):
        llm.score("t5", "t6", truncate_prompt_tokens=3, use_tqdm=False)
    with pytest.raises(ValueError, match="chat_template renders a cross-encoder's pairs"):
        embedder[1].score("t5", "t6", chat_template="{{ messages }}", use_tqdm=False)
    assert llm.engine.stats().kv_cache_usage == 0 and embedder[1].engine.stats().kv_cache_usage == 0
    with pytest.raises(ValueError, match="runner='pooling' .this one generates text"):
        LLM(stories_path, num_blocks=16).score("a", "b")
    three = tmp_path / "three_labels"
    with torch_single_thread():
        transformers.AutoModelForSequenceClassification.from_config(
            transformers.LlamaConfig(**SMALL, num_labels=3)).save_pretrained(str(three))
    save_pair_tokenizer(three)
    with pytest.raises(ValueError, match=r"one label \(num_labels == 1\); this model has 3 \(LABEL_0, LABEL_1"):
        LLM(str(three), **ENGINE_ARGS).score("t5", "t6")


def test_server_score_and_rerank(reranker, texts):
    oracle, llm = reranker
    query, documents = texts
    with torch_single_thread():
        expected = oracle.predict([(query, document) for document in documents], batch_size=1)
        ranked = oracle.rank(query, documents, batch_size=1)
    tokens = sum(len(oracle.tokenizer(query, document)["input_ids"]) for document in documents)
    with serving(create_app(llm.engine, served_model_name="ranker", api_key="secret")) as url, \
            httpx.Client(timeout=120, headers={"Authorization": "Bearer secret"}) as client:
        for route, first, second in (("/score", "queries", "documents"), ("/v1/score", "text_1", "text_2"),
                                     ("/score", "data_1", "data_2"), ("/score", "queries", "items")):
            reply = client.post(f"{url}{route}", json={"model": "ranker", first: query, second: documents})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["object"] == "list" and body["model"] == "ranker" and body["id"].startswith("score-")
            assert [d["index"] for d in body["data"]] == list(range(len(documents)))
            assert all(d["object"] == "score" for d in body["data"])
            np.testing.assert_allclose([d["score"] for d in body["data"]], expected, rtol=1e-5, atol=1e-6)
            assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
        for route in ("/rerank", "/v1/rerank"):
            reply = client.post(f"{url}{route}", json={"query": query, "documents": documents, "top_n": 3})
            assert reply.status_code == 200, reply.text
            results = reply.json()["results"]
            assert [r["index"] for r in results] == [r["corpus_id"] for r in ranked[:3]]
            np.testing.assert_allclose([r["relevance_score"] for r in results], [r["score"] for r in ranked[:3]],
                                       rtol=1e-5, atol=1e-6)
            assert [r["document"]["text"] for r in results] == [documents[r["corpus_id"]] for r in ranked[:3]]
        with torch_single_thread():
            logits = oracle.predict([(query, document) for document in documents[:2]], batch_size=1,
                                    activation_fn=torch.nn.Identity())
        raw = client.post(f"{url}/score", json={"queries": query, "documents": documents[:2], "use_activation": False})
        np.testing.assert_allclose([d["score"] for d in raw.json()["data"]], logits, rtol=1e-4, atol=1e-5)
        cut = client.post(f"{url}/score", json={"queries": query, "documents": documents[2],
                                                "max_tokens_per_doc": 10}).json()["data"][0]["score"]
        assert cut == pytest.approx(llm.score(query, " ".join(documents[2].split()[:10]), use_tqdm=False)[0]
                                    .outputs.score, rel=1e-6)
        refusals = [("/score", {"queries": ["t5", "t6"], "documents": ["t7", "t8", "t9"]}, "queries"),
                    ("/score", {"queries": "t5"}, None), ("/rerank", {"query": "t5", "documents": []}, "documents"),
                    ("/score", {"queries": "t5", "documents": "t6", "text_1": "t5", "text_2": "t6"}, None),
                    ("/score", {"queries": "t5", "documents": "t6", "text_1": "t5"}, None),
                    ("/score", {"queries": ["t5", " ".join(["t9"] * 130)], "documents": ["t6", "t7"]}, "documents"),
                    ("/score", {"queries": "t5", "documents": "t6", "truncate_prompt_tokens": 3},
                     "truncate_prompt_tokens"),
                    ("/rerank", {"query": "t5", "documents": ["t6"], "top_n": -1}, "top_n"),
                    ("/score", {"text_1": "t5", "text_2": "t6", "max_tokens_per_doc": 128}, "max_tokens_per_doc"),
                    ("/rerank", {"query": "t5", "documents": ["t6", " ".join(["t9"] * 130)]}, "documents")]
        for route, request, param in refusals:
            reply = client.post(f"{url}{route}", json=request)
            assert reply.status_code == 400, (request, reply.text)
            assert reply.json()["error"]["param"] == param, reply.json()
        assert reply.json()["error"]["message"].startswith("pair 1: prompt of 13")
        assert httpx.post(f"{url}/rerank", json={"query": "t5", "documents": ["t6"]}).status_code == 401
        client_v2 = cohere.ClientV2(api_key="secret", base_url=url)
        reranked = client_v2.rerank(model="ranker", query=query, documents=documents)
        assert [r.index for r in reranked.results] == [r["corpus_id"] for r in ranked]
        np.testing.assert_allclose([r.relevance_score for r in reranked.results], [r["score"] for r in ranked],
                                   rtol=1e-5, atol=1e-6)
    assert llm.engine.stats().kv_cache_usage == 0


def test_server_scores_with_an_embedding_model(embedder, texts):
    oracle, llm = embedder
    query, documents = texts
    expected = [out.outputs.score for out in llm.score(query, documents, use_tqdm=False)]
    with serving(create_app(llm.engine)) as url, httpx.Client(timeout=120) as client:
        reply = client.post(f"{url}/rerank", json={"query": query, "documents": documents})
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert [r["index"] for r in results] == list(np.argsort(expected)[::-1])
        np.testing.assert_allclose(sorted(r["relevance_score"] for r in results), sorted(expected), rtol=1e-5,
                                   atol=1e-6)  # (a prefix-cache hit computes the last token alone)
        tokenizer = llm.get_tokenizer()
        tokens = len(tokenizer.encode(query)) + sum(len(tokenizer.encode(d)) for d in documents)
        assert reply.json()["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        empty = client.post(f"{url}/score", json={"text_1": "t5", "text_2": ["t6", ""]})
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "text_2"
        assert "text_2[1] is empty" in empty.json()["error"]["message"]
    assert llm.engine.stats().kv_cache_usage == 0


def test_a_generating_server_refuses_scoring(stories_path):
    with serving(create_app(LLM(stories_path, num_blocks=16).engine)) as url:
        for route, request in (("/score", {"text_1": "a", "text_2": "b"}), ("/rerank", {"query": "a", "documents": ["b"]})):
            reply = httpx.post(f"{url}{route}", json=request, timeout=60)
            assert reply.status_code == 400 and "runner='pooling'" in reply.json()["error"]["message"]


RERANKER_OVERRIDES = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
                      "is_original_qwen3_reranker": True}  # how vLLM's docs load Qwen3-Reranker
RERANK_TEMPLATE = ('t5 {{ instruction | default("t3 t4") }} t6 {{ messages[0]["content"] }} t7 '
                   '{{ messages[1]["content"] }} t8')  # query turn, document turn: a reranker's prompt format


def save_answer_tokenizer(folder) -> None:
    """A word-level tokenizer of `<unk> <s> </s> t3 ... t125 no yes`: a causal LM's answer tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)} | {f"t{i}": i for i in range(3, VOCAB - 2)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab | {"no": VOCAB - 2, "yes": VOCAB - 1}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(str(folder))


@pytest.fixture(scope="module", params=["tied", "untied"])
def causal_reranker(request, tmp_path_factory):
    """A random-weight Qwen3 causal LM that answers "yes" or "no" (the answer rows come from the
    embedding where it is tied to the LM head, else from the LM head), and its torch model."""
    folder = tmp_path_factory.mktemp(f"causal_reranker_{request.param}")
    config = transformers.Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=request.param == "tied")
    model = save_random_model(folder, config, seed=11)
    save_answer_tokenizer(folder)
    return folder, model


def yes_probability(model, token_ids: list[int]) -> float:
    """Qwen3-Reranker's score, as its model card computes it: the softmax of the last position's
    "no" and "yes" logits, at "yes"."""
    with torch.no_grad(), torch_single_thread():
        logits = model(torch.tensor([token_ids])).logits[0, -1, [VOCAB - 2, VOCAB - 1]].double()
    return float(torch.softmax(logits, 0)[1])


def test_a_causal_lm_scores_as_a_reranker_through_its_template(causal_reranker, texts):
    folder, model = causal_reranker
    query, documents = texts
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    llm = LLM(str(folder), hf_overrides=RERANKER_OVERRIDES, **ENGINE_ARGS)
    for variables, instruction in ((None, "t3 t4"), ({"instruction": "t9 t10 t11"}, "t9 t10 t11")):
        outputs = llm.score(query, documents, use_tqdm=False, chat_template=RERANK_TEMPLATE,
                            chat_template_kwargs=variables)
        prompts = [tokenizer(f"t5 {instruction} t6 {query} t7 {document} t8")["input_ids"] for document in documents]
        assert [out.prompt_token_ids for out in outputs] == prompts
        np.testing.assert_allclose([out.outputs.score for out in outputs], [yes_probability(model, p) for p in prompts],
                                   rtol=1e-4, atol=1e-6)
    plain = llm.score(query, documents[:2], use_tqdm=False)  # no template: the texts joined (use_sep_token false)
    joined = [tokenizer(query + document)["input_ids"] for document in documents[:2]]
    np.testing.assert_allclose([out.outputs.score for out in plain], [yes_probability(model, p) for p in joined],
                               rtol=1e-4, atol=1e-6)
    with serving(create_app(llm.engine, chat_template=RERANK_TEMPLATE)) as url:
        reply = httpx.post(f"{url}/rerank", json={"query": query, "documents": documents, "instruction": "t9 t10 t11"},
                           timeout=120)
        assert reply.status_code == 200, reply.text
        with_instruction = llm.score(query, documents, use_tqdm=False, chat_template=RERANK_TEMPLATE,
                                     chat_template_kwargs={"instruction": "t9 t10 t11"})
        assert {r["index"]: r["relevance_score"] for r in reply.json()["results"]} == pytest.approx(
            {i: out.outputs.score for i, out in enumerate(with_instruction)}, rel=1e-6)
    assert llm.engine.stats().kv_cache_usage == 0


def test_a_causal_lm_classifies_by_its_answer_tokens(causal_reranker, texts):
    """`method` "no_post_processing": one label per answer token, their logits through softmax."""
    folder, model = causal_reranker
    overrides = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
                 "method": "no_post_processing"}
    llm = LLM(str(folder), hf_overrides=overrides, **ENGINE_ARGS)
    prompts = [texts[0], *texts[1][:3]]
    outputs = llm.classify(prompts, use_tqdm=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = [yes_probability(model, tokenizer(p)["input_ids"]) for p in prompts]
    np.testing.assert_allclose([out.outputs.probs[1] for out in outputs], expected, rtol=1e-4, atol=1e-6)
    assert [out.outputs.label for out in outputs] == ["yes" if p > 0.5 else "no" for p in expected]
    with pytest.raises(ValueError, match="one label .num_labels == 1.; this model has 2 .no, yes."):
        llm.score("t5", "t6")


def test_answer_token_settings_are_checked(causal_reranker, tmp_path):
    folder, _ = causal_reranker
    for overrides, message in (({"method": "from_3_way"}, "method 'from_3_way' does not say how"),
                               ({"classifier_from_token": ["yes"]}, "must be two tokens .false, then true."),
                               ({"classifier_from_token": ["no", "maybe"]}, "'maybe', which is not a token")):
        with pytest.raises(ValueError, match=message):
            LLM(str(folder), hf_overrides={**RERANKER_OVERRIDES, **overrides}, **ENGINE_ARGS)
    with pytest.raises(ValueError, match="names a token twice"):
        LLM(str(folder), hf_overrides={**RERANKER_OVERRIDES, "classifier_from_token": ["yes", "yes"]}, **ENGINE_ARGS)
    without_architectures = {key: value for key, value in RERANKER_OVERRIDES.items() if key != "architectures"}
    with pytest.raises(ValueError, match="only where its architectures name a .ForSequenceClassification"):
        LLM(str(folder), hf_overrides=without_architectures, **ENGINE_ARGS)
    if not json.loads((folder / "config.json").read_text())["tie_word_embeddings"]:  # no LM head: nothing to read
        bare = tmp_path / "no_lm_head"
        shutil.copytree(folder, bare)
        weights = safetensors.torch.load_file(str(bare / "model.safetensors"))
        safetensors.torch.save_file({k: v for k, v in weights.items() if k != "lm_head.weight"},
                                    str(bare / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match="has none for the answer tokens' rows of lm_head.weight \\(expected"):
            LLM(str(bare), hf_overrides=RERANKER_OVERRIDES, **ENGINE_ARGS)
    with pytest.raises(ValueError, match="hf_overrides must be a dict"):
        LLM(str(folder), hf_overrides=["architectures"], **ENGINE_ARGS)


def test_the_qwen3_reranker_template_writes_the_model_cards_prompt(reranker):
    """docs/templates/qwen3_reranker.jinja against the prompt Qwen3-Reranker's model card builds
    (its prefix, `<Instruct>: ...\\n<Query>: ...\\n<Document>: ...`, its suffix)."""
    template = (Path(__file__).parents[1] / "docs" / "templates" / "qwen3_reranker.jinja").read_text()
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
              'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    pair = [{"role": "query", "content": "What is the capital of China?"},
            {"role": "document", "content": "The capital of China is Beijing."}]
    default = "Given a web search query, retrieve relevant passages that answer the query"
    for variables, instruction in (({}, default), ({"instruction": "Find the answer"}, "Find the answer")):
        text = chat_text(reranker[0].tokenizer, pair, add_generation_prompt=False, chat_template=template,
                         chat_template_kwargs=variables)
        assert text == (f"{prefix}<Instruct>: {instruction}\n<Query>: What is the capital of China?\n"
                        f"<Document>: The capital of China is Beijing.{suffix}")
