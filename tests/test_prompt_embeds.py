"""Prompts given as embeddings (`{"prompt_embeds": ...}`, `enable_prompt_embeds`) and requests
salted apart in the prefix cache (`cache_salt`).

Oracle: HF transformers' `generate(inputs_embeds=...)` on random-weight models, greedy, over
fresh random embeddings: a Llama, a Granite (whose embedding multiplier HF applies to the
embeddings it is given) and a Gemma (whose multiplier is part of HF's embedding lookup, so
embeddings it is given are taken as they are). HF's repetition penalty over an embeds prompt
sees only generated tokens, as jpaged's does.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_models import save_random_model, torch_single_thread  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402

VOCAB, HIDDEN, NEW = 128, 64, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)
CASES = {
    "llama": ("LlamaConfig", {}),
    "granite": ("GraniteConfig", dict(embedding_multiplier=3.0, attention_multiplier=0.09, residual_multiplier=0.5,
                                      logits_scaling=2.5)),
    "gemma": ("GemmaConfig", dict(pad_token_id=0)),
}
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    config_class, overrides = CASES[request.param]
    config = getattr(transformers, config_class)(**{**COMMON, **overrides})
    folder = tmp_path_factory.mktemp(request.param)
    model = save_random_model(folder, config, seed=7)
    llm = LLM(str(folder), enable_prompt_embeds=True, max_model_len=128, num_blocks=48, block_size=8,
              max_num_batched_tokens=24)
    return model, llm


def random_embeds(seed: int, length: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, scale, (length, HIDDEN)).astype(np.float32))


def hf_greedy_from_embeds(model, embeds: torch.Tensor, repetition_penalty: float = 1.0) -> list[int]:
    with torch.no_grad(), torch_single_thread():
        out = model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False, repetition_penalty=repetition_penalty)
    return out[0].tolist()[-NEW:]


def test_embeds_prompts_match_hf_generate(case):
    """Embeds prompts of several lengths in one batch, prefilled in chunks of 24 tokens beside a
    token prompt: each gives HF's greedy tokens for the same embeddings; the output has no prompt
    text or token ids, as vLLM's has none."""
    model, llm = case
    embeds = [random_embeds(seed, length) for seed, length in ((1, 5), (2, 30), (3, 17))]
    outputs = llm.generate([{"prompt_embeds": e} for e in embeds] + [[5, 6, 7]], GREEDY, use_tqdm=False)
    for out, e in zip(outputs, embeds):
        assert out.outputs[0].token_ids == hf_greedy_from_embeds(model, e)
        assert out.prompt is None and out.prompt_token_ids is None
        assert out.outputs[0].text == llm.get_tokenizer().decode(out.outputs[0].token_ids)
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks


def test_token_embeddings_give_the_token_prompts_tokens(case):
    """The model's own input embeddings of a prompt (HF's `get_input_embeddings()`, as vLLM's
    example makes them) give the tokens of the same prompt as token ids."""
    model, llm = case
    ids = np.random.default_rng(4).integers(3, VOCAB, 21).tolist()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor(ids))
    by_embeds, by_ids = llm.generate([{"prompt_embeds": embeds}, {"prompt_token_ids": ids}], GREEDY, use_tqdm=False)
    assert by_embeds.outputs[0].token_ids == by_ids.outputs[0].token_ids


PENALIZED = random_embeds(5, 12)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama whose LM head puts token 0 (the embeds prompts' placeholder id) first after
    `PENALIZED`, by 1.3x the logit of the token HF would choose there: a repetition penalty (1.8)
    that counted the placeholders as prompt tokens would choose that other token."""
    folder = tmp_path_factory.mktemp("llama_salt")
    model = save_random_model(folder, transformers.LlamaConfig(**COMMON), seed=3)
    with torch.no_grad():
        logits = model(inputs_embeds=PENALIZED[None]).logits[0, -1]
        top = int(logits.argmax())
        assert logits[top] > 0 and top != 0
        model.lm_head.weight[0] = 1.3 * model.lm_head.weight[top]
    model.save_pretrained(str(folder), safe_serialization=True)
    return model, LLM(str(folder), enable_prompt_embeds=True, max_model_len=128, num_blocks=48, block_size=8)


def test_repetition_penalty_sees_generated_tokens_only(llama):
    """HF's repetition penalty over `inputs_embeds` counts the generated tokens only; so does
    jpaged's over an embeds prompt (whose placeholder ids are no prompt tokens)."""
    model, llm = llama
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, repetition_penalty=1.8)
    out = llm.generate({"prompt_embeds": PENALIZED}, params, use_tqdm=False)[0]
    expected = hf_greedy_from_embeds(model, PENALIZED, repetition_penalty=1.8)
    assert expected[0] == 0 and out.outputs[0].token_ids == expected


def test_embeds_prompts_share_cached_blocks_by_content(llama):
    """An embeds prompt's full blocks are cached by their rows: a prompt sharing the first two
    blocks' rows reads them from the cache, one differing in the second block reads the first
    only, and a token prompt of the placeholder ids reads none; outputs stay HF's."""
    model, llm = llama
    base = random_embeds(11, 20)  # blocks of 8: two full blocks, then 4 rows
    changed = base.clone()
    changed[9] += 0.5
    first, again, other = (llm.generate({"prompt_embeds": e}, GREEDY, use_tqdm=False)[0] for e in (base, base, changed))
    placeholders = llm.generate({"prompt_token_ids": [0] * 20}, GREEDY, use_tqdm=False)[0]
    assert (first.num_cached_tokens, again.num_cached_tokens, other.num_cached_tokens) == (0, 16, 8)
    assert placeholders.num_cached_tokens == 0
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == hf_greedy_from_embeds(model, base)
    assert other.outputs[0].token_ids == hf_greedy_from_embeds(model, changed)


def test_cache_salt_keeps_prefixes_apart(llama):
    """A salted prompt reads the cache only after the same prompt under the same salt, never an
    unsalted one's blocks or another salt's (vLLM's `cache_salt`); its tokens are unchanged."""
    _, llm = llama
    prompt = np.random.default_rng(12).integers(3, VOCAB, 27).tolist()
    runs = [{"prompt_token_ids": prompt}, {"prompt_token_ids": prompt, "cache_salt": "tenant-a"},
            {"prompt_token_ids": prompt, "cache_salt": "tenant-b"}, {"prompt_token_ids": prompt, "cache_salt": "tenant-a"},
            {"prompt_token_ids": prompt}, {"prompt_embeds": random_embeds(13, 17), "cache_salt": "tenant-a"}]
    outputs = [llm.generate(run, GREEDY, use_tqdm=False)[0] for run in runs]
    assert [out.num_cached_tokens for out in outputs[:5]] == [0, 0, 0, 24, 24]
    assert len({tuple(out.outputs[0].token_ids) for out in outputs[:5]}) == 1
    assert outputs[5].num_cached_tokens == 0
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_bad_prompts_are_refused_and_the_engine_goes_on(llama, tmp_path):
    _, llm = llama
    embeds = random_embeds(14, 6)
    nan = embeds.clone()
    nan[2, 3] = float("nan")
    bad = [
        ({"prompt_embeds": random_embeds(15, 6)[:, :32]}, "rows hold 32 values, the model's hidden_size is 64"),
        ({"prompt_embeds": embeds, "prompt": "t5 t6"}, "takes no \\['prompt'\\]"),
        ({"prompt_embeds": nan}, "not finite"),
        ({"prompt_embeds": embeds[:0]}, "at least one row"),
        ({"prompt_embeds": torch.stack([embeds, embeds])}, "got shape \\[2, 6, 64\\]"),
        ({"prompt_embeds": torch.ones(6, 64, dtype=torch.int64)}, "must hold floats, got a tensor of torch.int64"),
        ({"prompt_embeds": None}, "array of floats, got None"),
        ({"prompt_token_ids": [5, 6], "cache_salt": ""}, "cache_salt must be a non-empty string"),
        ({"prompt_token_ids": [5, 6], "cache_salt": 7}, "cache_salt must be a non-empty string"),
    ]
    for prompt, message in bad:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs needs prompt tokens"):
        llm.generate({"prompt_embeds": embeds}, SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt of 200 tokens leaves no room"):
        llm.generate({"prompt_embeds": random_embeds(16, 200)}, GREEDY, use_tqdm=False)
    batched = llm.generate({"prompt_embeds": embeds[None]}, GREEDY, use_tqdm=False)[0]  # a batch axis of 1 is dropped
    assert batched.outputs[0].token_ids == llm.generate({"prompt_embeds": embeds}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def encoded(embeds: torch.Tensor) -> str:
    """A tensor as vLLM's server takes it: base64 of its `torch.save` bytes."""
    import base64
    import io

    buffer = io.BytesIO()
    torch.save(embeds, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def test_server_completions_take_prompt_embeds_and_cache_salt(llama):
    """`/v1/completions` through the official client: `prompt_embeds` (one, or several beside a
    text prompt, the embeds first, as vLLM orders them) answer with HF's tokens, streamed or not,
    the usage counting their rows; `cache_salt` on completions and chats keeps prefixes apart;
    unreadable embeddings, echo and empty salts are 400s; every block is free after."""
    openai = pytest.importorskip("openai")
    from server_thread import serving

    from jpaged.server.launch import create_app

    model, llm = llama
    first, second = random_embeds(21, 9), random_embeds(22, 14).to(torch.bfloat16)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with serving(create_app(llm.engine, served_model_name="m", chat_template=template)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        body = {"ignore_eos": True, "return_token_ids": True}
        one = client.completions.create(model="m", prompt=None, max_tokens=NEW, temperature=0,
                                        extra_body={"prompt_embeds": encoded(first), **body})
        assert one.choices[0].token_ids == hf_greedy_from_embeds(model, first)
        assert one.choices[0].prompt_token_ids is None and one.usage.prompt_tokens == 9
        both = client.completions.create(model="m", prompt="t5 t6 t7", max_tokens=NEW, temperature=0,
                                         extra_body={"prompt_embeds": [encoded(first), encoded(second)], **body})
        assert [c.index for c in both.choices] == [0, 1, 2]
        assert both.choices[0].token_ids == one.choices[0].token_ids
        assert both.choices[1].token_ids == hf_greedy_from_embeds(model, second.float())
        assert both.choices[2].prompt_token_ids == llm.get_tokenizer().encode("t5 t6 t7")
        assert both.usage.prompt_tokens == 9 + 14 + len(both.choices[2].prompt_token_ids)
        streamed = client.completions.create(model="m", prompt=None, max_tokens=NEW, temperature=0, stream=True,
                                             extra_body={"prompt_embeds": encoded(first), "ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == one.choices[0].text
        scored = [client.completions.create(model="m", prompt=None, max_tokens=NEW, temperature=0, logprobs=1,
                                            stream=stream, extra_body={"prompt_embeds": encoded(first), **body})
                  for stream in (False, True)]
        chunks = [c.choices[0].logprobs for c in scored[1] if c.choices and c.choices[0].logprobs]
        offsets = [scored[0].choices[0].logprobs.text_offset, [x for chunk in chunks for x in chunk.text_offset]]
        ids = scored[0].choices[0].token_ids
        tokenizer = llm.get_tokenizer()  # each token's text starts where the text of the tokens before it ends
        assert offsets[0] == offsets[1] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]

        prompt = np.random.default_rng(23).integers(3, VOCAB, 20).tolist()
        cached = [client.completions.create(model="m", prompt=prompt, max_tokens=2, extra_body={"cache_salt": salt})
                  for salt in ("s1", "s1", "s2")]
        metrics = llm.engine.stats()
        assert metrics.num_free_blocks == metrics.num_blocks
        outputs = [llm.generate({"prompt_token_ids": prompt, "cache_salt": salt}, GREEDY, use_tqdm=False)[0]
                   for salt in ("s1", "s2", "s3")]
        assert [out.num_cached_tokens for out in outputs] == [16, 16, 0]  # the server's requests cached both salts
        assert all(c.usage.prompt_tokens == 20 for c in cached)
        text = " ".join(f"t{i}" for i in range(9, 29))
        chat = [{"role": "user", "content": text}]
        client.chat.completions.create(model="m", messages=chat, max_tokens=2, extra_body={"cache_salt": "c1"})
        rendered = llm.get_tokenizer().encode(text, add_special_tokens=False)
        after = [llm.generate({"prompt_token_ids": rendered, **salt}, GREEDY, use_tqdm=False)[0].num_cached_tokens
                 for salt in ({}, {"cache_salt": "c1"})]
        assert after == [0, 16]
        with pytest.raises(openai.BadRequestError, match="cache_salt must be a non-empty string"):
            client.chat.completions.create(model="m", messages=chat, max_tokens=2, extra_body={"cache_salt": ""})

        for extra, message in (({"prompt_embeds": "not base64!"}, "is not base64"),
                               ({"prompt_embeds": encoded(first)[:40]}, "is not a torch.save'd tensor"),
                               ({"prompt_embeds": encoded(random_embeds(24, 3)[:, :10])},
                                "rows hold 10 values, the model's hidden_size is 64"),
                               ({"prompt_embeds": encoded(first), "echo": True}, "echo needs the prompt's tokens"),
                               ({"prompt_embeds": []}, "empty list")):
            with pytest.raises(openai.BadRequestError, match=message):
                client.completions.create(model="m", prompt=None, max_tokens=2, extra_body=extra)
        with pytest.raises(openai.BadRequestError, match="needs a prompt or prompt_embeds"):
            client.completions.create(model="m", prompt=None, max_tokens=2)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_an_engine_not_started_for_embeds_refuses_them(tmp_path):
    """Offline a ValueError, over HTTP a 400 before the embeddings are read."""
    openai = pytest.importorskip("openai")
    from server_thread import serving

    from jpaged.server.launch import create_app

    save_random_model(tmp_path, transformers.LlamaConfig(**COMMON), seed=3)
    llm = LLM(str(tmp_path), max_model_len=64, num_blocks=16)
    with pytest.raises(ValueError, match="enable_prompt_embeds=True"):
        llm.generate({"prompt_embeds": random_embeds(17, 4)}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="enable_prompt_embeds runs under runner 'generate'"):
        LLM(str(tmp_path), enable_prompt_embeds=True, runner="pooling")
    with serving(create_app(llm.engine, served_model_name="m")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="--enable-prompt-embeds"):
            client.completions.create(model="m", prompt=None, max_tokens=2, extra_body={"prompt_embeds": "garbage"})
