"""LoRA adapters against PEFT's own: random-weight HF models with adapters made and saved by PEFT
(`get_peft_model` + `save_pretrained`), read back by PEFT (`PeftModel.from_pretrained`) as the
oracle for greedy tokens and prompt logprobs; several adapters and the base model in one batch, one
device slot taken in turns, the prefix cache kept apart per adapter, the server's model names,
and the refusals."""

import asyncio
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_models import hf_greedy, save_random_model, torch_single_thread  # noqa: E402

from jpaged import LLM, BeamSearchParams, LoRARequest, SamplingParams  # noqa: E402
from jpaged.config import EngineConfig, LoRAConfig, ParallelConfig  # noqa: E402

PROMPTS = [[1, 5, 9, 13, 20, 30, 4, 8, 17, 22, 41, 7, 3], [1, 44, 6, 27, 33]]
MAX_TOKENS = 10
# name: (rank, alpha, target modules, extra LoraConfig fields, saved dtype)
ADAPTERS = {
    "qv-down": (4, 16, ["q_proj", "v_proj", "down_proj"], {}, torch.float32),
    "rs-k-o-mlp": (8, 8, ["k_proj", "o_proj", "gate_proj", "up_proj"], {"use_rslora": True}, torch.bfloat16),
    "all": (2, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}, torch.float32),
}
ENGINE = dict(num_blocks=48, block_size=4, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64)


def save_adapter(base_folder, folder, rank, alpha, targets, extra, dtype, seed):
    """A PEFT LoRA adapter of random A and B (PEFT starts B at zero, which would change nothing)."""
    with torch_single_thread():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
        adapted = peft.get_peft_model(model, config)
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if "lora_B" in name:
                    param.mul_(4.0)  # large enough to change the greedy tokens
        adapted.to(dtype).save_pretrained(folder)


def peft_model(base_folder, adapter_folder):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32,
                                                             attn_implementation="eager")
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = 0
    if adapter_folder is None:
        return base.eval()
    return peft.PeftModel.from_pretrained(base, adapter_folder).eval()


def peft_prompt_logprobs(model, prompt):
    """Each prompt token's logprob under `model` (None for the first)."""
    with torch.no_grad(), torch_single_thread():
        logits = model(torch.tensor([prompt])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [None] + [logprobs[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]


def build_case(folder, config, seed):
    base = folder / "base"
    save_random_model(base, config, seed=seed)
    requests = {}
    for i, (name, spec) in enumerate(ADAPTERS.items(), start=1):
        save_adapter(base, folder / name, *spec, seed=seed + i)
        requests[name] = LoRARequest(name, i, str(folder / name))
    oracle = {}
    for name in [None, *requests]:
        model = peft_model(base, None if name is None else requests[name].lora_path)
        oracle[name] = ([hf_greedy(model, p, MAX_TOKENS) for p in PROMPTS], peft_prompt_logprobs(model, PROMPTS[0]))
    return base, requests, oracle


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return build_case(tmp_path_factory.mktemp("lora_llama"), config, seed=3)


@pytest.fixture(scope="module")
def llama_llm(llama):
    base, _, _ = llama
    return LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=8, **ENGINE)


def check_against_peft(llm, requests, oracle, names):
    """Greedy tokens of every prompt under each of `names` (None: the base model), all in one call,
    and the first prompt's prompt logprobs, against PEFT's."""
    cases = [(name, i) for name in names for i in range(len(PROMPTS))]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=0)
    outputs = llm.generate([PROMPTS[i] for _, i in cases], params, use_tqdm=False,
                           lora_request=[None if name is None else requests[name] for name, _ in cases])
    for (name, i), output in zip(cases, outputs):
        assert output.outputs[0].token_ids == oracle[name][0][i], (name, i)
        if i == 0:
            got = [None] + [next(iter(d.values())).logprob for d in output.prompt_logprobs[1:]]
            np.testing.assert_allclose(got[1:], oracle[name][1][1:], atol=2e-4, err_msg=str(name))
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.kv_cache_usage == 0


def test_adapters_and_the_base_model_in_one_batch_match_peft(llama, llama_llm):
    _, requests, oracle = llama
    assert len({tuple(oracle[name][0][0]) for name in oracle}) == len(oracle), "the adapters change no token"
    check_against_peft(llama_llm, requests, oracle, [None, "qv-down", "rs-k-o-mlp"])


def test_beam_search_through_an_adapter_matches_peft(llama, llama_llm):
    """`LLM.beam_search(..., lora_request=...)`: one prompt through an adapter, one through the
    base model, each beam list and score as HF's beam search on the PEFT model (or the base)."""
    from test_beam_search import hf_beams

    base, requests, _ = llama
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    names = ["all", None]
    outputs = llama_llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=True,
                                    lora_request=[None if name is None else requests[name] for name in names])
    for prompt, name, output in zip(PROMPTS, names, outputs):
        model = peft_model(base, None if name is None else requests[name].lora_path)
        with torch_single_thread():
            tokens, scores = hf_beams(model, prompt, params.beam_width, params.max_tokens, params.length_penalty)
        assert [s.token_ids for s in output.sequences] == tokens, name
        np.testing.assert_allclose([s.score for s in output.sequences], scores, atol=1e-4)
    assert outputs[0].sequences[0].token_ids != llama_llm.beam_search(PROMPTS[0], params)[0].sequences[0].token_ids
    stats = llama_llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_more_adapters_than_slots_take_turns(llama, llama_llm):
    """Three adapters and the base model through two slots: each adapter waits for a slot, and an
    adapter put back in a slot that held another gives its own tokens."""
    _, requests, oracle = llama
    check_against_peft(llama_llm, requests, oracle, ["all", "qv-down", None, "rs-k-o-mlp", "all"])


def test_one_slot(llama):
    base, requests, oracle = llama
    llm = LLM(str(base), enable_lora=True, max_loras=1, max_lora_rank=8, **ENGINE)
    check_against_peft(llm, requests, oracle, ["rs-k-o-mlp", "qv-down", None])


def test_prefix_cache_is_kept_apart_per_adapter(llama, llama_llm):
    """A prompt cached under one adapter is not reused under another or the base model (its KV
    differs), and is reused under the same adapter."""
    _, requests, oracle = llama
    llm, prompt = llama_llm, PROMPTS[0]
    llm.engine.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    runs = [("qv-down", 0), ("all", 0), (None, 0), ("qv-down", 12)]
    for name, cached in runs:
        output = llm.generate(prompt, params, use_tqdm=False, lora_request=requests.get(name))[0]
        assert output.outputs[0].token_ids == oracle[name][0][0], name
        assert output.num_cached_tokens == cached, name


def test_qwen2_biases_and_fused_qkv(tmp_path_factory):
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    base, requests, oracle = build_case(tmp_path_factory.mktemp("lora_qwen2"), config, seed=11)
    llm = LLM(str(base), enable_lora=True, max_loras=3, max_lora_rank=8, **ENGINE)
    check_against_peft(llm, requests, oracle, [None, "all", "qv-down", "rs-k-o-mlp"])


def test_ernie_adapters_on_its_interleaved_rope_projections(tmp_path_factory):
    """ERNIE 4.5's q / k rows are reordered for rotate-half RoPE when read; its adapters' q / k B
    factors are reordered alike, and give PEFT's tokens and logprobs."""
    config = transformers.Ernie4_5Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         max_position_embeddings=64, tie_word_embeddings=False)
    base, requests, oracle = build_case(tmp_path_factory.mktemp("lora_ernie"), config, seed=13)
    llm = LLM(str(base), enable_lora=True, max_loras=3, max_lora_rank=8, **ENGINE)
    check_against_peft(llm, requests, oracle, [None, "all", "qv-down", "rs-k-o-mlp"])


def test_phi3_adapters_on_its_fused_projections(tmp_path_factory):
    """PEFT adapters of Phi-3 target its checkpoint's fused `qkv_proj` and `gate_up_proj`; each
    is read as its parts' adapters (one A, B's rows split) and gives PEFT's tokens and logprobs."""
    folder = tmp_path_factory.mktemp("lora_phi3")
    config = transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     pad_token_id=0, tie_word_embeddings=False)
    save_random_model(folder / "base", config, seed=31)
    requests, oracle = {}, {None: None}
    for i, (name, targets) in enumerate({"fused": ["qkv_proj", "gate_up_proj"],
                                         "fused-o-down": ["qkv_proj", "o_proj", "down_proj"]}.items(), start=1):
        save_adapter(folder / "base", folder / name, 4, 16, targets, {}, torch.float32, seed=31 + i)
        requests[name] = LoRARequest(name, i, str(folder / name))
    for name in oracle.keys() | requests.keys():
        model = peft_model(folder / "base", None if name is None else requests[name].lora_path)
        oracle[name] = ([hf_greedy(model, p, MAX_TOKENS) for p in PROMPTS], peft_prompt_logprobs(model, PROMPTS[0]))
    llm = LLM(str(folder / "base"), enable_lora=True, max_loras=2, max_lora_rank=8, **ENGINE)
    check_against_peft(llm, requests, oracle, [None, "fused", "fused-o-down"])


def test_mixture_of_experts_attention_adapter(tmp_path_factory):
    """A mixture of experts takes adapters on its attention projections; one on its experts is refused."""
    folder = tmp_path_factory.mktemp("lora_moe")
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                         tie_word_embeddings=False)
    save_random_model(folder / "base", config, seed=21)
    save_adapter(folder / "base", folder / "attn", 4, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], {},
                 torch.float32, seed=22)
    request = LoRARequest("attn", 1, str(folder / "attn"))
    llm = LLM(str(folder / "base"), enable_lora=True, max_lora_rank=8, **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([PROMPTS[0]] * 2, params, use_tqdm=False, lora_request=[request, None])
    for output, adapter in zip(outputs, [folder / "attn", None]):
        assert output.outputs[0].token_ids == hf_greedy(peft_model(folder / "base", adapter), PROMPTS[0], MAX_TOKENS)
    (folder / "experts").mkdir()
    (folder / "experts" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    save_file({f"base_model.model.model.layers.0.mlp.gate_proj.lora_{x}.weight": np.ones((2, 2), np.float32)
               for x in "AB"}, str(folder / "experts" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="targets gate_proj, which this model's adapters cannot"):
        llm.generate(PROMPTS[0], params, lora_request=LoRARequest("experts", 2, str(folder / "experts")))


def test_cli_answers_through_an_adapter(llama, llama_llm, capsys):
    from jpaged.cli import main

    base, requests, _ = llama
    prompt, params = "t5 t9 t13 t20", SamplingParams(temperature=0, max_tokens=6)
    expected = [prompt + llama_llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0].outputs[0].text
                for lora in (requests["qv-down"], None)]
    assert expected[0] != expected[1]
    for lora, text in zip((requests["qv-down"], None), expected):
        flags = ["--lora", lora.lora_path] if lora else []
        assert main(["generate", "--model", str(base), "--no-chat", "--max-tokens", "6", *flags, prompt]) == 0
        assert capsys.readouterr().out.strip() == text
    assert main(["generate", "--model", str(base), "--no-chat", "--lora", "", prompt]) == 2  # no folder: refused
    assert "no adapter_config.json" in capsys.readouterr().err


def test_refusals_name_the_problem(llama, llama_llm, tmp_path):
    base, requests, _ = llama
    llm, params = llama_llm, SamplingParams(max_tokens=2)

    def refused(lora_request, match, llm=llm):
        with pytest.raises(ValueError, match=match):
            llm.generate(PROMPTS[0], params, use_tqdm=False, lora_request=lora_request)

    refused(LoRARequest("missing", 7, str(tmp_path / "nowhere")), "no adapter_config.json in")
    assert llm.engine.add_lora(requests["all"]) is True
    refused(LoRARequest("other", requests["all"].lora_int_id, requests["qv-down"].lora_path),
            "lora_int_id 3 is adapter 'all'")
    save_adapter(base, tmp_path / "big", 16, 16, ["q_proj"], {}, torch.float32, seed=1)
    refused(LoRARequest("big", 8, str(tmp_path / "big")), "rank 16 is more than max_lora_rank 8")
    save_adapter(base, tmp_path / "head", 2, 4, ["lm_head"], {}, torch.float32, seed=1)
    refused(LoRARequest("head", 9, str(tmp_path / "head")), "is not a LoRA factor of a decoder layer's projection")
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "use_dora": True}))
    (tmp_path / "dora" / "adapter_model.safetensors").write_bytes(b"")
    refused(LoRARequest("dora", 10, str(tmp_path / "dora")), "DoRA")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "adapter_config.json").write_text("[1, 2]")
    (tmp_path / "list" / "adapter_model.safetensors").write_bytes(b"")
    refused(LoRARequest("list", 11, str(tmp_path / "list")), "adapter_config.json must hold a JSON object, got list")
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    refused(LoRARequest("corrupt", 12, str(tmp_path / "dora")), "LoRA adapter 'corrupt': .* not a readable safetensors")
    same = llm.generate(PROMPTS[0], params, use_tqdm=False, lora_request=LoRARequest(
        "all", np.int64(requests["all"].lora_int_id), requests["all"].lora_path + "/"))  # the same adapter, spelled so
    assert same[0].outputs[0].finish_reason == "length"
    with pytest.raises(TypeError, match="lora_request must be a LoRARequest"):
        llm.generate(PROMPTS[0], params, use_tqdm=False, lora_request="qv-down")
    with pytest.raises(ValueError, match="lora_int_id must be an int >= 1"):
        LoRARequest("zero", 0, "x")
    with pytest.raises(ValueError, match=r"enable_lora runs without pipeline parallelism .* must be 1 \(got 2\)"):
        EngineConfig(parallel=ParallelConfig(pipeline_parallel_size=2), lora=LoRAConfig(enable_lora=True))
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and llm.engine.get_num_unfinished_requests() == 0
    plain = LLM(str(base), **ENGINE)
    refused(requests["all"], "needs an engine started with enable_lora=True", llm=plain)


def test_server_serves_adapters_by_model_name(llama, llama_llm):
    """`/v1/models` lists the adapters beside the model; a request naming one runs through it."""
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    from server_thread import serving

    from jpaged.server.launch import create_app

    _, requests, oracle = llama
    names = {"base": None, "qv-down": requests["qv-down"], "all": requests["all"]}
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = {name: llama_llm.generate(PROMPTS[0], params, use_tqdm=False, lora_request=lora)[0].outputs[0]
                for name, lora in names.items()}
    for name, output in expected.items():
        assert output.token_ids == oracle[names[name] and name][0][0]
    expected["rs-k-o-mlp"] = llama_llm.generate(PROMPTS[0], params, use_tqdm=False,
                                                lora_request=requests["rs-k-o-mlp"])[0].outputs[0]
    with pytest.raises(ValueError, match="LoRA module 'base': the model name 'base' is already served"):
        create_app(llama_llm.engine, served_model_name="base", lora_modules=[LoRARequest("base", 9, requests["all"].lora_path)])
    app = create_app(llama_llm.engine, served_model_name="base", lora_modules=[requests["qv-down"], requests["all"]],
                     allow_runtime_lora_updating=True)
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        cards = {card.id: card for card in client.models.list().data}
        assert list(cards) == ["base", "qv-down", "all"]
        assert cards["all"].model_extra["parent"] == "base"
        assert cards["all"].model_extra["root"] == requests["all"].lora_path
        for name in ["qv-down", "base", "all"]:
            reply = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"ignore_eos": True})
            assert reply.model == name
            assert reply.choices[0].text == expected[name].text, name
        with pytest.raises(openai.NotFoundError, match="serves `base`, `qv-down`, `all`"):
            client.completions.create(model="rs-k-o-mlp", prompt=PROMPTS[0], max_tokens=2)
        check_runtime_updates(url, client, requests["rs-k-o-mlp"], expected["rs-k-o-mlp"].text)
        stats = asyncio.run(app.state.server.engine.call(lambda engine: engine.stats()))
        assert stats.num_free_blocks == stats.num_blocks


def test_default_model_with_an_adapter_matches_peft(model_path, tmp_path):
    """The default model (a real trained model) with an adapter on every projection, against PEFT
    on transformers' own load of the same GGUF file: greedy chat answers, token for token."""
    from jpaged.llm import chat_token_ids

    with torch_single_thread():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
        torch.manual_seed(0)
        config = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        adapted = peft.get_peft_model(model, config).eval()
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.05)  # a nudge: the answers change, and stay answers
        adapted.save_pretrained(tmp_path / "adapter")
    llm = LLM(None, enable_lora=True, max_lora_rank=8, num_blocks=64)
    request = LoRARequest("nudge", 1, str(tmp_path / "adapter"))
    tokenizer = llm.get_tokenizer()
    prompts = [chat_token_ids(tokenizer, [{"role": "user", "content": q}])
               for q in ["What is the capital of France?", "Name three colours."]]
    params = SamplingParams(temperature=0.0, max_tokens=20)
    ours = llm.generate([{"prompt_token_ids": p} for p in prompts] * 2, params, use_tqdm=False,
                        lora_request=[request] * len(prompts) + [None] * len(prompts))
    with torch.no_grad(), torch_single_thread():
        theirs = [adapted.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=20)[0, len(p):].tolist()
                  for p in prompts]
    ours = [o.outputs[0].token_ids for o in ours]
    assert ours[:len(prompts)] == theirs
    assert ours[len(prompts):] != theirs  # the base model's answers (tests/test_default_model.py checks them) differ


def check_runtime_updates(url, client, lora, text):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: an adapter served from the load
    on, gone after the unload; taken names, unreadable folders and unknown names refused."""
    import httpx
    import openai

    def post(route, **body):
        return httpx.post(f"{url}/v1/{route}", json=body, timeout=60)

    assert post("load_lora_adapter", lora_name="all", lora_path=lora.lora_path).status_code == 400  # name taken
    refused = post("load_lora_adapter", lora_name="nowhere", lora_path="/nonexistent")
    assert refused.status_code == 400 and "no adapter_config.json" in refused.json()["error"]["message"]
    loaded = post("load_lora_adapter", lora_name="late", lora_path=lora.lora_path)
    assert loaded.status_code == 200, loaded.text
    assert [card.id for card in client.models.list().data] == ["base", "qv-down", "all", "late"]
    reply = client.completions.create(model="late", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == text
    assert post("unload_lora_adapter", lora_name="late").status_code == 200
    assert post("unload_lora_adapter", lora_name="late").status_code == 404
    from concurrent.futures import ThreadPoolExecutor

    names = [f"same-{i}" for i in range(4)]
    with ThreadPoolExecutor(4) as pool:  # changes run one at a time: fresh names all load, an unload wins once
        loads = list(pool.map(lambda name: post("load_lora_adapter", lora_name=name, lora_path=lora.lora_path), names))
        assert [r.status_code for r in loads] == [200] * 4, [r.text for r in loads]
        unloads = list(pool.map(lambda _: post("unload_lora_adapter", lora_name="same-0").status_code, range(3)))
        assert sorted(unloads) == [200, 404, 404]
        assert all(r.status_code == 200 for r in pool.map(
            lambda name: post("unload_lora_adapter", lora_name=name), names[1:]))
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=PROMPTS[0], max_tokens=2)


def test_engine_forgets_an_adapter_unless_it_is_in_use(llama, tmp_path):
    base, requests, oracle = llama
    llm = LLM(str(base), enable_lora=True, max_lora_rank=8, **ENGINE)
    engine, lora = llm.engine, requests["qv-down"]
    engine.add_request("r", PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                       lora_request=lora)
    engine.step()
    assert engine.list_loras() == {lora.lora_int_id}
    with pytest.raises(ValueError, match="'qv-down' .* is in use by 1 unfinished requests"):
        engine.remove_lora(lora.lora_int_id)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.remove_lora(lora.lora_int_id) and engine.list_loras() == set()
    assert not engine.remove_lora(lora.lora_int_id)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids == oracle[None][0][0]
    other = requests["all"]  # the id is free again, and the slot holds nothing of the adapter removed
    again = llm.generate(PROMPTS[0], params, use_tqdm=False, lora_request=LoRARequest("all", lora.lora_int_id,
                                                                                     other.lora_path))
    assert again[0].outputs[0].token_ids == oracle["all"][0][0]
