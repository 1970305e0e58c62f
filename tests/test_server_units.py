"""The server's parts without a model: the asyncio front end over a scripted engine (failures,
aborts, back-pressure), streamed text deltas, and the checks that turn bad input into 400s."""

import asyncio
from types import SimpleNamespace

import pytest

from jpaged.cli import _parser
from jpaged.engine_client import EngineStats
from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.sampling_params import SamplingParams
from jpaged.server.async_engine import AsyncEngine, EngineStepError, ServerOverloaded, ServerStopping
from jpaged.server.errors import APIError
from jpaged.server.params import resolve_max_tokens
from jpaged.server.prompts import chat_prompt, completion_prompts
from jpaged.server.protocol import ChatMessage


class ScriptedEngine:
    """An `EngineClient` stand-in: each request emits one "x" per step up to max_tokens. A prompt
    "bad" is refused; a step with a "boom" request running raises."""

    tokenizer, model_name, max_model_len, eos_token_ids = None, "scripted", 64, set()

    def __init__(self):
        self.requests: dict[str, list] = {}
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt, params=None):
        if prompt == "bad":
            raise ValueError("prompt is bad")
        self.requests[request_id] = [prompt, params or SamplingParams(), 0]

    def abort_request(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def get_num_unfinished_requests(self):
        return len(self.requests)

    def step(self):
        if any(prompt == "boom" for prompt, _, _ in self.requests.values()):
            raise RuntimeError("boom")
        outputs = []
        for request_id, state in list(self.requests.items()):
            state[2] += 1
            done = state[2] >= state[1].max_tokens
            outputs.append(RequestOutput(request_id, state[0], [1], [CompletionOutput(
                0, "x" * state[2], [7] * state[2], "length" if done else None)], done))
            if done:
                del self.requests[request_id]
        return outputs

    def stats(self):
        return EngineStats(0, len(self.requests), 0, 0.0, 0.0, 0, 0, 0, 0, 0)


def _run(coro_fn, engine=None, **kwargs):
    """Run `coro_fn(front)` against a started front end over `engine`, then stop it."""
    engine = engine or ScriptedEngine()
    front = AsyncEngine(engine, **kwargs)
    front.start()
    try:
        return asyncio.run(coro_fn(front)), engine, front
    finally:
        front.shutdown()


async def _finals(group):
    finals = {}
    async for index, output in group:
        if output.finished:
            finals[index] = output
    return finals


def test_outputs_stream_back_and_places_are_returned():
    async def go(front):
        group = await front.add("r", [("a", SamplingParams(max_tokens=3)), ("b", SamplingParams(max_tokens=5))])
        assert front.num_held_requests == 2
        finals = await _finals(group)
        return {i: o.outputs[0].text for i, o in finals.items()}, front.num_held_requests

    (texts, held), engine, _ = _run(go)
    assert texts == {0: "xxx", 1: "xxxxx"} and held == 0 and engine.aborted == []


def test_a_failing_step_fails_its_requests_and_the_loop_keeps_serving():
    async def go(front):
        doomed = await front.add("doomed", [("boom", SamplingParams(max_tokens=4))])
        with pytest.raises(EngineStepError):
            await _finals(doomed)
        fine = await front.add("fine", [("a", SamplingParams(max_tokens=2))])
        return (await _finals(fine))[0].outputs[0].text, await front.call(lambda e: e.get_num_unfinished_requests())

    (text, unfinished), engine, front = _run(go)
    assert text == "xx" and unfinished == 0 and engine.aborted == ["doomed-0"]


def test_a_refused_request_leaves_nothing_behind():
    async def go(front):
        with pytest.raises(ValueError, match="prompt 1: prompt is bad"):
            await front.add("r", [("a", SamplingParams(max_tokens=50)), ("bad", SamplingParams())])
        return front.num_held_requests, await front.call(lambda e: e.get_num_unfinished_requests())

    (held, unfinished), engine, _ = _run(go)
    assert held == 0 and unfinished == 0 and engine.aborted == ["r-0"]


def test_closing_a_group_aborts_what_has_not_finished():
    async def go(front):
        group = await front.add("r", [("a", SamplingParams(max_tokens=1000))])
        async for _, output in group:
            if len(output.outputs[0].text) >= 2:
                break
        group.close()
        return await front.call(lambda e: e.get_num_unfinished_requests())

    unfinished, engine, front = _run(go)
    assert unfinished == 0 and engine.aborted == ["r-0"] and front.num_held_requests == 0


def test_stopping_the_server_ends_open_requests_and_the_loop_serves_on():
    async def go(front):
        group = await front.add("r", [("a", SamplingParams(max_tokens=10**6))] * 2)
        async for _, output in group:
            if len(output.outputs[0].text) >= 2:
                front.stop_requests()
                break
        with pytest.raises(ServerStopping):
            await _finals(group)
        unfinished = await front.call(lambda e: e.get_num_unfinished_requests())
        return unfinished, front.num_held_requests

    (unfinished, held), engine, _ = _run(go)
    assert unfinished == 0 and held == 0 and sorted(engine.aborted) == ["r-0", "r-1"]


def test_serve_refuses_a_port_in_use_before_loading_the_model():
    import socket

    from jpaged.server.launch import check_can_listen

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_can_listen("127.0.0.1", port)
    check_can_listen("127.0.0.1", port)


def test_cors_preflight_answers_only_allowed_origins():
    from fastapi.testclient import TestClient

    from jpaged.server.launch import create_app

    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    for origins, allowed in ((None, None), (["http://app.example"], "http://app.example"), (["*"], "*")):
        client = TestClient(create_app(ScriptedEngine(), allowed_origins=origins))  # no lifespan: no engine loop
        response = client.options("/v1/completions", headers=preflight)
        assert response.headers.get("access-control-allow-origin") == allowed, origins


def test_over_the_queue_limit_is_refused_at_once():
    async def go(front):
        group = await front.add("r", [("a", SamplingParams(max_tokens=1000))] * 2)
        with pytest.raises(ServerOverloaded, match="limit of 2 requests"):
            await front.add("s", [("b", SamplingParams())])
        group.close()
        with pytest.raises(ValueError, match="3 prompts in one request exceed"):  # could never fit: not a 503
            await front.add("u", [("d", SamplingParams())] * 3)
        return len(await _finals(await front.add("t", [("c", SamplingParams(max_tokens=1))])))

    count, _, _ = _run(go, max_queued_requests=2)
    assert count == 1


def test_input_checks_are_400s_naming_the_field():
    with pytest.raises(APIError) as err:
        chat_prompt(SimpleNamespace(chat_template=None), [ChatMessage(role="user", content="hi")])
    assert err.value.status == 400 and "no chat template" in err.value.message
    with pytest.raises(APIError) as err:
        resolve_max_tokens(10, 60, 64, "max_tokens")
    assert err.value.param == "max_tokens" and err.value.code == "context_length_exceeded"
    assert resolve_max_tokens(None, 60, 64, "max_tokens") == 4
    with pytest.raises(APIError):
        completion_prompts([], SimpleNamespace(encode=lambda text: [1]))
    assert [p.token_ids for p in completion_prompts([[3, 4], [5]], None)] == [[3, 4], [5]]


def test_serve_command_defaults_to_loopback():
    args = _parser().parse_args(["serve", "--model", "m", "--api-key", "k"])
    assert (args.command, args.host, args.port, args.api_key, args.max_queued_requests) == ("serve", "127.0.0.1",
                                                                                            8000, "k", 256)


def test_engine_flags_reach_the_engine_settings_and_help_shows_defaults(capsys):
    from jpaged.cli import engine_kwargs
    from jpaged.llm import engine_config

    args = _parser().parse_args(["generate", "--no-enable-prefix-caching", "--preemption-mode", "swap",
                                 "--swap-space-gib", "0.5", "--cpu-kv-cache-gib", "0.25", "hi"])
    config = engine_config(None, **engine_kwargs(args))
    assert (config.cache.enable_prefix_caching, config.scheduler.preemption_mode, config.cache.swap_space_gib,
            config.cache.cpu_kv_cache_gib) == (False, "swap", 0.5, 0.25)
    for flag in ("--cpu-kv-cache-gib", "--swap-space-gib"):
        for value in ("nan", "inf", "-1"):
            name = flag[2:].replace("-", "_")
            with pytest.raises(ValueError, match=f"{name} must be a finite number >=? 0, got {value}"):
                engine_config(None, **engine_kwargs(_parser().parse_args(["generate", flag, value, "hi"])))
    with pytest.raises(SystemExit):
        _parser().parse_args(["generate", "--help"])
    shown = capsys.readouterr().out
    assert "(default: None)" not in shown and "tokens per KV cache block (default: 16)" in " ".join(shown.split())


def test_chat_stream_deltas_carry_only_their_fields():
    from jpaged.server.protocol import ChatStreamChoice, DeltaMessage

    first = ChatStreamChoice(index=0, delta=DeltaMessage(role="assistant", content="")).model_dump()
    later = ChatStreamChoice(index=0, delta=DeltaMessage(content="Hi")).model_dump()
    assert first["delta"] == {"role": "assistant", "content": ""} and later["delta"] == {"content": "Hi"}
    assert later["finish_reason"] is None and "logprobs" in later  # the choice's own fields stay


def test_an_unknown_flag_is_named_by_its_command(capsys):
    from jpaged.cli import main

    for command in ("generate", "serve"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--bogus"])
        assert exit_info.value.code == 2
        assert f"jpaged {command}: error: unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_mistyped_command_is_named_and_bad_json_is_explained(capsys):
    from jpaged.cli import main

    assert main(["serv", "--port", "1"]) == 2  # not taken as a prompt to generate from
    assert "unknown command 'serv'; did you mean 'serve'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--speculative-config", "{bad"])
    assert exit_info.value.code == 2 and "--speculative-config: not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "most tokens per answer (default: 128)" in capsys.readouterr().out


def test_token_bytes_join_back_into_split_characters(stories_path, model_path):
    """OpenAI's logprob `bytes`: tokens holding parts of a character (SentencePiece byte-fallback
    tokens, byte-level BPE pieces) carry those bytes, which join back into the text's UTF-8."""
    from transformers import AutoTokenizer

    from jpaged.detokenizer import token_bytes
    from jpaged.loader.source import open_model

    for tokenizer in (AutoTokenizer.from_pretrained(stories_path), open_model(str(model_path)).load_tokenizer()):
        text = "Tom saw 東京 and 👩🎉 here"
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens split a character
        joined = bytes(b for i in ids for b in token_bytes(tokenizer, i)).decode()
        assert joined.strip() == text
