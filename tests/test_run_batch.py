"""`jpaged run-batch`: OpenAI batch files answered through the server's routes, offline.

Oracles: `LLM.generate` / `LLM.chat` on the same model folder (greedy text must match), the
tokenizer (for /tokenize lines), the official `openai` client's response types (each answered body
must parse as one), and the engine's stats (no KV block in use once the batch is done).
"""
import io
import json
import shutil

import pytest

openai = pytest.importorskip("openai")

from jpaged import LLM, SamplingParams  # noqa: E402
from jpaged.cli import main  # noqa: E402
from jpaged.server import batch  # noqa: E402
from jpaged.server.batch import read_batch, run_batch  # noqa: E402
from jpaged.server.launch import create_app  # noqa: E402

ENGINE_ARGS = dict(num_blocks=128, max_num_seqs=8, max_num_batched_tokens=64)
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["Once upon a time, there was a dog named", "Lily wanted to play", "The sun was", "Tom had a big",
           "One day, a little bird", "Sam and his mom"]
CHAT = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A dog named Max"}]


@pytest.fixture(scope="module")
def model_folder(stories_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stories_batch") / "stories260K"
    shutil.copytree(stories_path, folder)
    config_path = folder / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": CHAT_TEMPLATE}))
    return str(folder)


@pytest.fixture(scope="module")
def llm(model_folder):
    return LLM(model_folder, **ENGINE_ARGS)


def _line(custom_id, url, body, method="POST"):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def _write(tmp_path, lines, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _greedy(llm, prompts, max_tokens):
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return [out.outputs[0].text for out in outputs]


def test_batch_answers_each_line_as_the_server_would(llm, tmp_path, monkeypatch):
    texts = _greedy(llm, PROMPTS, 10)
    chat_text = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0].text
    tokenizer = llm.get_tokenizer()
    lines = [_line(f"c{i}", "/v1/completions", {"model": "stories", "prompt": p, "max_tokens": 10, "temperature": 0})
             for i, p in enumerate(PROMPTS)]
    lines += [
        _line("chat", "/v1/chat/completions", {"model": "stories", "messages": CHAT, "max_tokens": 12,
                                               "temperature": 0}),
        _line("two-prompts", "/v1/completions", {"model": "stories", "prompt": PROMPTS[:2], "max_tokens": 10,
                                                 "temperature": 0}),
        _line("bad-temperature", "/v1/completions", {"model": "stories", "prompt": "Tom", "temperature": -1}),
        _line("other-model", "/v1/completions", {"model": "gpt-4o", "prompt": "Tom"}),
        _line("streamed", "/v1/chat/completions", {"model": "stories", "messages": CHAT, "stream": True}),
        _line("no-route", "/v1/images/generations", {"prompt": "a dog"}),
        _line("tokens", "/tokenize", {"prompt": PROMPTS[0]}),
        _line("logprobs", "/v1/completions", {"model": "stories", "prompt": PROMPTS[0], "max_tokens": 4,
                                               "temperature": 0, "logprobs": 1, "return_token_ids": True}),
        _line("too-many", "/v1/completions", {"model": "stories", "prompt": "Tom", "max_tokens": 2, "n": 100}),
        _line("bytes", "/v1/embeddings", {"model": "stories", "input": "Tom", "encoding_format": "bytes"}),
        _line("stream-text", "/v1/completions", {"model": "stories", "prompt": "Tom", "stream": "false"}),
        _line("ping", "/ping", {}),
    ]
    lines += [_line(f"sampled{i}", "/v1/completions", {"model": "stories", "prompt": PROMPTS[i], "max_tokens": 6,
                                                       "temperature": 1, "seed": i, "n": 3}) for i in range(4)]
    monkeypatch.setattr(batch, "LINES_IN_FLIGHT", 3)  # more lines than places: the rest wait their turn
    # a queue of 8 sequences: the sampled lines (3 each) wait for room, and are sent again
    app = create_app(llm.engine, served_model_name="stories", max_queued_requests=8,
                     return_tokens_as_token_ids=True)  # the server's default for logprobs' token names
    output = io.StringIO()
    failed = run_batch(app, read_batch(_write(tmp_path, lines)), output, use_tqdm=False)

    answers = [json.loads(text) for text in output.getvalue().splitlines()]
    assert [a["custom_id"] for a in answers] == [json.loads(line)["custom_id"] for line in lines]
    assert len({a["id"] for a in answers}) == len(answers)
    by_id = {a["custom_id"]: a for a in answers}
    for i, text in enumerate(texts):
        response = by_id[f"c{i}"]["response"]
        assert response["status_code"] == 200 and by_id[f"c{i}"]["error"] is None
        assert openai.types.Completion.model_validate(response["body"]).choices[0].text == text
    chat = openai.types.chat.ChatCompletion.model_validate(by_id["chat"]["response"]["body"])
    assert chat.choices[0].message.content == chat_text
    both = openai.types.Completion.model_validate(by_id["two-prompts"]["response"]["body"])
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == texts[:2]
    assert by_id["tokens"]["response"]["body"]["tokens"] == tokenizer.encode(PROMPTS[0])
    named = by_id["logprobs"]["response"]["body"]["choices"][0]
    assert named["logprobs"]["tokens"] == [f"token_id:{t}" for t in named["token_ids"]]
    assert tokenizer.decode(named["prompt_token_ids"] + named["token_ids"]).endswith(named["text"])

    for i in range(4):
        sampled = by_id[f"sampled{i}"]["response"]
        assert sampled["status_code"] == 200 and len(sampled["body"]["choices"]) == 3, sampled
    refused = {"bad-temperature": (400, "temperature"), "other-model": (404, "model"), "streamed": (400, "stream"),
               "no-route": (404, "url"), "too-many": (400, "n"), "bytes": (400, "encoding_format"),
               "stream-text": (400, "stream"), "ping": (404, "url")}
    assert failed == len(refused)
    for custom_id, (status, param) in refused.items():
        answer = by_id[custom_id]
        body = answer["response"]["body"]
        assert answer["response"]["status_code"] == status, answer
        assert body["error"]["param"] == param, body
        assert answer["error"]["message"] == body["error"]["message"]
    assert "/v1/chat/completions" in by_id["no-route"]["error"]["message"]  # the routes a line may use

    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize("text, message", [
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\nnot json', "line 2"),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/models", "body": {}}', "method"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {}}', "method"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": []}', "body"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n\n'
     '{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}', "custom_id 'a' is already used on line 1"),
    ("\n\n", "no batch request line"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
])
def test_malformed_files_are_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "in.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        read_batch(path)


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path, monkeypatch):
    """In a file, and on standard input ("-") as a pipe gives it (bytes, decoded here)."""
    path = tmp_path / "in.jsonl"
    path.write_bytes("\ufeff".encode() + _line("a", "/v1/completions", {"prompt": "Tom"}).encode())
    assert [line.custom_id for line in read_batch(path)] == ["a"]
    for data, expected in ((path.read_bytes(), None), (b"\xff\xfe{}", "- is not UTF-8 text")):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="latin-1"))
        if expected is None:
            assert [line.custom_id for line in read_batch("-")] == ["a"]
        else:
            with pytest.raises(ValueError, match=expected):
                read_batch("-")


def test_command_line(model_folder, tmp_path, capsys):
    lines = [_line("a", "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0}),
             _line("b", "/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0})]
    out = tmp_path / "out.jsonl"
    args = ["run-batch", "-i", str(_write(tmp_path, lines)), "-o", str(out), "--model", model_folder,
            "--num-blocks", "128", "--max-num-seqs", "8", "--max-num-batched-tokens", "64"]
    assert main(args) == 0
    answers = [json.loads(text) for text in out.read_text().splitlines()]
    assert [a["custom_id"] for a in answers] == ["a", "b"]
    assert all(a["response"]["status_code"] == 200 and a["response"]["body"]["model"] == model_folder
               for a in answers)

    assert main(args[:4] + ["-"] + args[5:]) == 0  # to standard output
    assert [json.loads(text)["custom_id"] for text in capsys.readouterr().out.splitlines()] == ["a", "b"]

    bad = _write(tmp_path, [lines[0], "{}"], "bad.jsonl")  # refused before the model loads
    assert main(["run-batch", "-i", str(bad), "-o", str(tmp_path / "never.jsonl"), "--model", model_folder]) == 2
    assert "line 2" in capsys.readouterr().err and not (tmp_path / "never.jsonl").exists()
    assert main(["run-batch", "-i", str(bad), "-o", str(out), "--model", model_folder, "--runner", "pooling",
                 "--tool-call-parser", "hermes", "--enable-auto-tool-choice"]) == 2
    assert "--runner pooling" in capsys.readouterr().err
