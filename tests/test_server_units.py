"""The server's parts without a model: the asyncio front end over a scripted engine (failures,
aborts, back-pressure), streamed text deltas, and the checks that turn bad input into 400s."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from jpaged.cli import _parser
from jpaged.engine_client import EngineStats
from jpaged.lora import LoRARequest
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

    tokenizer, model_name, max_model_len, eos_token_ids, default_sampling_params = None, "scripted", 64, set(), {}
    reasoning_parser, runner_type, pooling_task, classifier = None, "generate", None, None

    def __init__(self):
        self.requests: dict[str, list] = {}
        self.aborted: list[str] = []
        self.priorities: dict[str, int] = {}
        self.loras: dict[str, object] = {}

    def add_request(self, request_id, prompt, params=None, priority=0, lora_request=None):
        if prompt == "bad":
            raise ValueError("prompt is bad")
        self.requests[request_id] = [prompt, params or SamplingParams(), 0]
        self.priorities[request_id] = priority
        self.loras[request_id] = lora_request

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
    assert engine.priorities == {"r-0": 0, "r-1": 0}


def test_a_request_priority_and_adapter_reach_each_of_its_engine_requests():
    adapter = LoRARequest("sql", 3, "/adapters/sql")

    async def go(front):
        group = await front.add("r", [("a", SamplingParams(max_tokens=1)), ("b", SamplingParams(max_tokens=1))],
                                priority=-4, lora_request=adapter)
        return await _finals(group)

    _, engine, _ = _run(go)
    assert engine.priorities == {"r-0": -4, "r-1": -4}
    assert engine.loras == {"r-0": adapter, "r-1": adapter}


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
        # Far more tokens than the loop thread can step through while this coroutine waits for
        # the CPU, so that the request is still running when the group closes.
        group = await front.add("r", [("a", SamplingParams(max_tokens=10**6))])
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


def test_serve_refuses_a_port_out_of_range_and_generate_takes_prompts_around_options(capsys, monkeypatch):
    import jpaged.cli as cli

    assert cli.main(["serve", "--model", "m", "--port", "99999"]) == 2  # before loading the model
    assert "--port must be in [0, 65535], got 99999" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(cli, "generate", lambda args: seen.append((args.prompts, args.max_tokens)) or 0)
    assert cli.main(["generate", "A", "--max-tokens", "8", "B", "C"]) == 0
    assert seen == [(["A", "B", "C"], 8)]


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
        group = await front.add("r", [("a", SamplingParams(max_tokens=10**6))] * 2)
        with pytest.raises(ServerOverloaded, match="limit of 2 sequences"):
            await front.add("s", [("b", SamplingParams())])
        group.close()
        with pytest.raises(ValueError, match="3 prompts in one request exceed"):  # could never fit: not a 503
            await front.add("u", [("d", SamplingParams())] * 3)
        # each sample is a sequence: n counts against the limit (a huge n is refused, not forked)
        with pytest.raises(ValueError, match=r"1099511627776 samples \(n / best_of\) in one request exceed") as err:
            await front.add("v", [("d", SamplingParams(n=2**40, temperature=1.0))])
        assert err.value.param == "n"
        one = await front.add("w", [("e", SamplingParams(n=2, temperature=1.0, max_tokens=10**6))])
        with pytest.raises(ServerOverloaded):
            await front.add("x", [("f", SamplingParams(max_tokens=1))])
        one.close()
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


def test_unset_sampling_fields_take_the_model_defaults_and_max_new_tokens_caps_the_output():
    from jpaged.server.params import chat_params, completion_params
    from jpaged.server.protocol import ChatCompletionRequest, CompletionRequest

    defaults = {"temperature": 0.6, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 7}
    chat = ChatCompletionRequest(messages=[], top_k=-1, min_p=0.1)
    params = chat_params(chat, 5, None, defaults)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (
        0.6, 0.8, 0, 0.1, 1.05)  # top_k -1 (sent) is "off", as vLLM normalises it
    plain = completion_params(CompletionRequest(prompt="hi", temperature=0, top_p=None), 5)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (0.0, 1.0, 0, 1.0)
    assert resolve_max_tokens(None, 10, 64, "max_tokens", limit=7) == 7
    assert resolve_max_tokens(20, 10, 64, "max_tokens", limit=7) == 7
    assert resolve_max_tokens(5, 10, 64, "max_tokens", limit=7) == 5
    assert resolve_max_tokens(None, 60, 64, "max_tokens", limit=7) == 4


def test_serve_command_defaults_to_loopback():
    args = _parser().parse_args(["serve", "--model", "m", "--api-key", "k"])
    assert (args.command, args.host, args.port, args.api_key, args.max_queued_requests) == ("serve", "127.0.0.1",
                                                                                            8000, "k", 256)


def test_engine_flags_reach_the_engine_settings_and_help_shows_defaults(capsys):
    from jpaged.cli import engine_kwargs
    from jpaged.llm import engine_config

    args = _parser().parse_args(["generate", "--no-enable-prefix-caching", "--preemption-mode", "swap",
                                 "--swap-space-gib", "0.5", "--cpu-kv-cache-gib", "0.25",
                                 "--scheduling-policy", "priority", "--no-compilation-cache", "hi"])
    config = engine_config(None, **engine_kwargs(args))
    assert (config.cache.enable_prefix_caching, config.scheduler.preemption_mode, config.cache.swap_space_gib,
            config.cache.cpu_kv_cache_gib, config.scheduler.scheduling_policy) == (False, "swap", 0.5, 0.25, "priority")
    assert not config.compilation_cache
    args = _parser().parse_args(["serve", "--gpu-memory-utilization", "0.5", "--attention-backend", "reference",
                                 "--pipeline-parallel-size", "2", "--prefill-micro-batches", "3",
                                 "--decode-micro-batches", "2"])
    config = engine_config(None, **engine_kwargs(args))
    assert (config.cache.gpu_memory_utilization, config.attention_backend, config.parallel.prefill_micro_batches,
            config.parallel.decode_micro_batches) == (0.5, "reference", 3, 2)
    assert engine_config(None, **engine_kwargs(_parser().parse_args(["serve"]))).parallel.prefill_micro_batches == 2 * 1
    assert engine_config(None, **engine_kwargs(_parser().parse_args(["generate", "hi"]))).compilation_cache
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
    assert "unset: the model's generation config's max_new_tokens, else 128" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exit_info:  # the model as `vllm serve` takes it, or --model, not both
        main(["serve", "org/one", "--model", "org/two"])
    assert exit_info.value.code == 2 and "the model is given twice: 'org/one' and --model 'org/two'" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "the model, as --model" in capsys.readouterr().out


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


def _random_calls(rng, count):
    """`count` calls with random names and nested, partly non-ASCII arguments."""
    def value(depth):
        kind = rng.choice(["str", "int", "list", "dict"] if depth < 2 else ["str", "int"])
        if kind == "str":
            return "".join(rng.choice("abcé☃ \"\\{}<>") for _ in range(rng.randint(0, 8)))
        if kind == "int":
            return rng.randint(-1000, 1000)
        if kind == "list":
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {f"k{i}": value(depth + 1) for i in range(rng.randint(0, 3))}

    return [(f"fn_{rng.randint(0, 99)}", {f"a{i}": value(0) for i in range(rng.randint(0, 4))}) for _ in range(count)]


def _streamed(parser, text):
    """The content a stream sends while `text` grows one character at a time, then at its end."""
    sent = ""
    for end in range(len(text) + 1):
        visible = text[:end][:parser.held_from(text[:end])]
        assert visible.startswith(sent), (visible, sent)  # what was sent is never taken back
        sent = max(sent, visible, key=len)
    content, calls = parser.parse(text)
    return sent, (content or "") if calls else text


def test_tool_parsers_read_their_family_syntax():
    import json
    import random

    from jpaged.server.tool_parsers import tool_parser

    rng = random.Random(0)
    hermes, llama3, pythonic = tool_parser("hermes"), tool_parser("llama3_json"), tool_parser("pythonic")
    mistral, granite, phi4 = tool_parser("mistral"), tool_parser("granite"), tool_parser("phi4_mini_json")
    for trial in range(40):
        calls = _random_calls(rng, rng.randint(1, 3))
        expected = [(name, args) for name, args in calls]
        content = rng.choice(["", "Let me check. ", "<b>x</b> <tool"])
        text = content + "".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>\n"
                                 for n, a in calls)
        if trial % 4 == 0:
            text = text.removesuffix("</tool_call>\n")  # a last call left open at the end
        found, parsed = hermes.parse(text)
        assert found == (content or None) and [(c.name, json.loads(c.arguments)) for c in parsed] == expected
        sent, final = _streamed(hermes, text)
        assert final == content and sent == content[:len(sent)] and "<tool_call>" not in sent
        text = rng.choice(["", "<|python_tag|>", " "]) + "; ".join(
            json.dumps({"name": n, "parameters": a}, ensure_ascii=trial % 2 == 0) for n, a in calls)
        found, parsed = llama3.parse(text)
        assert found is None and [(c.name, json.loads(c.arguments)) for c in parsed] == expected
        assert _streamed(llama3, text)[0] == ""
        text = "[" + ", ".join(f"{n}({', '.join(f'{k}={v!r}' for k, v in a.items())})" for n, a in calls) + "]"
        text = rng.choice(["", " ", "<|python_start|>"]) + text + rng.choice(["", "\n", "<|python_end|>"])
        found, parsed = pythonic.parse(text)  # Python's own literal syntax (repr) read back
        assert found is None and [(c.name, json.loads(c.arguments)) for c in parsed] == expected
        assert _streamed(pythonic, text)[0] == ""
        listed = "[TOOL_CALLS] " + json.dumps([{"name": n, "arguments": a} for n, a in calls])
        named = "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a, ensure_ascii=False)}" for n, a in calls)
        array = json.dumps([{"name": n, "arguments": a} for n, a in calls], ensure_ascii=trial % 2 == 0)
        text = rng.choice(["", " ", "\n"]) + rng.choice(["<|tool_call|>", "<tool_call>", ""]) + array + rng.choice(["", "\n"])
        found, parsed = granite.parse(text)
        assert found is None and [(c.name, json.loads(c.arguments)) for c in parsed] == expected
        assert _streamed(granite, text)[0] == ""
        text = content + "functools" + array + rng.choice(["", "\nDone."])
        found, parsed = phi4.parse(text)
        assert found == (content or None) and [(c.name, json.loads(c.arguments)) for c in parsed] == expected
        sent, final = _streamed(phi4, text)
        assert final == content and sent == content[:len(sent)] and "functools" not in sent
        for text in (content + listed, content + named):  # the older tokenizers' syntax, then v11's
            found, parsed = mistral.parse(text)
            assert found == (content or None) and [(c.name, json.loads(c.arguments)) for c in parsed] == expected
            sent, final = _streamed(mistral, text)
            assert final == content and sent == content[:len(sent)] and "[TOOL_CALLS]" not in sent
    for text in ["Hello there.", "<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                 'Sure <tool_call>["a"]</tool_call>', '<tool_call>{"name": "", "arguments": {}}</tool_call>',
                 '<tool_call>{"name": "f", "arguments": null}</tool_call>', '<tool_call>{"name": "f"} x</tool_call>',
                 '<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>']:
        assert hermes.parse(text) == (text, []) and _streamed(hermes, text)[1] == text
    closing = '<tool_call>{"name": "f", "parameters": {"s": "</tool_call>"}}</tool_call> and after'
    assert [(c.name, json.loads(c.arguments)) for c in hermes.parse("Hi " + closing)[1]] == [("f", {"s": "</tool_call>"})]
    assert hermes.parse("Hi " + closing)[0] == "Hi "
    for text in ["Hello {", '{"name": "f", "parameters": {}} and more', '{"name": 3}', "{"]:
        assert llama3.parse(text) == (text, [])
    assert _streamed(llama3, "Hello there.")[0] == "Hello there."
    for text in ["[f(1)]", "[f(x=y)]", "[f(x={1, 2})]", "[]", "[a.b(x=1)]", "[f(**k)]", "[f(x=float('nan'))]",
                 "[f(x=1e999)]", "[f(x=b'a')]", "[f(x=1)] and more", "[f(x=1)", "[f(x=1), 2]", "[f(x=1, x=2)]"]:
        assert pythonic.parse(text) == (text, []) and _streamed(pythonic, text)[1] == text
    assert _streamed(pythonic, "Hello [f(x=1)]") == ("Hello [f(x=1)]", "Hello [f(x=1)]")
    between = '<tool_call>{"name": "a", "arguments": {}}</tool_call>\nand now\n<tool_call>{"name": "b", "arguments": {}}'
    assert [c.name for c in hermes.parse("Hi " + between)[1]] == ["a", "b"]  # every marked call, as vLLM finds them
    listed = '[TOOL_CALLS][{"name": "a", "arguments": {"city": "Paris"}}]\n\nLet me look that up.'
    assert [(c.name, c.arguments) for c in mistral.parse(listed)[1]] == [("a", '{"city": "Paris"}')]
    marker_inside = '[TOOL_CALLS]a[ARGS]{"s": "has [TOOL_CALLS] inside"}[TOOL_CALLS]b{"t": 1}'
    assert [(c.name, json.loads(c.arguments)) for c in mistral.parse(marker_inside)[1]] == \
        [("a", {"s": "has [TOOL_CALLS] inside"}), ("b", {"t": 1})]
    spaced = '<tool_call>{"name": "a", "arguments": "{\\"x\\":   1}"}</tool_call>'
    assert hermes.parse(spaced)[1][0].arguments == '{"x": 1}'  # written again by json.dumps
    for parser, text in [(hermes, '<tool_call>{"name": "a", "arguments": {"x": ' + "1" * 5000 + "}}</tool_call>"),
                         (hermes, '<tool_call>{"name": "a", "arguments": {"x": ' + "[" * 100000 + "]" * 100000 + "}}"),
                         (hermes, '<tool_call>{"name": "a", "arguments": {"x": NaN}}</tool_call>'),
                         (mistral, "[TOOL_CALLS]" + "[" * 100000), (mistral, '[TOOL_CALLS]a[ARGS]{"x": Infinity}'),
                         (llama3, '{"name": "a", "parameters": {"x": ' + "1" * 5000 + "}}"),
                         (pythonic, "[f(a=1" + "+1" * 3000 + ")]"), (pythonic, "[f(a=" + "-" * 6000 + "1)]")]:
        assert parser.parse(text) == (text, [])  # too deep, too long or not JSON: plain content, never an error
    for text in ["[TOOL_CALLS]", "[TOOL_CALLS] []", "[TOOL_CALLS]f[ARGS]{bad}", "[TOOL_CALLS]f g[ARGS]{}",
                 '[TOOL_CALLS]f[ARGS]{"a": 1} and more', '[TOOL_CALLS]f[ARGS][1]', '[TOOL_CALLS] [{"arguments": {}}]',
                 '[TOOL_CALLS][ARGS]{}', "Hello [TOOL", '[TOOL_CALLS]f[CALL_ID]x{"a": 1}']:
        assert mistral.parse(text) == (text, []) and _streamed(mistral, text)[1] == text
    assert [(c.name, c.arguments) for c in mistral.parse('[TOOL_CALLS]f{"a": [1]}[TOOL_CALLS]g[CALL_ID]x1[ARGS]{}')[1]] \
        == [("f", '{"a": [1]}'), ("g", "{}")]
    for text in ["Hello [1]", "<|tool_call|>", "<|tool_call|>[]", '<|tool_call|>[{"name": "f", "arguments": {}}] more',
                 '<|tool_call|>{"name": "f", "arguments": {}}', '<|tool_call|>[{"name": "f", "arguments": [1]}]',
                 'Sure <|tool_call|>[{"name": "f", "arguments": {}}]']:
        assert granite.parse(text) == (text, []) and _streamed(granite, text)[1] == text
    for text in ["functools", "functools[]", 'functools{"name": "f"}', 'functools[{"name": "f", "arguments": 1}]',
                 "Hello funct"]:
        assert phi4.parse(text) == (text, []) and _streamed(phi4, text)[1] == text
    assert granite.parse("<|tool_call|>" + "[" * 100000) == ("<|tool_call|>" + "[" * 100000, [])  # too deep: content
    assert phi4.parse("functools" + "[" * 100000) == ("functools" + "[" * 100000, [])
    nested = 'functools[{"name": "f", "arguments": {"xs": [1, [2]]}}, {"name": "g", "parameters": {}}]'
    assert [(c.name, c.arguments) for c in phi4.parse(nested)[1]] == [("f", '{"xs": [1, [2]]}'), ("g", "{}")]
    with pytest.raises(ValueError, match="unknown tool-call parser 'qwen'; known: hermes, llama3_json, mistral, "
                                         "pythonic, granite, phi4_mini_json"):
        tool_parser("qwen")


def test_mistral_replies_keep_their_special_markers_and_get_mistral_call_ids():
    """[TOOL_CALLS] is a special token: under "auto" with the mistral parser the reply's text keeps
    special tokens (vLLM does the same), and its calls get ids of 9 letters and digits."""
    from jpaged.server.params import chat_params
    from jpaged.server.protocol import ChatCompletionRequest
    from jpaged.server.tool_parsers import tool_parser
    from jpaged.server.tools import reply

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    mistral, hermes = tool_parser("mistral"), tool_parser("hermes")
    auto = ChatCompletionRequest(messages=[], tools=[tool])
    assert chat_params(auto, 16, mistral).skip_special_tokens is False
    assert chat_params(auto, 16, hermes).skip_special_tokens is True
    assert chat_params(auto.model_copy(update={"tool_choice": "none"}), 16, mistral).skip_special_tokens is True
    content, calls = reply(auto, 'Ok[TOOL_CALLS]f[ARGS]{"x": 1}', mistral)
    assert content == "Ok" and [(c.function.name, c.function.arguments) for c in calls] == [("f", '{"x": 1}')]
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()
    required = auto.model_copy(update={"tool_choice": "required"})  # forced calls too: ids Mistral's templates take
    forced = reply(required, '[{"name": "f", "parameters": {"x": 2}}]', mistral)[1]
    assert [(c.function.name, c.function.arguments) for c in forced] == [("f", '{"x": 2}')]
    assert len(forced[0].id) == 9 and forced[0].id.isalnum() and forced[0].id != calls[0].id
    assert reply(auto, '<tool_call>{"name": "f", "arguments": {}}</tool_call>', hermes)[1][0].id.startswith("chatcmpl-tool-")


def test_auto_tool_choice_and_request_templates_need_the_server_to_allow_them():
    from jpaged.chat_template import checked_variables, read_chat_template
    from jpaged.server.launch import serve
    from jpaged.server.prompts import ChatTemplate
    from jpaged.server.protocol import ChatCompletionRequest
    from jpaged.server.tool_parsers import tool_parser
    from jpaged.server.tools import tool_schema

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for choice in (None, "auto"):
        request = ChatCompletionRequest(messages=[], tools=[tool], tool_choice=choice)
        with pytest.raises(APIError) as err:
            tool_schema(request, None)
        assert err.value.param == "tool_choice" and "--enable-auto-tool-choice --tool-call-parser" in err.value.message
        assert tool_schema(request, tool_parser("hermes")) is None
    with pytest.raises(APIError) as err:
        tool_schema(ChatCompletionRequest(messages=[], tool_choice="auto"), tool_parser("hermes"))
    assert err.value.param == "tool_choice"
    with pytest.raises(APIError) as err:
        ChatTemplate.of_request("{{ 1 }}", None, None, trusted=False)
    assert err.value.param == "chat_template" and "--trust-request-chat-template" in err.value.message
    with pytest.raises(APIError) as err:
        ChatTemplate.of_request(None, {"tools": [], "tokenize": True, "enable_thinking": False}, None, trusted=True)
    assert err.value.param == "chat_template_kwargs" and "tokenize, tools" in err.value.message
    with pytest.raises(ValueError, match="may not set messages"):
        checked_variables({"messages": []})
    for bad in ("{% if %}", "  "):  # a request's own template that does not parse, or is empty
        with pytest.raises(APIError) as err:
            ChatTemplate.of_request(bad, None, None, trusted=True)
        assert err.value.param == "chat_template", err.value.message
    assert ChatTemplate.of_request(None, {"x": 1}, "server", trusted=False) == ChatTemplate("server", {"x": 1})
    assert ChatTemplate.of_request("mine", None, "server", trusted=True).template == "mine"
    for flags in (["--enable-auto-tool-choice"], ["--tool-call-parser", "hermes"]):
        with pytest.raises(ValueError, match="go together"):
            serve(_parser().parse_args(["serve", *flags]))
    with pytest.raises(ValueError, match="--reasoning-parser shape generated replies; --runner pooling serves"):
        serve(_parser().parse_args(["serve", "--runner", "pooling", "--reasoning-parser", "qwen3"]))
    with pytest.raises(ValueError, match="--enable-auto-tool-choice, --tool-call-parser shape generated replies"):
        serve(_parser().parse_args(["serve", "--runner", "pooling", "--enable-auto-tool-choice",
                                    "--tool-call-parser", "hermes"]))
    with pytest.raises(ValueError, match="'no-such-file.jinja' is neither a readable file nor a Jinja template"):
        read_chat_template("no-such-file.jinja")
    long_template = "{% for m in messages %}" + "{{ m['content'] }} " * 40 + "{% endfor %}"  # longer than a file name
    assert read_chat_template(long_template) == long_template
    with pytest.raises(ValueError, match="does not parse"):
        read_chat_template("{% if %}")


def test_whole_vocabulary_logprobs_keep_every_entry(stories_path):
    """-1 (the whole vocabulary, under --max-logprobs -1) keeps every entry the engine computed, in
    the chat shape and in an echoed completion's; a count keeps that many."""
    import numpy as np
    from transformers import AutoTokenizer

    from jpaged.detokenizer import token_bytes, token_text
    from jpaged.outputs import Logprob
    from jpaged.server.logprobs import chat_logprobs, completion_logprobs

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    vocab, rng = len(tokenizer), np.random.default_rng(0)
    token_ids, entries = [], []
    for _ in range(3):
        values = np.log(rng.dirichlet(np.ones(vocab)))
        order = np.argsort(-values)
        token_ids.append(int(order[4]))
        entries.append({int(t): Logprob(float(values[t]), rank, token_text(tokenizer, int(t)))
                        for rank, t in enumerate(order, 1)})
    chat = chat_logprobs(tokenizer, token_ids, entries, -1).content
    assert [len(c.top_logprobs) for c in chat] == [vocab] * 3
    assert [len(c.top_logprobs) for c in chat_logprobs(tokenizer, token_ids, entries, 3).content] == [3] * 3
    def names(entry, keep):  # keyed by text, a part of a character by its bytes: equal names join
        return len({lp.decoded_token if "\ufffd" not in lp.decoded_token else token_bytes(tokenizer, t)
                    for t, lp in entry.items() if keep(t, lp)})

    whole = completion_logprobs(tokenizer, token_ids, entries, top=-1).top_logprobs
    assert [len(top) for top in whole] == [names(entry, lambda t, lp: True) for entry in entries]
    three = [names(entry, lambda t, lp: lp.rank <= 3 or t == token) for token, entry in zip(token_ids, entries)]
    assert [len(top) for top in completion_logprobs(tokenizer, token_ids, entries, top=3).top_logprobs] == three


def test_completion_logprobs_name_each_part_of_a_character_by_its_bytes(stories_path, model_path):
    """OpenAI's legacy shape names a token holding part of a character `bytes:\\xNN...`, so that
    each keeps its own `top_logprobs` key; every token's key holds its own logprob, and the named
    bytes of a character's tokens join back into its UTF-8."""
    import numpy as np
    from transformers import AutoTokenizer

    from jpaged.detokenizer import token_text
    from jpaged.loader.source import open_model
    from jpaged.outputs import Logprob
    from jpaged.server.logprobs import completion_logprobs

    rng = np.random.default_rng(1)
    for tokenizer in (AutoTokenizer.from_pretrained(stories_path), open_model(str(model_path)).load_tokenizer()):
        text = "Tom saw 東京 and 👩🎉"
        ids = tokenizer.encode(text, add_special_tokens=False)
        partial = [i for i in ids if "\ufffd" in token_text(tokenizer, i)]
        assert len(partial) >= 4
        entries = []
        for token in ids:  # the token first, then others, some of them also parts of characters
            others = [t for t in rng.choice(partial + list(range(100)), 8) if t != token]
            values = np.sort(np.log(rng.dirichlet(np.ones(len(others) + 1))))[::-1]
            entries.append({int(t): Logprob(float(v), rank, token_text(tokenizer, int(t)))
                            for rank, (t, v) in enumerate(zip([token, *others], rng.permutation(values)), 1)})
        shape = completion_logprobs(tokenizer, ids, entries)
        for name, logprob, top in zip(shape.tokens, shape.token_logprobs, shape.top_logprobs):
            assert top[name] == logprob and "\ufffd" not in name
        named = [name for name in shape.tokens if name.startswith("bytes:")]
        assert len(named) == len(partial)
        joined = b"".join(bytes.fromhex(name[6:].replace("\\x", "")) for name in named)
        assert set(joined.decode()) <= set("東京👩🎉 ")  # whole characters (and a space a piece may lead with)


def _qwen3_coder_call(name: str, arguments: dict) -> str:
    """A call written in Qwen3-Coder's XML syntax: each value as text (JSON for objects, arrays and
    booleans), one newline framing it on each side."""
    def text(value):
        return json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)

    parameters = "".join(f"<parameter={key}>\n{text(value)}\n</parameter>\n" for key, value in arguments.items())
    return f"<tool_call>\n<function={name}>\n{parameters}</function>\n</tool_call>"


def test_qwen3_coder_calls_are_read_as_transformers_reads_them():
    """Oracle: transformers' own response parser (`parse_response`) with its template for the
    Qwen 3.5 family, which writes calls in this syntax, given the same tools to type the values."""
    import random

    from jpaged.server.tool_parsers import tool_parser
    chat_parsing = pytest.importorskip("transformers.utils.chat_parsing.response_parser")
    templates = pytest.importorskip("transformers.cli.serving.utils")._RESPONSE_TEMPLATE_FALLBACKS
    template = next(spec for families, spec in templates.items() if "qwen3_5" in families)
    prefix = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    parser, rng = tool_parser("qwen3_coder"), random.Random(0)
    kinds = {"string": lambda: "".join(rng.choice("abé☃ {}[]\"'") for _ in range(rng.randint(1, 8))).strip() or "x",
             "integer": lambda: rng.randint(-10**6, 10**6), "number": lambda: rng.randint(-10**4, 10**4) / 8 + 0.5,
             "boolean": lambda: rng.random() < 0.5, "object": lambda: {"k": rng.randint(0, 9), "s": ["a", None]},
             "array": lambda: [rng.randint(0, 9), "b", {"c": True}]}
    for trial in range(60):
        tools, calls = [], []
        for j in range(rng.randint(1, 3)):
            types = {f"p{i}": rng.choice(sorted(kinds)) for i in range(rng.randint(0, 5))}
            tools.append({"type": "function", "function": {"name": f"fn_{j}", "parameters": {
                "type": "object", "properties": {key: {"type": kind} for key, kind in types.items()}}}})
            calls.append((f"fn_{j}", {key: kinds[kind]() for key, kind in types.items()}))
        content = rng.choice(["", "Let me look. ", "Sure: <b>x</b> "])
        text = content + "\n".join(_qwen3_coder_call(name, args) for name, args in calls)
        want = chat_parsing.parse_response(text + "<|im_end|>", template, prefix=prefix, tools=tools)
        found, parsed = parser.parse(text, tools)
        assert [(c.name, json.loads(c.arguments)) for c in parsed] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in want["tool_calls"]] == calls
        assert (found or "").strip() == (want.get("content") or "")
        sent, final = _streamed(parser, text)
        assert final == content and "<tool_call>" not in sent
    untyped = parser.parse(_qwen3_coder_call("f", {"n": 3, "o": {"a": 1}}))[1][0]  # no tools: every value is text
    assert json.loads(untyped.arguments) == {"n": "3", "o": '{"a": 1}'}
    number = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"type": "number"}}}}}]
    for text in ["Hello there.", "<tool_call>\n<function=>\n</function>\n</tool_call>",
                 "<tool_call>\n<function=f>\n<parameter=x>\nnan\n</parameter>\n</function>\n</tool_call>"]:
        assert parser.parse(text, number) == (text, [])  # no call, no name, or a number JSON cannot hold
    call = _qwen3_coder_call("f", {"n": 3})
    for odd in ([{"type": "function", "function": {"name": "f", "parameters": {"properties": {"n": True}}}}],
                [{"function": {"name": "f", "parameters": {"properties": {"n": "integer"}}}}],
                [{"function": None}], ["f"], [{"function": {"name": "f", "parameters": {"properties": [1]}}}]):
        assert json.loads(parser.parse(call, odd)[1][0].arguments) == {"n": "3"}  # a schema not to be read: text
    typed = [{"function": {"name": "f", "parameters": {"properties": {"n": {"type": "integer"}}}}}]
    assert json.loads(parser.parse(_qwen3_coder_call("f", {"n": "1_000"}), typed)[1][0].arguments) == {"n": "1_000"}
    open_ended = "<function=f>\n<parameter=x>\n2\n</parameter>\n<parameter=y>\nlast"  # cut short, no <tool_call>
    assert [(c.name, json.loads(c.arguments)) for c in parser.parse(open_ended, number)[1]] == [("f", {"x": 2, "y": "last"})]


def test_bodies_the_json_parser_cannot_take_get_400s_saying_why():
    """A body nested past the parser's depth, a number of more digits than Python converts, or a
    JSON object sent as text: each a 400 in OpenAI's shape that says what is wrong."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from jpaged.server import app as server_app
    from jpaged.server.protocol import CompletionRequest

    app = FastAPI()
    server_app._add_error_handlers(app)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest):
        return {"prompt": body.prompt}

    client = TestClient(app)
    json_type = {"content-type": "application/json"}
    cases = [('{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", json_type, "could not be read as JSON: Exceeds"),
             ('{"prompt": "hi", "x": ' + "[" * 5000 + "]" * 5000 + "}", json_type, "could not be read as JSON: maximum "
                                                                                 "recursion depth"),
             ('{"prompt": "hi"}', {"content-type": "text/plain"}, "must be a JSON object, sent with Content-Type: "
                                                                 "application/json")]
    for body, headers, message in cases:
        response = client.post("/v1/completions", content=body, headers=headers)
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    assert client.post("/v1/completions", json={"prompt": "hi"}).json() == {"prompt": "hi"}


PARTS_LOOP = "{% for message in messages %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endfor %}"


@pytest.mark.parametrize(("template", "reads_parts"), [
    (PARTS_LOOP, True),
    (PARTS_LOOP.replace("message['content']", "message.content"), True),
    # through a variable set from messages, a slice and a filter
    ("{%- set loop_messages = messages[1:] %}{% for m in loop_messages %}{% for c in m.content | "
     "selectattr('type', 'equalto', 'text') %}{{ c.text }}{% endfor %}{% endfor %}", True),
    ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
     "{{ c['text'] }}{% endfor %}{% endif %}{% endfor %}", True),
    ("{% for message in messages %}{{ message['content'] }}{% endfor %}", False),
    # loops over other things' contents
    ("{% for m in messages %}{% for call in m.tool_calls %}{% for c in call.content %}{{ c }}{% endfor %}{% endfor %}"
     "{% endfor %}", False),
    ("{% for d in documents %}{% for c in d['content'] %}{{ c }}{% endfor %}{% endfor %}", False),
    # parts reached through a variable set from the content: vLLM reads it as text too
    ("{% for m in messages %}{% set parts = m['content'] %}{% for p in parts %}{{ p }}{% endfor %}{% endfor %}",
     False),
    ("{% for m in messages %}{% for c in m['content'] %}", False),  # does not parse
    # transformers' assistant-mask block, in which the loop over the parts sits
    ("{% for m in messages %}{% generation %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endgeneration %}"
     "{% endfor %}", True),
    ("{% for m in messages %}{% for k, v in m.content %}{{ v }}{% endfor %}{% endfor %}", False),  # vLLM: text
    (None, False),
])
def test_auto_content_format_reads_the_templates_syntax_tree_as_vllm(template, reads_parts):
    """vLLM's "auto" chat_template_content_format: "openai" (lists of parts) where a loop over
    `messages` (or a variable set from it) holds a loop over the message's `content`."""
    from jpaged.chat_template import template_reads_parts

    assert template_reads_parts(template) is reads_parts
