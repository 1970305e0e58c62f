"""The OpenAI-compatible server end to end: one uvicorn server on stories260K (a temp copy whose
tokenizer has a chat template), driven by the official `openai` client and raw HTTP.

Oracles: `LLM.generate` / `LLM.chat` on the same model folder (greedy text must match), the
non-streamed response (streamed deltas must concatenate to it), and the engine's own stats
(after aborts, disconnects and bursts no KV block stays in use and nothing is left unfinished).
"""

import asyncio
import json
import random
import re
import shutil
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from server_thread import serving  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402
from jpaged.server.launch import create_app  # noqa: E402

API_KEY = "test-key"
QUEUE_LIMIT = 64
# Small step limits keep the set of step programs to compile small (7).
ENGINE_ARGS = dict(num_blocks=256, max_num_seqs=16, max_num_batched_tokens=64)
CHAT_TEMPLATE = ("{% if tools %}tools: {{ tools | map(attribute='function.name') | join(', ') }}\n{% endif %}"
                 "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["Once upon a time, there was a dog named", "Lily wanted to play", "The sun was", "Tom had a big"]
CHAT = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A dog named Max"}]
# vLLM's extra sampling fields, each sent alone
EXTRAS = [{"allowed_token_ids": list(range(300, 340))}, {"bad_words": [" Max", "named"]}, {"truncate_prompt_tokens": 4}]
# structured outputs, each sent alone in extra_body (and the same as a response_format where OpenAI has one)
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
STRUCTURED = [{"json": PERSON, "disable_any_whitespace": True}, {"regex": r"(Max|Lily) (ran|sat) [0-9]{1,2} times\."},
              {"choice": ["yes", "no", "a red ball"]}, {"grammar": 'start: "The " ("dog" | "cat") " was " /[a-z]{3,6}/'}]
TOOLS = [{"type": "function", "function": {
              "name": "get_weather", "description": "The weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                              "unit": {"type": "string", "enum": ["C", "F"]}},
                             "required": ["city", "unit"], "additionalProperties": False}}},
         {"type": "function", "function": {
              "name": "count_legs",
              "parameters": {"type": "object", "properties": {"animal": {"type": "string", "maxLength": 8},
                                                              "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
                             "required": ["animal", "legs"], "additionalProperties": False}}}]
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
# a request's own template, rendering tools and a variable from chat_template_kwargs; a reply in the
# Hermes tool-call syntax that the server's parser reads under tool_choice "auto"
HERMES_TEMPLATE = ("{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</tools>\n{% endif %}"
                   "{% for m in messages %}{{ m['role'] }} ({{ tone }}): {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant:{% endif %}")
HERMES_REPLY = (r'(Sure|Yes)\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
                r'"unit": "(C|F)"\}\}</tool_call>')
TEMPLATE_FIELDS = {"chat_template": HERMES_TEMPLATE, "chat_template_kwargs": {"tone": "brief"}}
_rng = random.Random(0)
# 64 streaming clients: (prompt, max_tokens, leaves mid-stream)
CONCURRENT_PLAN = [(PROMPTS[i % len(PROMPTS)], 8 + i % 9, _rng.random() < 0.3) for i in range(64)]


class Server:
    def __init__(self, app, url: str):
        self.app, self.url = app, url
        self.front = app.state.server.engine
        self.model = app.state.server.model_name

    def client(self, **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def post(self, path: str, body, headers=None, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(f"{self.url}{path}", content=content, headers={"Content-Type": "application/json",
                                                                         **headers}, timeout=60, **kwargs)

    def stats(self):
        return asyncio.run(self.front.call(lambda engine: engine.stats()))

    def wait_idle(self, timeout: float = 30.0):
        """Engine stats once nothing is unfinished and no KV block is in use (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            unfinished = asyncio.run(self.front.call(lambda engine: engine.get_num_unfinished_requests()))
            stats = self.stats()
            if (unfinished == 0 and stats.kv_cache_usage == 0 and self.front.num_held_requests == 0) \
                    or time.monotonic() > deadline:
                return unfinished, stats
            time.sleep(0.05)


@pytest.fixture(scope="module")
def model_folder(stories_path, tmp_path_factory):
    """stories260K with a chat template added to its tokenizer config."""
    folder = tmp_path_factory.mktemp("stories_chat") / "stories260K"
    shutil.copytree(stories_path, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return str(folder)


@pytest.fixture(scope="module")
def llm(model_folder):
    return LLM(model_folder, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def expected(llm):
    """`LLM.generate` / `LLM.chat` greedy texts, computed before the server takes over the engine."""
    pairs = sorted({(p, m) for p, m, _ in CONCURRENT_PLAN})
    return {
        "completions": _greedy(llm, PROMPTS, 16),
        "chat": llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text,
        "concurrent": dict(zip(pairs, _greedy(llm, [p for p, _ in pairs], [m for _, m in pairs]))),
        "prompt_logprobs": llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3),
                                        use_tqdm=False)[0].prompt_logprobs,
        "extras": [o.outputs[0].text for o in llm.generate(
            [PROMPTS[0]] * len(EXTRAS), [SamplingParams(temperature=0, max_tokens=12, **e) for e in EXTRAS],
            use_tqdm=False)],
        "structured": [o.outputs[0].text for o in llm.generate(
            [PROMPTS[0]] * len(STRUCTURED),
            [SamplingParams(temperature=0, max_tokens=40, structured_outputs=s) for s in STRUCTURED], use_tqdm=False)],
        "chat_json": llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=60, structured_outputs={"json": PERSON}),
                              use_tqdm=False)[0].outputs[0].text,
        "chat_with_tools": llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False,
                                    tools=TOOLS)[0].prompt_token_ids,
        "chat_json_object": llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=30,
                                                          structured_outputs={"json_object": True}),
                                     use_tqdm=False)[0].outputs[0].text,
        "hermes": llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=120, structured_outputs={"regex": HERMES_REPLY}),
                           use_tqdm=False, tools=TOOLS, **TEMPLATE_FIELDS)[0],
    }


@pytest.fixture(scope="module")
def server(llm, expected):
    """The server over `llm`'s engine (compiled programs are shared); `llm` is not used after."""
    app = create_app(llm.engine, served_model_name="stories", api_key=API_KEY, max_queued_requests=QUEUE_LIMIT,
                     trust_request_chat_template=True, tool_call_parser="hermes")
    with serving(app) as url:
        yield Server(app, url)


def _greedy(llm, prompts, max_tokens):
    """`LLM.generate`'s greedy texts; `max_tokens` is one count for all prompts or one per prompt."""
    counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in counts]
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


def test_models_health_and_api_key(server, model_folder):
    assert [(m.id, m.root) for m in server.client().models.list().data] == [("stories", str(model_folder))]
    assert server.client().models.retrieve("stories").id == "stories"
    with pytest.raises(openai.NotFoundError, match="the model `other/model` does not exist") as missing:
        server.client().models.retrieve("other/model")
    assert missing.value.code == "model_not_found"
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed outside /v1
    assert httpx.head(f"{server.url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_greedy_completions_match_llm_generate(server, expected):
    response = server.client().completions.create(model="stories", prompt=PROMPTS, max_tokens=16, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == expected["completions"]
    assert all(c.finish_reason == "length" for c in response.choices)
    prompt_tokens = sum(len(server.front.tokenizer.encode(p)) for p in PROMPTS)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 64)
    assert response.usage.total_tokens == prompt_tokens + 64


def test_streamed_deltas_concatenate_to_the_whole_text(server):
    client = server.client()
    args = dict(model="stories", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    with_stop = dict(args, stop=[". One"], max_tokens=40)
    whole = client.completions.create(**with_stop).choices[0]
    streamed = list(client.completions.create(**with_stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.text
    assert whole.finish_reason == streamed[-1].choices[0].finish_reason == "stop"


def test_chat_matches_llm_chat_streamed_or_not(server, expected):
    messages, expected = CHAT, expected["chat"]
    client = server.client()
    reply = client.chat.completions.create(model="stories", messages=messages, max_completion_tokens=16,
                                           temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(model="stories", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
    continued = client.chat.completions.create(
        model="stories", messages=[*messages, {"role": "assistant", "content": "Max was"}], max_tokens=4,
        temperature=0, extra_body={"add_generation_prompt": False, "continue_final_message": True})
    rendered = "system: Tell a story.\nuser: A dog named Max\nassistant: Max was"  # cut after the final message
    assert continued.usage.prompt_tokens == len(server.front.tokenizer.encode(rendered, add_special_tokens=False))
    body = dict(model="stories", messages=[*messages, {"role": "assistant", "content": "Max was"}], max_tokens=4,
                temperature=0, extra_body={"add_generation_prompt": False, "continue_final_message": True, "echo": True})
    echoed = client.chat.completions.create(**body).choices[0].message.content
    assert echoed == "Max was" + continued.choices[0].message.content  # vLLM's chat echo: the final message leads
    streamed = client.chat.completions.create(**body, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == echoed
    plain = client.chat.completions.create(**{**body, "messages": messages, "extra_body": {"echo": True}})
    assert plain.choices[0].message.content == expected[:len(plain.choices[0].message.content)]  # a user turn last


def test_n_samples_stop_and_logprobs(server):
    client = server.client()
    response = client.completions.create(model="stories", prompt="Once upon a time", n=3, max_tokens=8, seed=7,
                                         temperature=1.0, logprobs=2)
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    for choice in response.choices:
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
        assert all(lp <= 0 for lp in logprobs.token_logprobs)
        # the top 2 and the sampled token
        assert all(token in top and len(top) <= 3 for token, top in zip(logprobs.tokens, logprobs.top_logprobs))
    assert response.usage.completion_tokens == 24
    stopped = client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=["."])
    assert stopped.choices[0].finish_reason == "stop" and "." not in stopped.choices[0].text
    assert stopped.choices[0].model_extra["stop_reason"] == "."
    chat = client.chat.completions.create(model="stories", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)  # greedy takes the most likely
    streamed = list(client.completions.create(model="stories", prompt=PROMPTS[:2], n=2, max_tokens=6, seed=3,
                                              stream=True))
    finished = sorted(c.choices[0].index for c in streamed if c.choices[0].finish_reason == "length")
    assert finished == [0, 1, 2, 3]  # choice prompt_index * n + j, each finished once
    echoed = client.completions.create(model="stories", prompt=PROMPTS[1], max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPTS[1])


def aborted_count(server) -> float:
    """The server's jpaged:request_success_total{finished_reason="abort"} (0 before the first)."""
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("jpaged:request_success_total{") and 'finished_reason="abort"' in line:
            return float(line.split()[-1])
    return 0.0


def test_disconnects_abort_requests_and_free_blocks(server):
    before, aborted = server.stats().num_generated_tokens, aborted_count(server)
    body = {"model": "stories", "prompt": PROMPTS[0], "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, headers=headers) as r:
        events = r.iter_lines()
        assert next(e for e in events if e.startswith("data:"))  # it runs; then the client leaves
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=0.1)
    unfinished, stats = server.wait_idle()
    assert unfinished == 0 and stats.kv_cache_usage == 0 and server.front.num_held_requests == 0
    assert stats.num_generated_tokens - before < 2 * 480 - 100  # both were cut short
    assert aborted_count(server) == aborted + 2


def test_concurrent_streams_with_random_disconnects(server, expected):
    plan, expected = CONCURRENT_PLAN, expected["concurrent"]

    async def one(client: httpx.AsyncClient, prompt: str, max_tokens: int, leave: bool):
        body = {"model": "stories", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        text = ""
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    return text
                if line.startswith("data: "):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if leave and text:
                        return None  # leaves mid-stream: the connection is closed
        raise AssertionError("stream ended without [DONE]")

    async def run_all():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, *item) for item in plan))

    texts = asyncio.run(run_all())
    for (prompt, max_tokens, leave), text in zip(plan, texts):
        if not leave:
            assert text == expected[prompt, max_tokens]
    unfinished, stats = server.wait_idle()
    assert unfinished == 0 and stats.kv_cache_usage == 0
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_burst_over_the_queue_limit_is_refused_at_once(server):
    body = {"model": "stories", "prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=30, limits=httpx.Limits(max_connections=200)) as client:
            requests = [client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
                        for _ in range(QUEUE_LIMIT + 16)]
            responses = await asyncio.wait_for(asyncio.gather(*requests), timeout=30)
            refused = [await r.aread() for r in responses if r.status_code != 200]
            retry_after = {r.headers.get("retry-after") for r in responses if r.status_code != 200}
            statuses = sorted(r.status_code for r in responses)
            for r in responses:
                await r.aclose()
            return statuses, refused, retry_after

    statuses, refused, retry_after = asyncio.run(burst())
    assert statuses == [200] * QUEUE_LIMIT + [503] * 16
    assert retry_after == {"1"}
    error = json.loads(refused[0])["error"]
    assert error["code"] == "server_overloaded" and "--max-queued-requests" in error["message"]
    unfinished, stats = server.wait_idle()
    assert unfinished == 0 and stats.kv_cache_usage == 0


BAD_INPUTS = [
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 2, "temperature": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 600}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi " * 600}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", '{"prompt": "hi",', None),
    ("/v1/completions", {"prompt": "hi", "stream": True, "best_of": 2, "n": 1}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": [True, 2]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [99999]}, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/detokenize", {"tokens": [99999]}, "tokens"),
    ("/v1/completions", {"prompt": "hi", "allowed_token_ids": [99999]}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "hi", "allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "hi", "bad_words": [" "]}, "bad_words"),
    ("/v1/completions", {"prompt": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0, "echo": True, "min_tokens": 3}, "min_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "truncate_prompt_tokens": 10**6},
     "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_object"},
                         "structured_outputs": {"regex": "a"}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "response_format": {}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema",
                                                             "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                              "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]},
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                              "tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "hi", "guided_json": {"type": "object"}}, "guided_json"),  # vLLM's former field
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "guided_choice": ["a"]}, "guided_choice"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "a", "colour": "red"}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "(a"}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": "oops"}},
     "response_format"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"json": {"type": "string"}},
                         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                              "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                              "tool_choice": {"type": "function"}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                              "tool_choice": "required", "structured_outputs": {"json": {"type": "string"}}},
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "structured_outputs": {"json": {"$ref": "#/nowhere"}}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "\ud800 hi"}, "prompt"),  # lone surrogates, which JSON allows
    ("/v1/completions", {"prompt": ["hi", "\udfff"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "bad_words": ["\ud83d"]}, "bad_words"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]},
     "messages"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "bad_words": [f"w{i}" for i in range(1025)]}, "bad_words"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 1, "stop_token_ids": list(range(1100))}, "stop_token_ids"),
    ("/v1/completions", {"prompt": ["hi", "ho"], "priority": 2}, "priority"),  # a first-come-first-served server
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "priority": 1.5}, "priority"),
    ("/v1/completions", {"prompt": "hi", "n": 2**40, "temperature": 1.0}, "n"),  # more samples than the queue holds
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2**40, "temperature": 1.0}, "n"),
    # a JSON value of another type is refused, not coerced (as OpenAI's API refuses it)
    ("/v1/completions", {"prompt": "hi", "logprobs": False}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "n": True}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "seed": 1.0}, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": True,
                              "logprobs": True}, "top_logprobs"),
]


@pytest.mark.parametrize("path,body,param", BAD_INPUTS, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_gets_an_openai_shaped_400(server, path, body, param):
    response = server.post(path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and error["param"] == param


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "hi", "model": "gpt-4"}),
                                       ("/tokenize", {"prompt": "hi", "model": "nope"})])
def test_unknown_model_gets_a_404(server, path, body):
    response = server.post(path, body)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["param"] == "model" and error["code"] == "model_not_found" and body["model"] in error["message"]


def test_errors_name_the_request_field_not_the_engine_one(server):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for extra, param in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                         ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"max_tokens": 0}, "max_tokens")):
        error = server.post("/v1/chat/completions", {**chat, **extra}).json()["error"]
        assert error["param"] == param and error["message"].startswith(param + " "), error
    past_cap = server.post("/v1/completions", {"prompt": "hi", "logprobs": -1})
    assert past_cap.status_code == 400 and past_cap.json()["error"]["param"] == "logprobs"
    assert "more than max_logprobs 20" in past_cap.json()["error"]["message"]
    too_long = server.post("/v1/chat/completions", {**chat, "max_tokens": 10**6}).json()["error"]
    assert too_long["param"] == "max_tokens" and too_long["code"] == "context_length_exceeded"
    second = server.post("/v1/completions", {"prompt": ["Once", "a " * 600], "max_tokens": 5}).json()["error"]
    assert second["message"].startswith("prompt 1: ") and second["code"] == "context_length_exceeded", second
    request_wide = {"max_tokens": {"max_tokens": -3}, "stream_options": {"stream_options": {"include_usage": True}}}
    for param, extra in request_wide.items():  # a refusal of the request's own values names no prompt
        whole = server.post("/v1/completions", {"prompt": ["Once", "Twice"], **extra}).json()["error"]
        assert whole["param"] == param and whole["message"].startswith(param + " "), whole


def test_vllm_extras_match_llm_generate(server, expected):
    client = server.client()
    for extra, text in zip(EXTRAS, expected["extras"]):
        response = client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                             extra_body=extra)
        assert response.choices[0].text == text, extra
    tokenizer = server.front.tokenizer
    echoed = client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=12, temperature=0, echo=True,
                                       extra_body={"truncate_prompt_tokens": 4})
    kept = tokenizer.encode(PROMPTS[0])[-4:]
    assert echoed.choices[0].text == tokenizer.decode(kept) + expected["extras"][2]
    assert echoed.usage.prompt_tokens == 4
    chat = client.chat.completions.create(model="stories", messages=CHAT, max_tokens=4, temperature=0,
                                          extra_body={"truncate_prompt_tokens": 6})
    assert chat.usage.prompt_tokens == 6


def test_structured_outputs_match_llm_generate_and_parse(server, expected):
    client = server.client()
    for constraint, text in zip(STRUCTURED, expected["structured"]):
        response = client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                             extra_body={"structured_outputs": constraint})
        assert response.choices[0].text == text and response.choices[0].finish_reason == "stop", constraint
    person = json.loads(expected["structured"][0])
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and len(person["name"]) <= 12
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chat = client.chat.completions.create(model="stories", messages=CHAT, max_completion_tokens=60, temperature=0,
                                          response_format=schema_format)
    assert chat.choices[0].message.content == expected["chat_json"]
    streamed = client.chat.completions.create(model="stories", messages=CHAT, max_completion_tokens=60,
                                              temperature=0, response_format=schema_format, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected["chat_json"]
    any_object = client.chat.completions.create(model="stories", messages=CHAT, max_completion_tokens=30,
                                                temperature=0, response_format={"type": "json_object"})
    assert any_object.choices[0].message.content == expected["chat_json_object"]
    sampled = client.chat.completions.create(model="stories", messages=CHAT, max_completion_tokens=60, n=4, seed=3,
                                             temperature=1.0, extra_body={"structured_outputs": STRUCTURED[0]})
    finished = [json.loads(c.message.content) for c in sampled.choices if c.finish_reason == "stop"]
    assert len(finished) >= 2 and all(set(person) == {"name", "age"} for person in finished)
    assert server.wait_idle()[1].kv_cache_usage == 0


def test_structural_tag_response_format(server):
    """vLLM's `structural_tag` response format constrains the segments its triggers start, as the
    same tag sent in `structured_outputs` does."""
    tag = {"triggers": [" ball"], "structures": [{"begin": " ball ", "schema": {"type": "integer", "minimum": 0,
                                                                                "maximum": 99}, "end": " dogs"}]}
    client = server.client()
    texts = []
    for extra in ({"response_format": {"type": "structural_tag", **tag}},
                  {"structured_outputs": {"structural_tag": json.dumps({"type": "structural_tag", **tag})}}):
        chat = client.chat.completions.create(model="stories", messages=CHAT, max_completion_tokens=60, temperature=0,
                                              extra_body=extra)
        texts.append(chat.choices[0].message.content)
    assert texts[0] == texts[1] and re.search(r" ball (0|[1-9][0-9]?) dogs", texts[0]), texts[0]
    pieces = texts[0].split(" ball")[1:]
    for piece in pieces[:-1]:
        assert re.match(r" (0|[1-9][0-9]?) dogs", piece), texts[0]
    bad = server.post("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "structural_tag",
                                                                                       "structures": []}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format", bad.text
    assert bad.json()["error"]["message"].startswith("response_format structural_tag is not valid: 'triggers'"), bad.text


def test_openai_client_parses_a_pydantic_response_format(server):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=10)
        kind: Literal["dog", "cat", "bird"]
        legs: int = Field(ge=0, le=8)

    finished = 0
    for seed in range(8):
        try:
            completion = server.client().chat.completions.parse(
                model="stories", messages=CHAT, response_format=Pet, max_completion_tokens=100, temperature=1.0,
                seed=seed, extra_body={"structured_outputs": {"disable_any_whitespace": True}})
        except openai.LengthFinishReasonError:
            continue
        finished += 1
        assert isinstance(completion.choices[0].message.parsed, Pet), completion
        assert len(completion.choices[0].message.parsed.name) <= 10
    assert finished >= 2


def _check_calls(calls, names):
    """Each call names one of `names` and its arguments are JSON its tool's parameters accept."""
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_required_and_named_tool_choices_return_tool_calls(server):
    client = server.client()
    names = {tool["function"]["name"] for tool in TOOLS}
    # stories260K would list calls without end: a bias on "]" (token 509) closes the array where it may
    close = {"509": 100}
    required = client.chat.completions.create(model="stories", messages=CHAT, tools=TOOLS, tool_choice="required",
                                              max_completion_tokens=80, temperature=0, extra_body=COMPACT,
                                              logit_bias=close)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    _check_calls(choice.message.tool_calls, names)
    chunks = list(client.chat.completions.create(model="stories", messages=CHAT, tools=TOOLS, tool_choice="required",
                                                 max_completion_tokens=80, temperature=0, extra_body=COMPACT,
                                                 logit_bias=close, stream=True))
    streamed = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed] == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    single = client.chat.completions.create(model="stories", messages=CHAT, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_completion_tokens=60, temperature=0,
                                            extra_body=COMPACT).choices[0]  # no bias needed: one call ends the list
    assert single.finish_reason == "tool_calls" and len(single.message.tool_calls) == 1
    _check_calls(single.message.tool_calls, names)
    cut = client.chat.completions.create(model="stories", messages=CHAT, tools=TOOLS, tool_choice="required",
                                         max_completion_tokens=12, temperature=0, extra_body=COMPACT).choices[0]
    assert cut.finish_reason == "length" and cut.message.content.startswith('[{"name":"') and not cut.message.tool_calls
    named = client.chat.completions.create(model="stories", messages=CHAT, tools=TOOLS, n=3, seed=1,
                                           tool_choice={"type": "function", "function": {"name": "count_legs"}},
                                           max_completion_tokens=60, temperature=1.0, extra_body=COMPACT)
    finished = [c for c in named.choices if c.finish_reason == "stop"]
    assert len(finished) >= 2
    for choice in finished:
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, {"count_legs"})
    named = dict(model="stories", messages=CHAT, tools=TOOLS, max_completion_tokens=60, temperature=0,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=COMPACT)
    whole = client.chat.completions.create(**named).choices[0].message.tool_calls
    chunks = [c.choices[0].delta for c in client.chat.completions.create(**named, stream=True) if c.choices]
    calls = [call for delta in chunks for call in delta.tool_calls or []]
    assert calls[0].id and (calls[0].type, calls[0].function.name) == ("function", "get_weather")
    assert all(c.id is None and c.function.name is None for c in calls[1:]) and len(calls) > 1
    assert "".join(c.function.arguments for c in calls) == whole[0].function.arguments  # streamed as generated
    with client.chat.completions.stream(**named) as stream:
        accumulated = stream.get_final_completion().choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in accumulated] == [
        (c.function.name, c.function.arguments) for c in whole]
    assert server.wait_idle()[1].kv_cache_usage == 0


FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]  # the Responses API's shape


def test_responses_api_gives_the_chat_reply_as_output_items(server, expected):
    """OpenAI's Responses API over the chat path: the same text as chat completions, a response
    that OpenAI's own types accept as it stands, and a stream that the official client's
    accumulator (which checks every event's order and ids) turns into the same response."""
    import pydantic
    from openai.types.responses import Response, ResponseStreamEvent

    client = server.client()
    args = dict(model="stories", instructions=CHAT[0]["content"], input=CHAT[1]["content"], temperature=0)
    whole = client.responses.create(**args, max_output_tokens=16)
    assert whole.output_text == expected["chat"] and whole.usage.output_tokens == 16
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert [item.status for item in whole.output] == ["incomplete"] and whole.tool_choice == "auto"
    chat = client.chat.completions.create(model="stories", messages=CHAT, max_completion_tokens=16, temperature=0)
    assert whole.usage.input_tokens == chat.usage.prompt_tokens
    raw = server.post("/v1/responses", {**args, "max_output_tokens": 16}).json()
    Response.model_validate(raw, strict=False)
    assert [item["type"] for item in raw["output"]] == ["message"] and raw["id"].startswith("resp_")
    stopped = client.responses.create(**args, max_output_tokens=40, extra_body={"stop": ["."]})
    stopped_chat = client.chat.completions.create(model="stories", messages=CHAT, max_completion_tokens=40,
                                                  temperature=0, stop=["."]).choices[0]
    assert stopped_chat.finish_reason == "stop" and stopped.status == "completed"
    assert [item.status for item in stopped.output] == ["completed"]
    assert stopped.output_text == stopped_chat.message.content
    with client.responses.stream(**args, max_output_tokens=40, extra_body={"stop": ["."]}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == stopped.output_text and final.id == events[0].response.id
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == stopped.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [events[0].type, events[1].type, events[-1].type] == ["response.created", "response.in_progress",
                                                                 "response.completed"]
    body = {**args, "max_output_tokens": 40, "stop": ["."], "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        raw_events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    parsed = [pydantic.TypeAdapter(ResponseStreamEvent).validate_python(e) for e in raw_events]  # OpenAI's own types
    def shape(events):  # the events but the text deltas (how many depends on timing), and the text
        return ([e.type for e in events if e.type != "response.output_text.delta"],
                "".join(e.delta for e in events if e.type == "response.output_text.delta"))

    assert shape(parsed) == shape(events)
    long = {**args, "max_output_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=long, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert any(line.startswith("data:") and "output_text.delta" in line for line in r.iter_lines())  # then it leaves
    unfinished, stats = server.wait_idle()
    assert unfinished == 0 and stats.kv_cache_usage == 0


def test_responses_api_tool_calls_and_their_outputs_as_input_items(server):
    client = server.client()
    args = dict(model="stories", input=CHAT[1]["content"], tools=FLAT_TOOLS, tool_choice="required",
                max_output_tokens=80, temperature=0, extra_body={**COMPACT, "logit_bias": {"509": 100}})
    whole = client.responses.create(**args)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert calls and [item.type for item in whole.output] == ["function_call"] * len(calls)
    for call in calls:
        assert call.name in {tool["name"] for tool in FLAT_TOOLS} and isinstance(json.loads(call.arguments), dict)
    with client.responses.stream(**args) as stream:
        final = stream.get_final_response()
    assert [(c.name, c.arguments) for c in final.output] == [(c.name, c.arguments) for c in calls]
    turn = [{"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}]
    named = dict(args, tool_choice={"type": "function", "name": "count_legs"}, max_output_tokens=60)
    whole = client.responses.create(**named).output
    with client.responses.stream(**named) as stream:
        pieces = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response().output
    assert [(c.type, c.name) for c in whole] == [("function_call", "count_legs")]
    assert final[0].arguments == whole[0].arguments == "".join(pieces) and len(pieces) > 1  # as they are generated
    json.loads(whole[0].arguments)
    answered = client.responses.create(model="stories", input=turn, tools=FLAT_TOOLS, tool_choice="none",
                                       max_output_tokens=2, stream_options={"include_obfuscation": False})
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                      "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]
    chat = client.chat.completions.create(model="stories", messages=messages, tools=TOOLS, tool_choice="none",
                                          max_completion_tokens=2)
    assert answered.usage.input_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize("body,param", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": []}, "input"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "hi", "max_output_tokens": 10**6}, "max_output_tokens"),
    ({"input": "hi", "n": 2}, "n"),
    ({"input": "hi", "temperature": "hot"}, "temperature"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text"),  # no name
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": "hi", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}]}, "input"),
])
def test_responses_api_refusals_name_the_field(server, body, param):
    response = server.post("/v1/responses", {"model": "stories", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_pydantic_tools_with_nested_models_parse(server):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Place(BaseModel):
        city: Literal["Paris", "Rome"]
        country: Literal["France", "Italy"]

    class Forecast(BaseModel):
        """The weather at a place for some days."""

        place: Place  # a $ref into the tool's own $defs
        days: int = Field(ge=1, le=7)

    tools = [openai.pydantic_function_tool(Forecast), {**TOOLS[1], "function": {**TOOLS[1]["function"], "strict": True}}]
    assert "$defs" in tools[0]["function"]["parameters"]
    for choice in ("required", {"type": "function", "function": {"name": "Forecast"}}):
        completion = server.client().chat.completions.parse(
            model="stories", messages=CHAT, tools=tools, tool_choice=choice, max_completion_tokens=80, temperature=0,
            logit_bias={"509": 100}, extra_body=COMPACT)  # token 509, "]", closes the list of calls
        calls = completion.choices[0].message.tool_calls
        assert calls and all(call.function.name in ("Forecast", "count_legs") for call in calls), completion
        forecasts = [call.function.parsed_arguments for call in calls if call.function.name == "Forecast"]
        assert all(isinstance(forecast, Forecast) for forecast in forecasts)
        assert forecasts or choice == "required"


def test_tool_turns_reach_the_chat_template(server, expected):
    reply = server.client().chat.completions.create(model="stories", messages=CHAT, tools=TOOLS, tool_choice="none",
                                                    max_completion_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens == len(expected["chat_with_tools"])  # the prompt LLM.chat(tools=) renders
    assert server.front.tokenizer.decode(expected["chat_with_tools"]).startswith("tools: get_weather, count_legs")
    call = {"id": "call-1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "C"}'}}
    messages = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call-1", "content": "Sunny, 21 C"}]
    reply = server.client().chat.completions.create(model="stories", messages=messages, tools=TOOLS,
                                                    tool_choice="none", max_completion_tokens=4, temperature=0)
    tokenizer = server.front.tokenizer
    turns = [*CHAT, {"role": "assistant", "content": ""}, {"role": "tool", "content": "Sunny, 21 C"}]
    text = tokenizer.apply_chat_template(turns, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert text.startswith("tools: get_weather, count_legs\n")
    assert reply.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
    assert not reply.choices[0].message.tool_calls


@pytest.mark.parametrize("extra", [{"tool_choice": "auto"}, {"tool_choice": "required"},
                                   {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
                                   {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}])
def test_tool_choices_that_cannot_be_served_are_refused(server, extra):
    error = server.post("/v1/chat/completions", {"messages": CHAT, **extra}).json()["error"]
    assert error["param"] == "tool_choice" and error["type"] == "invalid_request_error", error


def test_auto_tool_choice_reads_hermes_calls_from_the_reply(server, expected):
    """Under tool_choice "auto" the server's Hermes parser finds the call in the reply that
    `LLM.chat` gives (the reply held to the syntax by a regex, as stories260K knows no tools)."""
    import re

    reply = expected["hermes"]
    text = reply.outputs[0].text
    assert re.fullmatch(HERMES_REPLY, text), text
    content, marked = text.split("<tool_call>")
    call = json.loads(marked.removesuffix("</tool_call>"))
    tokenizer = server.front.tokenizer
    rendered = tokenizer.apply_chat_template(CHAT, tools=TOOLS, add_generation_prompt=True, tokenize=False,
                                             chat_template=HERMES_TEMPLATE, tone="brief")  # HF's own rendering
    assert rendered.startswith("<tools>get_weather;count_legs;</tools>\nsystem (brief): ")
    assert reply.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    tokens = server.post("/tokenize", {"messages": CHAT, "tools": TOOLS, **TEMPLATE_FIELDS}).json()["tokens"]
    assert tokens == reply.prompt_token_ids
    client = server.client()
    body = dict(model="stories", messages=CHAT, tools=TOOLS, max_completion_tokens=120, temperature=0,
                extra_body={"structured_outputs": {"regex": HERMES_REPLY}, **TEMPLATE_FIELDS})
    whole = client.chat.completions.create(**body)
    choice = whole.choices[0]
    assert whole.usage.prompt_tokens == len(reply.prompt_token_ids)
    assert choice.finish_reason == "tool_calls" and choice.message.content == content
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert [(name, json.loads(arguments)) for name, arguments in calls] == [(call["name"], call["arguments"])]
    chunks = [chunk for chunk in client.chat.completions.create(**body, stream=True) if chunk.choices]
    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert "".join(delta.content or "" for delta in deltas) == content
    assert any(delta.content for delta in deltas[:-1])  # the content went out before the reply ended
    assert [(c.function.name, c.function.arguments) for d in deltas for c in d.tool_calls or []] == calls
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = client.chat.completions.create(**body, tool_choice="none").choices[0]
    assert plain.message.content == text and not plain.message.tool_calls and plain.finish_reason == "stop"


def test_echo_without_tokens_scores_the_prompt(server, expected):
    """vLLM's and OpenAI's legacy prompt scoring: echo, max_tokens 0, logprobs."""
    client = server.client()
    body = dict(model="stories", prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=3, temperature=0)
    whole = client.completions.create(**body)
    streamed = list(client.completions.create(**body, stream=True))
    tokens = server.front.tokenizer.encode(PROMPTS[1])
    choice = whole.choices[0]
    assert choice.text == PROMPTS[1] == "".join(c.choices[0].text for c in streamed)
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == len(tokens) and choice.logprobs.token_logprobs[0] is None
    want = expected["prompt_logprobs"]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [entry[token].logprob for entry, token in zip(want[1:], tokens[1:])], abs=1e-5)
    wider = client.completions.create(**{**body, "logprobs": 1}, extra_body={"prompt_logprobs": 3}).choices[0]
    assert wider.logprobs.token_logprobs == choice.logprobs.token_logprobs
    assert all(len(top) <= 2 for top in wider.logprobs.top_logprobs[1:])  # its own and the 1 asked for
    assert server.wait_idle()[1].kv_cache_usage == 0


def test_prompt_logprobs_field_as_vllm_reports_it(server, expected):
    want = expected["prompt_logprobs"]
    response = server.post("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 2, "prompt_logprobs": 3}).json()
    chat = server.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "prompt_logprobs": 1}).json()
    got = response["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(want)
    for entry, expected_entry in zip(got[1:], want[1:]):
        assert set(entry) == {str(t) for t in expected_entry}
        for token, logprob in expected_entry.items():
            assert entry[str(token)] == {"logprob": pytest.approx(logprob.logprob, abs=1e-5), "rank": logprob.rank,
                                         "decoded_token": logprob.decoded_token}
    assert chat["prompt_logprobs"][0] is None and all(len(e) in (1, 2) for e in chat["prompt_logprobs"][1:])
    streamed = server.post("/v1/completions", {"prompt": "hi", "prompt_logprobs": 1, "stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"


def test_continuous_usage_stats_count_each_choice_so_far(server):
    client = server.client()
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=10, n=2, seed=3,
                                            stream=True, stream_options=options))
    prompt_tokens = len(server.front.tokenizer.encode(PROMPTS[0]))
    counts = {0: [], 1: []}
    for chunk in chunks[:-1]:
        assert chunk.usage.prompt_tokens == prompt_tokens
        counts[chunk.choices[0].index].append(chunk.usage.completion_tokens)
    for index, seen in counts.items():
        assert seen == sorted(seen) and seen[-1] == 10, (index, seen)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    chat = list(client.chat.completions.create(model="stories", messages=CHAT, max_tokens=5, temperature=0,
                                               stream=True, stream_options=options))
    assert [c.usage.completion_tokens for c in chat[:-1]][-1] == 5 and chat[0].usage.completion_tokens == 0
    plain = list(client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain)


def test_empty_text_is_its_bos_token(server):
    tokenizer = server.front.tokenizer
    assert server.post("/tokenize", {"prompt": ""}).json()["tokens"] == tokenizer.encode("") == [tokenizer.bos_token_id]
    response = server.post("/v1/completions", {"prompt": "", "max_tokens": 3, "temperature": 0}).json()
    assert response["usage"]["prompt_tokens"] == 1 and response["usage"]["completion_tokens"] == 3


def test_null_fields_take_their_defaults(server, expected):
    """OpenAI's optional fields are nullable, and clients send None for "not given"."""
    client = server.client()
    nulls = dict(frequency_penalty=None, presence_penalty=None, n=None, stream=None, logprobs=None, seed=None,
                 stop=None, top_p=None, extra_body={"min_tokens": None, "ignore_eos": None,
                                                    "skip_special_tokens": None})
    response = client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                         echo=None, **nulls)
    assert response.choices[0].text == expected["completions"][0]
    chat = client.chat.completions.create(model="stories", messages=CHAT, max_tokens=16, temperature=0, **nulls)
    assert chat.choices[0].message.content == expected["chat"]


def test_streamed_completion_logprobs_equal_the_whole_response(server):
    """Concatenated over a stream, the logprobs (echoed prompt's included) and their `text_offset`s
    equal the non-streamed response's, also while text is held back for a stop string."""
    client = server.client()
    text = client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    held = text.split()[2] + " zq"  # the output runs into this stop string's start but never completes it
    for stop in (None, held):
        request = dict(model="stories", prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=2, echo=True,
                       stop=stop)
        whole = client.completions.create(**request).choices[0]
        chunks = [chunk.choices[0] for chunk in client.completions.create(**request, stream=True) if chunk.choices]
        streamed = {field: [x for c in chunks if c.logprobs for x in getattr(c.logprobs, field)]
                    for field in ("tokens", "text_offset", "token_logprobs", "top_logprobs")}
        assert "".join(c.text for c in chunks) == whole.text
        assert streamed["tokens"] == whole.logprobs.tokens and streamed["text_offset"] == whole.logprobs.text_offset
        assert streamed["token_logprobs"][0] is None and whole.logprobs.token_logprobs[0] is None  # the prompt's first
        assert streamed["token_logprobs"][1:] == pytest.approx(whole.logprobs.token_logprobs[1:])
        assert streamed["top_logprobs"][1:] == whole.logprobs.top_logprobs[1:]
    # offsets run on through the echoed prompt into the output, each token's text length on, also
    # where a character spans byte tokens (vLLM's counting: each such token's text is one U+FFFD),
    # which are named by their bytes (OpenAI's naming)
    request = dict(model="stories", prompt="Tom saw 東京 and", max_tokens=6, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**request).choices[0].logprobs
    lengths = [1 if token.startswith("bytes:") else len(token) for token in whole.tokens]
    byte_tokens = [token for token in whole.tokens if token.startswith("bytes:")]
    assert b"".join(bytes.fromhex(t[6:].replace("\\x", "")) for t in byte_tokens).decode() == "東京"
    assert whole.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]
    chunks = [chunk.choices[0] for chunk in client.completions.create(**request, stream=True) if chunk.choices]
    assert [x for c in chunks if c.logprobs for x in c.logprobs.text_offset] == whole.text_offset
    # the same where the echoed prompt ends in a byte token and the output is byte tokens (forced by
    # logit_bias on the bytes of "東"), with and without echo
    byte_ids = server.post("/tokenize", {"prompt": "東", "add_special_tokens": False}).json()["tokens"][-3:]
    for echo in (True, False):
        request = dict(model="stories", prompt="Tom saw 東京", max_tokens=5, temperature=0, logprobs=1, echo=echo,
                       logit_bias={str(token): 100 for token in byte_ids})
        whole = client.completions.create(**request).choices[0].logprobs
        assert sum(token.startswith("bytes:") for token in whole.tokens) >= (11 if echo else 5)
        lengths = [1 if token.startswith("bytes:") else len(token) for token in whole.tokens]
        assert whole.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]
        chunks = [chunk.choices[0] for chunk in client.completions.create(**request, stream=True) if chunk.choices]
        assert [x for c in chunks if c.logprobs for x in c.logprobs.text_offset] == whole.text_offset


def _decoded_after(tokenizer, prompt_ids: list[int], token_ids: list[int]) -> str:
    """The text `token_ids` add after `prompt_ids`, as the tokenizer decodes them (a first token's
    word-boundary space kept)."""
    return tokenizer.decode(prompt_ids + token_ids)[len(tokenizer.decode(prompt_ids)):]


def test_return_token_ids_and_tokens_as_ids(server):
    """vLLM's `return_token_ids`: the prompt's ids (the tokenizer's encoding; a stream: in its first
    chunk) and each choice's generated ids (their decoding is the text; a stream: each chunk's,
    concatenating to the whole); `return_tokens_as_token_ids` names logprob tokens `token_id:N`."""
    client, tokenizer = server.client(), server.front.engine.tokenizer
    extra = {"return_token_ids": True}
    prompt_ids = tokenizer.encode(PROMPTS[1])
    whole = client.completions.create(model="stories", prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                      logprobs=1, extra_body=extra)
    sampled = client.completions.create(model="stories", prompt=PROMPTS[1], max_tokens=10, temperature=1, seed=3,
                                        n=2, extra_body=extra)
    for choice in [*whole.choices, *sampled.choices]:
        assert choice.prompt_token_ids == prompt_ids and len(choice.token_ids) == 10
        assert _decoded_after(tokenizer, prompt_ids, choice.token_ids) == choice.text
    assert len(whole.choices[0].logprobs.tokens) == 10 and sampled.choices[0].token_ids != sampled.choices[1].token_ids
    chunks = [c.choices[0] for c in client.completions.create(model="stories", prompt=PROMPTS[1], max_tokens=10,
                                                              temperature=0, stream=True, extra_body=extra)]
    assert chunks[0].prompt_token_ids == prompt_ids and all(c.prompt_token_ids is None for c in chunks[1:])
    assert [t for c in chunks for t in c.token_ids] == whole.choices[0].token_ids

    chat = client.chat.completions.create(model="stories", messages=CHAT, max_tokens=10, temperature=0,
                                          extra_body=extra)
    rendered = server.post("/tokenize", {"messages": CHAT}).json()["tokens"]
    assert chat.prompt_token_ids == rendered
    assert _decoded_after(tokenizer, rendered, chat.choices[0].token_ids) == chat.choices[0].message.content
    stream = list(client.chat.completions.create(model="stories", messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, extra_body=extra))
    assert stream[0].prompt_token_ids == rendered and all(c.prompt_token_ids is None for c in stream[1:])
    assert [t for c in stream for t in (c.choices[0].token_ids or [])] == chat.choices[0].token_ids
    plain = client.completions.create(model="stories", prompt=PROMPTS[1], max_tokens=4, temperature=0)
    assert plain.choices[0].token_ids is None and plain.choices[0].prompt_token_ids is None

    as_ids = {"return_tokens_as_token_ids": True, **extra}
    named = client.completions.create(model="stories", prompt=PROMPTS[1], max_tokens=10, temperature=0, logprobs=2,
                                      echo=True, extra_body=as_ids).choices[0]
    ids = prompt_ids + named.token_ids
    assert named.logprobs.tokens == [f"token_id:{t}" for t in ids]
    assert all(re.fullmatch(r"token_id:\d+", key) for top in named.logprobs.top_logprobs[1:] for key in top)
    assert named.logprobs.token_logprobs[len(prompt_ids):] == pytest.approx(
        whole.choices[0].logprobs.token_logprobs, abs=1e-5)
    reply = client.chat.completions.create(model="stories", messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=2, extra_body=as_ids).choices[0]
    assert [t.token for t in reply.logprobs.content] == [f"token_id:{t}" for t in reply.token_ids]
    assert all(re.fullmatch(r"token_id:\d+", top.token) for t in reply.logprobs.content for top in t.top_logprobs)
    assert [bytes(t.bytes) for t in reply.logprobs.content] == [  # what each token stands for, as without
        bytes(t.bytes) for t in client.chat.completions.create(
            model="stories", messages=CHAT, max_tokens=6, temperature=0, logprobs=True).choices[0].logprobs.content]


def test_null_max_tokens_is_the_rest_of_the_context_and_refusals_say_where(server):
    """vLLM's reading of a completion's `max_tokens: null` (the default 16 would not fit here), and
    400s that point at the bad prompt, part or character."""
    prompt = [1] + [300] * 505  # 6 tokens left of 512
    body = {"prompt": prompt, "max_tokens": None, "ignore_eos": True, "temperature": 0}
    response = server.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 6
    assert server.post("/v1/completions", {**body, "max_tokens": 16}).json()["error"]["code"] == "context_length_exceeded"
    empty = server.post("/v1/completions", {"prompt": [[5], []]}).json()["error"]
    assert empty["message"].startswith("prompt 1: prompt is empty"), empty
    no_text = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]})
    assert no_text.json()["error"]["message"] == "messages[0].content[0] is a text part without its text"
    broken = server.post("/v1/chat/completions", '{"messages": [').json()["error"]
    assert broken["message"].startswith("the body is not valid JSON: ") and "at character 14" in broken["message"], broken


def test_ping_and_version(server):
    assert httpx.get(f"{server.url}/ping").status_code == 200 and httpx.post(f"{server.url}/ping").status_code == 200
    from importlib.metadata import version

    assert httpx.get(f"{server.url}/version").json() == {"version": version("jpaged")}


def test_server_keeps_serving_after_bad_input(server):
    response = server.client().completions.create(model="stories", prompt="Once", max_tokens=2)
    assert len(response.choices[0].text) > 0
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="stories", prompt="Once", max_tokens=2, temperature=-3)


def test_metrics_expose_engine_and_latency_metrics(server):
    server.client().completions.create(model="stories", prompt="Once", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("jpaged:num_requests_running", "jpaged:num_requests_waiting", "jpaged:kv_cache_usage_perc",
                 "jpaged:prefix_cache_hit_rate", "jpaged:time_to_first_token_seconds_bucket",
                 "jpaged:time_per_output_token_seconds_bucket", "jpaged:prompt_tokens_total",
                 "jpaged:generation_tokens_total", "jpaged:request_success_total"):
        assert f"\n{name}{{" in text, name


def test_reset_prefix_cache_makes_the_next_prompt_cold(server):
    """`POST /reset_prefix_cache` (vLLM's): a prompt sent again is mostly served from the prefix
    cache (few prompt tokens computed, by the `prompt_tokens` counter), and after the reset all of
    it is computed again."""
    prompt = list(range(5, 5 + 70))

    def computed_prompt_tokens() -> float:
        before = metric_value(server, "jpaged:prompt_tokens_total")
        server.client().completions.create(model="stories", prompt=prompt, max_tokens=1, temperature=0)
        return metric_value(server, "jpaged:prompt_tokens_total") - before

    assert computed_prompt_tokens() == len(prompt)
    assert computed_prompt_tokens() < len(prompt) // 2
    assert httpx.post(f"{server.url}/reset_prefix_cache").status_code == 401  # the API key guards it
    assert httpx.post(f"{server.url}/reset_prefix_cache", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert computed_prompt_tokens() == len(prompt)


def metric_value(server, name: str) -> float:
    """The value of the sample `name` (one label set) in the server's `/metrics`."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [sample for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
               for sample in family.samples if sample.name == name]
    assert len(samples) == 1, samples
    return samples[0].value


def test_tokenize_and_detokenize_round_trip(server):
    text = "Once upon a time, there was a dog named Max."
    tokens = server.post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert tokens["tokens"] == server.front.tokenizer.encode(text, add_special_tokens=False)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    assert server.post("/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"] == text
    chat = server.post("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == server.front.tokenizer.encode("user: Hi\nassistant:", add_special_tokens=False)
    named = {"messages": [{"role": "user", "content": "Hi", "name": "Ann"}],
             "chat_template": "{% for m in messages %}{{ m.name }}: {{ m.content }}{% endfor %}", "add_generation_prompt": False}
    assert server.post("/tokenize", named).json()["tokens"] == server.front.tokenizer.encode("Ann: Hi", add_special_tokens=False)
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]  # joined by newlines, as vLLM does
    chat = server.post("/tokenize", {"messages": [{"role": "user", "content": parts}]}).json()
    assert chat["tokens"] == server.front.tokenizer.encode("user: Hi\nthere\nassistant:", add_special_tokens=False)
    strings = server.post("/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert strings["token_strs"] == server.front.tokenizer.convert_ids_to_tokens(strings["tokens"])
    assert tokens["token_strs"] is None
