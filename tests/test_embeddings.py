"""Embeddings (`runner="pooling"`): `LLM.embed` and `POST /v1/embeddings` on a random-weight Qwen3
model laid out as a sentence-transformers embedding model (last-token pooling, then `Normalize`;
mean and CLS pooling too).

Oracle: HF transformers' `AutoModel` (the base model, no LM head) on the same folder: its
`last_hidden_state` at each input's last token, L2-normalised as sentence-transformers'
`Normalize` module does; for the server, the official `openai` client (float and base64
encodings) against `LLM.embed`. Inputs are long enough to be prefilled in several chunks, and one
repeats so that the prefix cache serves it.
"""

import base64
import json
import shutil
import sys

import httpx
import numpy as np
import pytest
import torch
import transformers

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from hf_models import save_random_model, sentence_transformers_files  # noqa: E402
from server_thread import serving  # noqa: E402

from jpaged import LLM, PoolingParams, SamplingParams  # noqa: E402
from jpaged.server.launch import create_app  # noqa: E402

VOCAB = 128
ENGINE_ARGS = dict(runner="pooling", num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)
LENGTHS = (5, 40, 17, 70, 40)  # the last repeats the second: a prefix-cache hit


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_embedding")
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, tie_word_embeddings=True)
    save_random_model(folder, config, seed=1)
    sentence_transformers_files(folder)
    return folder


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, VOCAB, n).tolist() for n in LENGTHS[:-1]]
    return ids + [ids[1]]


def hf_last_token_states(folder, prompts) -> np.ndarray:
    base = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return np.stack([base(torch.tensor([p])).last_hidden_state[0, -1].numpy() for p in prompts])


@pytest.fixture(scope="module")
def llm(model_folder):
    return LLM(str(model_folder), **ENGINE_ARGS)


@pytest.fixture(scope="module")
def expected(llm, prompts):
    return np.array([out.outputs.embedding for out in llm.embed([{"prompt_token_ids": p} for p in prompts],
                                                                use_tqdm=False)])


def test_embeddings_are_the_normalised_last_token_states(llm, model_folder, prompts, expected):
    states = hf_last_token_states(model_folder, prompts)
    np.testing.assert_allclose(expected, states / np.linalg.norm(states, axis=1, keepdims=True), atol=2e-6)
    assert expected.shape == (len(prompts), 64)
    stats = llm.engine.stats()
    assert stats.kv_cache_usage == 0 and stats.num_generated_tokens == 0 and stats.prefix_cache_hit_rate > 0


def test_embedding_requests_are_timed_and_counted_in_the_metrics(model_folder, prompts, expected):
    """Each embedding request's `metrics` time its one output (first and last at once), and
    `get_metrics()` observes them: the end-to-end histogram's sum is the outputs' own latencies,
    each request counts once as finished by "stop", and none has a time per output token."""
    from jpaged.metrics import Counter, Histogram

    llm = LLM(str(model_folder), **ENGINE_ARGS, disable_log_stats=False)
    outputs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    np.testing.assert_allclose([out.outputs.embedding for out in outputs], expected, atol=1e-6)
    for out in outputs:
        metrics = out.metrics
        assert metrics.arrival_time < metrics.first_token_time == metrics.last_token_time == metrics.finished_time
    by_name = {(m.name, m.labels.get("finished_reason")): m for m in llm.get_metrics()}
    e2e = by_name[("jpaged:e2e_request_latency_seconds", None)]
    assert isinstance(e2e, Histogram) and e2e.count == len(prompts) == e2e.buckets["+Inf"]
    assert e2e.sum == pytest.approx(sum(out.metrics.finished_time - out.metrics.arrival_time for out in outputs))
    assert by_name[("jpaged:time_to_first_token_seconds", None)].count == len(prompts)
    assert by_name[("jpaged:time_per_output_token_seconds", None)].count == 0
    finished = by_name[("jpaged:request_success", "stop")]
    assert isinstance(finished, Counter) and finished.value == len(prompts)


def test_use_activation_false_leaves_the_embedding_unnormalised(llm, model_folder, prompts):
    states = hf_last_token_states(model_folder, prompts[:3])
    outputs = llm.embed([{"prompt_token_ids": p} for p in prompts[:3]], use_tqdm=False,
                        pooling_params=[PoolingParams(use_activation=False), PoolingParams(), PoolingParams(False)])
    np.testing.assert_allclose(outputs[0].outputs.embedding, states[0], atol=2e-5)
    np.testing.assert_allclose(outputs[1].outputs.embedding, states[1] / np.linalg.norm(states[1]), atol=2e-6)
    np.testing.assert_allclose(outputs[2].outputs.embedding, states[2], atol=2e-5)
    with serving(create_app(llm.engine)) as url:
        reply = httpx.post(f"{url}/v1/embeddings", json={"input": [prompts[0]], "use_activation": False}, timeout=60)
        np.testing.assert_allclose(reply.json()["data"][0]["embedding"], states[0], atol=2e-5)
    with pytest.raises(TypeError, match="use_activation must be a bool or None, got str 'no'"):
        PoolingParams(use_activation="no")
    with pytest.raises(ValueError, match="got 2 pooling params for 1 prompts"):
        llm.embed("t5", pooling_params=[PoolingParams()] * 2)


def test_a_base_model_checkpoint_embeds_alike(model_folder, prompts, expected, tmp_path):
    """A checkpoint of the base model (`Qwen3Model`: no `model.` prefix, no LM head, untied), as
    embedding models ship, gives the same embeddings."""
    base = transformers.AutoModel.from_pretrained(str(model_folder), dtype=torch.float32)
    base.config.tie_word_embeddings = False
    base.save_pretrained(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "modules.json", "1_Pooling"):
        copy = shutil.copytree if (model_folder / name).is_dir() else shutil.copy
        copy(model_folder / name, tmp_path / name)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3Model"]
    outs = LLM(str(tmp_path), **ENGINE_ARGS).embed([{"prompt_token_ids": p} for p in prompts[:2]], use_tqdm=False)
    np.testing.assert_allclose([o.outputs.embedding for o in outs], expected[:2], atol=1e-6)


def test_a_prompt_of_max_model_len_tokens_embeds(llm, model_folder):
    """An embedding adds no token, so a prompt may fill `max_model_len` (a generating engine
    keeps room for one output token)."""
    prompt = np.random.default_rng(1).integers(3, VOCAB, ENGINE_ARGS["max_model_len"]).tolist()
    (out,) = llm.embed({"prompt_token_ids": prompt}, use_tqdm=False)
    state = hf_last_token_states(model_folder, [prompt])[0]
    np.testing.assert_allclose(out.outputs.embedding, state / np.linalg.norm(state), atol=2e-6)
    with pytest.raises(ValueError, match="prompt 0: prompt of 129 tokens is longer than max_model_len 128"):
        llm.embed({"prompt_token_ids": prompt + [5]}, use_tqdm=False)


def test_pooling_settings_come_from_the_sentence_transformers_files(model_folder, prompts, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(model_folder, plain)
    sentence_transformers_files(plain, normalize=False)
    out = LLM(str(plain), **ENGINE_ARGS).embed({"prompt_token_ids": prompts[0]}, use_tqdm=False)[0]
    np.testing.assert_allclose(out.outputs.embedding, hf_last_token_states(plain, prompts[:1])[0], atol=2e-5)
    (plain / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))  # the short form
    assert LLM(str(plain), **ENGINE_ARGS).embed({"prompt_token_ids": prompts[0]}, use_tqdm=False)[0].outputs.embedding
    sentence_transformers_files(plain, pooling="pooling_mode_max_tokens")
    with pytest.raises(ValueError, match=r"1_Pooling/config.json pools by pooling_mode_max_tokens; .* last token, the "
                                         r"mean or the first token"):
        LLM(str(plain), **ENGINE_ARGS)
    modules = json.loads((plain / "modules.json").read_text())
    (plain / "modules.json").write_text(json.dumps(
        [*modules, {"idx": 3, "name": "3", "path": "3_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}]))
    with pytest.raises(ValueError, match="lists the modules LayerNorm after the transformer"):
        LLM(str(plain), **ENGINE_ARGS)
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    (plain / "modules.json").write_text(json.dumps([*modules, dense]))  # after Normalize
    with pytest.raises(ValueError, match="lists Transformer, Pooling, Normalize, Dense; jpaged applies them in the "
                                         "order Transformer, Pooling, Dense layers, Normalize"):
        LLM(str(plain), **ENGINE_ARGS)


@pytest.mark.parametrize("mode", ["pooling_mode_mean_tokens", "pooling_mode_cls_token"])
def test_mean_and_first_token_pooling(model_folder, prompts, tmp_path, mode):
    """Mean pooling (LLM2Vec, GritLM) and CLS pooling against HF's states of every prompt token:
    prompts prefilled in chunks of up to 32 tokens, with room in the cache and with a cache of six
    blocks; prefix caching is off (a cached prefix's states are never computed), so the repeated
    prompt is computed again."""
    folder = tmp_path / mode
    shutil.copytree(model_folder, folder)
    sentence_transformers_files(folder, pooling=mode)
    base = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        states = [base(torch.tensor([p])).last_hidden_state[0].numpy() for p in prompts]
    want = np.stack([s.mean(axis=0) if mode == "pooling_mode_mean_tokens" else s[0] for s in states])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    for args in (ENGINE_ARGS, {**ENGINE_ARGS, "num_blocks": 6}):
        llm = LLM(str(folder), **args)
        outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        np.testing.assert_allclose([o.outputs.embedding for o in outs], want, atol=2e-6)
        stats = llm.engine.stats()
        assert stats.prefix_cache_hit_rate == 0 and stats.num_free_blocks == stats.num_blocks
    with pytest.raises(ValueError, match="pooling runs on one pipeline stage only .* pipeline_parallel_size 2"):
        LLM(str(folder), **ENGINE_ARGS, pipeline_parallel_size=2)


def test_each_runner_refuses_the_other_runners_calls(llm, stories_path):
    with pytest.raises(ValueError, match="runner='pooling'.*LLM.embed"):
        llm.generate("t5 t6", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="with PoolingParams or none, not SamplingParams"):
        llm.engine.add_request("x", "t5 t6", SamplingParams())
    generator = LLM(stories_path, num_blocks=16)
    with pytest.raises(ValueError, match="runner='pooling'"):
        generator.embed("Once upon a time", use_tqdm=False)
    with pytest.raises(ValueError, match="this engine generates: .* PoolingParams are for runner='pooling'"):
        generator.engine.add_request("x", "Once upon a time", PoolingParams())
    with pytest.raises(ValueError, match="runner must be one of auto, generate, pooling, got 'embed'"):
        LLM(stories_path, runner="embed")


def test_server_embeddings_match_llm_embed(llm, prompts, expected):
    texts = [" ".join(f"t{i}" for i in p) for p in prompts[:2]]
    with serving(create_app(llm.engine, served_model_name="embedder")) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        as_base64 = api.embeddings.create(model="embedder", input=texts)  # the client's default encoding
        as_floats = api.embeddings.create(model="embedder", input=prompts, encoding_format="float")
        assert [d.index for d in as_floats.data] == list(range(len(prompts)))
        np.testing.assert_allclose([d.embedding for d in as_floats.data], expected, atol=1e-6)
        np.testing.assert_allclose([d.embedding for d in as_base64.data], expected[:2], atol=1e-6)
        assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == sum(LENGTHS)
        for call, param in ((lambda: api.embeddings.create(model="embedder", input=[]), "input"),
                            (lambda: api.embeddings.create(model="embedder", input=[[5] * 200]), "input"),
                            (lambda: api.embeddings.create(model="embedder", input="t5", dimensions=8), "dimensions"),
                            (lambda: api.completions.create(model="embedder", prompt="t5", max_tokens=2), None)):
            with pytest.raises(openai.BadRequestError) as caught:
                call()
            assert caught.value.body["param"] == param
        assert "/v1/embeddings" in caught.value.body["message"]
    assert llm.engine.stats().kv_cache_usage == 0


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def torch_decoded(raw: bytes, embed_dtype: str, endianness: str, shape) -> torch.Tensor:
    """`raw` read back by torch as `embed_dtype` numbers in `endianness` byte order."""
    dtype = TORCH_DTYPES[embed_dtype]
    width = torch.empty(0, dtype=dtype).element_size()
    swap = endianness not in ("native", sys.byteorder)
    ordered = np.frombuffer(raw, np.uint8).reshape(-1, width)[:, ::-1 if swap else 1]
    return torch.frombuffer(bytearray(ordered.tobytes()), dtype=dtype).reshape(shape)


def test_server_encodings_are_torch_conversions_of_the_float_embeddings(model_folder, prompts):
    """vLLM's `embed_dtype` / `endianness` and the bytes formats: each vector read back by torch
    equals torch's own conversion of the same request's float32 embedding, bit for bit."""
    llm = LLM(str(model_folder), **ENGINE_ARGS, enable_prefix_caching=False)  # every request computed alike
    inputs = prompts[:2]
    with serving(create_app(llm.engine, served_model_name="embedder")) as url, httpx.Client(timeout=120) as client:
        def post(**fields):
            reply = client.post(f"{url}/v1/embeddings", json={"input": inputs, **fields})
            assert reply.status_code == 200, reply.text
            return reply

        floats = torch.tensor([d["embedding"] for d in post(encoding_format="float").json()["data"]])
        for embed_dtype in TORCH_DTYPES:
            want = floats.to(TORCH_DTYPES[embed_dtype])
            for endianness in ("native", "big", "little"):
                data = post(encoding_format="base64", embed_dtype=embed_dtype, endianness=endianness).json()["data"]
                got = torch.stack([torch_decoded(base64.b64decode(d["embedding"]), embed_dtype, endianness, (64,))
                                   for d in data])
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (embed_dtype, endianness)
        reply = post(encoding_format="bytes", embed_dtype="bfloat16", endianness="big")
        assert reply.headers["content-type"] == "application/octet-stream"
        metadata = json.loads(reply.headers["metadata"])
        assert metadata["model"] == "embedder" and metadata["usage"]["prompt_tokens"] == sum(LENGTHS[:2])
        assert [(d["index"], d["start"], d["end"], d["shape"]) for d in metadata["data"]] == [(0, 0, 128, [64]),
                                                                                             (1, 128, 256, [64])]
        for item, row in zip(metadata["data"], floats.to(torch.bfloat16)):
            got = torch_decoded(reply.content[item["start"]:item["end"]], item["embed_dtype"], item["endianness"],
                                item["shape"])
            assert torch.equal(got.view(torch.uint8), row.view(torch.uint8))
        bare = post(encoding_format="bytes_only")
        assert "metadata" not in bare.headers
        assert torch.equal(torch_decoded(bare.content, "float32", "native", (2, 64)), floats)
        reply = client.post(f"{url}/v1/embeddings", json={"input": "t5", "embed_dtype": "int8"})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "embed_dtype", reply.text
    assert llm.engine.stats().kv_cache_usage == 0


def test_matryoshka_dimensions_cut_the_embedding_before_normalising(model_folder, prompts):
    llm = LLM(str(model_folder), **ENGINE_ARGS, hf_overrides={"matryoshka_dimensions": [16, 32]})
    states = hf_last_token_states(model_folder, prompts[:3])
    cut = states[:, :16] / np.linalg.norm(states[:, :16], axis=1, keepdims=True)
    got = llm.embed(prompts[:3], use_tqdm=False, pooling_params=PoolingParams(dimensions=16))
    np.testing.assert_allclose([out.outputs.embedding for out in got], cut, rtol=1e-4, atol=1e-5)
    for dimensions, message in ((20, "not one of the model's matryoshka_dimensions"),
                                (0, "dimensions must be at least 1")):
        with pytest.raises(ValueError, match=message):
            llm.embed(prompts[0], use_tqdm=False, pooling_params=PoolingParams(dimensions=dimensions))
    with serving(create_app(llm.engine, served_model_name="embedder")) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = api.embeddings.create(model="embedder", input=prompts[:3], dimensions=16)
        np.testing.assert_allclose([d.embedding for d in reply.data], cut, rtol=1e-4, atol=1e-5)
        for dimensions in (20, 0):
            with pytest.raises(openai.BadRequestError) as caught:
                api.embeddings.create(model="embedder", input="t5", dimensions=dimensions)
            assert caught.value.body["param"] == "dimensions", caught.value.body
    unlisted = LLM(str(model_folder), **ENGINE_ARGS, hf_overrides={"is_matryoshka": True})
    whole = unlisted.embed(prompts[0], use_tqdm=False, pooling_params=PoolingParams(dimensions=64))
    np.testing.assert_allclose(whole[0].outputs.embedding, llm.embed(prompts[0], use_tqdm=False)[0].outputs.embedding,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="more than the model's embedding size 64"):
        unlisted.embed(prompts[0], use_tqdm=False, pooling_params=PoolingParams(dimensions=65))
    assert llm.engine.stats().kv_cache_usage == 0
