"""Reasoning outputs (`reasoning_parser`): replies split into `reasoning` and `content`, in whole
responses and in streams, and structured outputs held back until the reasoning ends.

A random-weight Qwen3 model with a small byte-level BPE vocabulary (learned from the public-domain
test text) holding `<think>` and `</think>` as added tokens and ChatML's turn markers as special ones, and a Qwen3-style chat template (`enable_thinking=False` closes the thinking in the
prompt), served with `--reasoning-parser qwen3` and driven by the official `openai` client.
Sampled replies are limited by `allowed_token_ids` to the markers and a few words, so they think,
stop thinking and answer in varied ways. Oracles: the same requests' raw text from `LLM.chat`
before the server takes the engine (same seeds, same tokens), read by vLLM's documented rule (the
reply up to the first `</think>` is reasoning, without its `<think>` markers; the rest is content;
a reply with no `</think>` is all reasoning), and `json.loads` for constrained answers.
"""

import json
import pathlib
import re

import pytest
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from hf_models import save_random_model  # noqa: E402
from server_thread import serving  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402
from jpaged.reasoning import ReasoningParser  # noqa: E402
from jpaged.server.launch import create_app  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data" / "public_domain.txt"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
ENGINE_ARGS = dict(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, reasoning_parser="qwen3")
MESSAGES = [{"role": "user", "content": "Where is the old man?"}]
WORDS = (" the", " sea", " old")  # the replies' words, besides the markers
SEEDS = range(10)


def vllm_reading(text: str) -> tuple[str | None, str | None]:
    """vLLM's reading of a reply under the qwen3 parser: reasoning up to the first `</think>`
    (markers dropped), content after it (later `</think>` markers dropped); no `</think>`: all
    reasoning. Empty parts are None."""
    if "</think>" not in text:
        return text.replace("<think>", "") or None, None
    head, _, tail = text.partition("</think>")
    return head.replace("<think>", "") or None, tail.replace("</think>", "") or None


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_reasoning")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(DATA)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    tokenizer.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    config = transformers.Qwen3Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    save_random_model(folder, config, seed=3)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                         additional_special_tokens=["<|im_start|>"],
                                         chat_template=TEMPLATE).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def llm(model_folder):
    return LLM(str(model_folder), **ENGINE_ARGS)


def sampled(tokenizer, seed: int, **fields) -> dict:
    """Sampling fields of a reply made of the markers (made rarer) and three words, with `seed`."""
    allowed = [tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
    allowed += [tokenizer.encode(word, add_special_tokens=False)[0] for word in WORDS]
    return dict(temperature=1.0, seed=seed, max_tokens=10, allowed_token_ids=allowed,
                logit_bias={marker: -3.0 for marker in allowed[:2]}, **fields)


@pytest.fixture(scope="module")
def raw(llm):
    """Each seed's raw reply text from `LLM.chat`, before the server takes the engine."""
    tokenizer = llm.get_tokenizer()
    outs = llm.chat([MESSAGES] * len(SEEDS), [SamplingParams(**sampled(tokenizer, s)) for s in SEEDS], use_tqdm=False)
    return [out.outputs[0].text for out in outs], [out.outputs[0].token_ids for out in outs]


CONTINUED = [*MESSAGES, {"role": "assistant", "content": "<think>The old man</think> He is"}]


@pytest.fixture(scope="module")
def raw_continued(llm):
    """Raw replies continuing an assistant message that already closed its thinking."""
    tokenizer = llm.get_tokenizer()
    outs = llm.chat([CONTINUED] * 3, [SamplingParams(**sampled(tokenizer, s)) for s in range(3)], use_tqdm=False,
                    add_generation_prompt=False, continue_final_message=True)
    return [out.outputs[0].text for out in outs]


@pytest.fixture(scope="module")
def client(llm, raw, raw_continued):
    with serving(create_app(llm.engine, served_model_name="thinker")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), llm


def request_fields(tokenizer, seed: int) -> dict:
    """`sampled` as the `openai` client sends it: vLLM's extras in `extra_body`, biases by string."""
    fields = sampled(tokenizer, seed)
    fields["extra_body"] = {"allowed_token_ids": fields.pop("allowed_token_ids"), "seed": fields.pop("seed")}
    fields["logit_bias"] = {str(token): bias for token, bias in fields["logit_bias"].items()}
    return fields


def test_the_replies_cover_every_case(raw):
    """The fixtures' replies think then answer, think only, and answer after a second `</think>`
    (each reading below is then checked on real cases)."""
    raw, _ = raw
    readings = [vllm_reading(text) for text in raw]
    assert any(r and c for r, c in readings) and any(c is None for _, c in readings)
    assert any(text.count("</think>") > 1 for text in raw)


def test_constraints_may_hold_the_markers_text(llm):
    """`<think>` and `</think>` are ordinary added tokens: a constraint whose text holds them is met
    (where it forces them, spelled as the tokenizer spells that text; where it offers them, as
    their own tokens) and the reply ends when the constraint does. The prompt closes the
    thinking, so the grammars hold from the first token."""
    tokenizer = llm.get_tokenizer()
    markers = {tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}
    prompt = {"prompt_token_ids": tokenizer.encode("Where?</think>", add_special_tokens=False)}
    forced, offered = "(the|a)<think>(old|sea)</think>", "(the|a)(<think>|x)(old|sea)(</think>|y)"
    outs = llm.generate([prompt] * 2, [SamplingParams(temperature=0, max_tokens=30, structured_outputs={"regex": rx},
                                                      logit_bias={token: 50.0 for token in markers})
                                       for rx in (forced, offered)], use_tqdm=False)
    for rx, out in zip((forced, offered), outs):
        assert out.outputs[0].finish_reason == "stop" and re.fullmatch(rx, out.outputs[0].text), out
    assert markers <= set(outs[1].outputs[0].token_ids)


def test_chat_splits_reasoning_from_content_whole_and_streamed(client, raw):
    """The message's `reasoning` and `content`, the stream's pieces of each, and the reasoning
    tokens in the usage (the reply's tokens before its first `</think>`, `<think>` not counted)."""
    api, llm = client
    tokenizer = llm.get_tokenizer()
    end, start = (tokenizer.convert_tokens_to_ids(t) for t in ("</think>", "<think>"))
    for seed, text, token_ids in zip(SEEDS, *raw):
        fields = request_fields(tokenizer, seed)
        reply = api.chat.completions.create(model="thinker", messages=MESSAGES, **fields)
        message = reply.choices[0].message
        assert (message.model_extra["reasoning"], message.content) == vllm_reading(text), text
        thought = token_ids[:token_ids.index(end)] if end in token_ids else token_ids
        assert reply.usage.completion_tokens_details.reasoning_tokens == sum(t != start for t in thought)
        pieces = {"reasoning": [], "content": []}
        for chunk in api.chat.completions.create(model="thinker", messages=MESSAGES, stream=True, **fields):
            delta = chunk.choices[0].delta
            for part in pieces:
                if (value := getattr(delta, part, None) or (delta.model_extra or {}).get(part)):
                    pieces[part].append(value)
        assert tuple("".join(p) or None for p in pieces.values()) == vllm_reading(text)
    assert llm.engine.stats().kv_cache_usage == 0


def test_responses_give_a_reasoning_item_before_the_message(client, raw):
    """/v1/responses: a `reasoning` item (its `reasoning_text`) before the `message`, whole and as
    streamed events, and the reasoning tokens counted in the usage."""
    api, llm = client
    tokenizer = llm.get_tokenizer()
    end, start = (tokenizer.convert_tokens_to_ids(t) for t in ("</think>", "<think>"))
    for seed, text, token_ids in zip(SEEDS, *raw):
        reasoning, content = vllm_reading(text)
        fields = request_fields(tokenizer, seed)
        fields["max_output_tokens"] = fields.pop("max_tokens")
        fields["extra_body"]["logit_bias"] = fields.pop("logit_bias")
        response = api.responses.create(model="thinker", input=MESSAGES[0]["content"], **fields)
        kinds = [item.type for item in response.output]
        assert kinds == ["reasoning"] * (reasoning is not None) + ["message"], text
        if reasoning is not None:
            assert response.output[0].content[0].text == reasoning
        assert response.output[-1].content[0].text == (content or "")
        thought = token_ids[:token_ids.index(end)] if end in token_ids else token_ids
        assert response.usage.output_tokens_details.reasoning_tokens == sum(t != start for t in thought)
        events = list(api.responses.create(model="thinker", input=MESSAGES[0]["content"], stream=True, **fields))
        deltas = {kind: "".join(e.delta for e in events if e.type == kind)
                  for kind in ("response.reasoning_text.delta", "response.output_text.delta")}
        assert tuple(deltas.values()) == (reasoning or "", content or "")
        final = events[-1].response
        assert [(item.type, item.content[0].text) for item in final.output] == \
            [(item.type, item.content[0].text) for item in response.output]
        added = [e.output_index for e in events if e.type == "response.output_item.added"]
        assert added == list(range(len(kinds)))


def test_a_prompt_that_closed_the_thinking_gets_all_content(client, raw_continued):
    """Continuing an assistant message whose thinking is closed: the reply is all content (its
    `</think>` markers included), and holds no reasoning tokens."""
    api, llm = client
    assert any("</think>" in text for text in raw_continued)
    for seed, text in enumerate(raw_continued):
        fields = request_fields(llm.get_tokenizer(), seed)
        fields["extra_body"].update(add_generation_prompt=False, continue_final_message=True)
        reply = api.chat.completions.create(model="thinker", messages=CONTINUED, **fields)
        assert (reply.choices[0].message.model_extra["reasoning"], reply.choices[0].message.content) == (None, text)
        assert reply.usage.completion_tokens_details.reasoning_tokens == 0


def test_the_end_of_sequence_is_no_reasoning_token(client):
    """A reply that ends at EOS while still thinking: every token but the EOS is reasoning."""
    api, llm = client
    tokenizer = llm.get_tokenizer()
    word, eos = tokenizer.encode(WORDS[0], add_special_tokens=False)[0], tokenizer.eos_token_id
    replies = [api.chat.completions.create(model="thinker", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                           extra_body={"seed": seed, "allowed_token_ids": [word, eos]})
               for seed in range(4)]
    ended = [reply for reply in replies if reply.choices[0].finish_reason == "stop"]
    assert ended
    for reply in ended:
        assert reply.choices[0].message.content is None
        assert reply.usage.completion_tokens_details.reasoning_tokens == reply.usage.completion_tokens - 1


def test_thinking_turned_off_makes_the_whole_reply_content(client):
    api, llm = client
    fields = request_fields(llm.get_tokenizer(), 1)
    fields["extra_body"]["chat_template_kwargs"] = {"enable_thinking": False}
    message = api.chat.completions.create(model="thinker", messages=MESSAGES, **fields).choices[0].message
    assert message.model_extra["reasoning"] is None and message.content


def test_structured_output_applies_once_the_reasoning_ends(client):
    """With the reasoning open, `</think>` (which no JSON grammar allows) may come first and the
    answer after it is JSON; with the prompt closing the reasoning (`enable_thinking` off) the
    grammar holds from the first token, so the bias cannot bring `</think>` and the reply is JSON."""
    api, llm = client
    end = llm.get_tokenizer().convert_tokens_to_ids("</think>")
    schema = {"type": "object", "properties": {"digit": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["digit"], "additionalProperties": False}
    common = dict(model="thinker", messages=MESSAGES, temperature=0, max_tokens=40, logit_bias={str(end): 100},
                  response_format={"type": "json_schema", "json_schema": {"name": "digit", "schema": schema}})
    compact = {"structured_outputs": {"disable_any_whitespace": True}}
    open_reply = api.chat.completions.create(**common, extra_body=compact).choices[0]
    assert open_reply.message.model_extra["reasoning"] is None  # </think> came first: nothing thought
    assert isinstance(json.loads(open_reply.message.content), dict), open_reply.message.content
    closed = api.chat.completions.create(**common, extra_body={**compact,
                                                               "chat_template_kwargs": {"enable_thinking": False}})
    assert isinstance(json.loads(closed.choices[0].message.content), dict)
    assert "</think>" not in closed.choices[0].message.content


def test_parsers_read_prompts_and_refuse_what_they_cannot_parse(llm, stories_path):
    tokenizer = llm.get_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "<|im_start|>")}
    word = tokenizer.encode(WORDS[0], add_special_tokens=False)[0]
    qwen3, r1 = (ReasoningParser.from_tokenizer(name, tokenizer) for name in ("qwen3", "deepseek_r1"))
    closed_earlier = [ids["<think>"], word, ids["</think>"], ids["<|im_start|>"], word]
    assert not qwen3.reasoning_ended(closed_earlier)  # an earlier turn's thinking is no answer now
    assert r1.reasoning_ended(closed_earlier) and qwen3.reasoning_ended([ids["<think>"], ids["</think>"], word])
    assert not r1.reasoning_ended([ids["</think>"], ids["<think>"]])
    assert r1.split("a</think>b</think>c") == ("a", "b</think>c")  # DeepSeek-R1: only the first marker ends it
    assert qwen3.split("a</think>b</think>c") == ("a", "bc")
    with pytest.raises(ValueError, match="reasoning_parser 'qwen3' needs <think> and </think>"):
        LLM(stories_path, num_blocks=16, reasoning_parser="qwen3")
    with pytest.raises(ValueError, match="reasoning_parser must be None or one of deepseek_r1, qwen3, got 'r2'"):
        LLM(stories_path, num_blocks=16, reasoning_parser="r2")


def test_a_named_tool_call_follows_the_reasoning(client):
    """Under a named tool choice the arguments' grammar waits for the end of the thinking too;
    the call's arguments come whole and streamed alike."""
    api, llm = client
    end = llm.get_tokenizer().convert_tokens_to_ids("</think>")
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"digit": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["digit"], "additionalProperties": False}}}
    common = dict(model="thinker", messages=MESSAGES, temperature=0, max_tokens=30, logit_bias={str(end): 100},
                  tools=[tool], tool_choice={"type": "function", "function": {"name": "pick"}},
                  extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    message = api.chat.completions.create(**common).choices[0].message
    (call,) = message.tool_calls
    assert message.model_extra["reasoning"] is None and 0 <= json.loads(call.function.arguments)["digit"] <= 9
    pieces = [c.choices[0].delta.tool_calls[0].function.arguments
              for c in api.chat.completions.create(**common, stream=True) if c.choices and c.choices[0].delta.tool_calls]
    assert "".join(pieces) == call.function.arguments
