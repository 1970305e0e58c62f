"""End-to-end engine behaviour on the real stories260K model: golden tokens, batching, leaks, errors."""

import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jpaged import LLM, BeamSearchParams, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=32)
# HF transformers, greedy, from BOS alone (see ../shared/models/stories260K/README.md).
GOLDEN_FROM_BOS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338,
                   401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385]
GOLDEN_DOG = " Max. Max loved to play with his toys and run around. One day, Max saw a big box in the gr"

STORY_STARTS = [
    "Once upon a time, there was a dog named", "The little girl", "One day, a big cat", "Tom and Sue",
    "The sun was hot and", "Lily wanted to play with her ball", "Once upon a time", "A bird sat",
    "Ben had a red car. He liked to drive it around the house and", "The tree", "Mom said", "Anna",
]


@pytest.fixture(scope="module")
def llm(stories_path):
    return LLM(stories_path, num_blocks=256)


def all_blocks_free(llm: LLM) -> bool:
    manager, stats = llm.engine.block_manager, llm.engine.stats()
    assert (stats.num_blocks, stats.num_free_blocks) == (manager.num_blocks, manager.num_free_blocks)
    return manager.num_free_blocks == manager.num_blocks and not any(manager.ref_counts)


def test_golden_tokens_from_bos(llm):
    out = llm.generate({"prompt_token_ids": [1]}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == GOLDEN_FROM_BOS
    assert out.outputs[0].finish_reason == "length"


def test_golden_text_from_prompt(llm):
    out = llm.generate("Once upon a time, there was a dog named",
                       SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)[0]
    assert out.outputs[0].text == GOLDEN_DOG
    assert all_blocks_free(llm)


def test_outputs_in_input_order_with_per_prompt_params(llm):
    lengths = [5, 1, 9, 3]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(STORY_STARTS[:4], params, use_tqdm=False)
    assert [o.prompt for o in outs] == STORY_STARTS[:4]
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths


def batch_requests():
    """32+ requests with varied prompt lengths (some over one chunk) and output lengths."""
    prompts, params = [], []
    for i in range(36):
        start = STORY_STARTS[i % len(STORY_STARTS)]
        prompts.append(start + " and" * (i % 5) * 3)
        params.append(SamplingParams(temperature=0.0, max_tokens=20 + (i * 7) % 30, ignore_eos=True))
    return prompts, params


def test_batch_invariance_under_preemption_and_chunked_prefill(stories_path, llm):
    prompts, params = batch_requests()
    alone = [llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]

    tight = LLM(stories_path, num_blocks=24, max_num_batched_tokens=32, max_num_seqs=32)
    together = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in together] == alone
    assert all_blocks_free(tight)


def test_streaming_engine_abort_frees_blocks(llm):
    engine = llm.engine
    for i, prompt in enumerate(STORY_STARTS[:6]):
        engine.add_request(f"stream-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("stream-1")
    engine.abort_request("stream-4")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in ("stream-1", "stream-4")
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["stream-0", "stream-2", "stream-3", "stream-5"]
    assert all(len(o.outputs[0].token_ids) == 50 for o in finished.values())
    assert all_blocks_free(llm)


def test_abort_while_waiting_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("waiting", "Once upon a time", GREEDY)
    engine.abort_request("waiting")
    assert not engine.has_unfinished_requests()
    assert all_blocks_free(llm)


def test_both_engines_implement_the_engine_client_and_abort_frees_at_once(llm):
    from jpaged.data_parallel import DataParallelEngine
    from jpaged.engine_client import EngineClient

    engine = llm.engine
    assert isinstance(engine, EngineClient)
    methods = [name for name, value in vars(EngineClient).items() if callable(value) and not name.startswith("_")]
    assert len(methods) == 20 and all(callable(getattr(DataParallelEngine, name, None)) for name in methods)
    for name in ("a", "b"):
        engine.add_request(f"client-{name}", "Once upon a time", SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    assert engine.get_num_unfinished_requests() == 2 and engine.stats().kv_cache_usage > 0
    used = engine.stats().kv_cache_usage
    engine.abort_request("client-a")
    assert 0 < engine.stats().kv_cache_usage < used
    engine.abort_request("client-b")
    assert engine.get_num_unfinished_requests() == 0 and engine.stats().kv_cache_usage == 0
    assert not engine.has_unfinished_requests() and all_blocks_free(llm)


def test_priority_scheduling_serves_lower_values_first_with_unchanged_tokens(stories_path, llm):
    """One sequence at a time: requests finish in (priority, arrival) order, each with the tokens it
    gets alone; the first-come-first-served engine refuses priorities, naming the policy."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts, priorities = STORY_STARTS[:5], [3, 0, 1, 0, -2]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    ranked = LLM(stories_path, num_blocks=64, max_num_seqs=1, scheduling_policy="priority")
    engine, finished = ranked.engine, []
    for i, (prompt, priority) in enumerate(zip(prompts, priorities)):
        engine.add_request(str(i), prompt, params, priority=priority)
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["4", "1", "3", "2", "0"]
    assert [o.outputs[0].token_ids for o in sorted(finished, key=lambda o: int(o.request_id))] == alone
    outs = ranked.generate(prompts, params, use_tqdm=False, priority=priorities)
    assert [o.outputs[0].token_ids for o in outs] == alone and all_blocks_free(ranked)
    with pytest.raises(ValueError, match="got 2 priorities for 5 prompts"):
        ranked.generate(prompts, params, priority=[0, 1])
    with pytest.raises(ValueError, match=r"prompt 1: priority 4 needs scheduling_policy='priority'"):
        llm.generate(prompts[:2], params, use_tqdm=False, priority=[0, 4])
    assert not llm.engine.has_unfinished_requests() and all_blocks_free(llm)


def test_generation_config_defaults_match_hf_generate(stories_path, tmp_path, monkeypatch):
    """A model folder whose generation_config.json recommends sampling settings: `generate` with no
    SamplingParams follows them as HF transformers' `generate` does (greedy here, a repetition
    penalty and 7 new tokens); generation_config="none" keeps jpaged's own defaults."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "stories260K"
    shutil.copytree(stories_path, folder)
    recommended = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False, "temperature": 0.0,
                   "repetition_penalty": 1.3, "max_new_tokens": 7}
    (folder / "generation_config.json").write_text(json.dumps(recommended))
    prompt = "Once upon a time, there was a dog named"
    ids = AutoTokenizer.from_pretrained(folder)(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder).generate(ids)[0, ids.shape[1]:].tolist()
    llm = LLM(str(folder), num_blocks=64)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=7)
    assert len(expected) == 7 and llm.generate(prompt, use_tqdm=False)[0].outputs[0].token_ids == expected
    plain = LLM(str(folder), num_blocks=64, generation_config="none")
    assert plain.get_default_sampling_params() == SamplingParams()
    from jpaged import cli

    asked = []  # the command line: its flags first, then the file, then greedy answers of 128 tokens
    monkeypatch.setattr(LLM, "generate", lambda self, prompts, params, **kwargs: asked.append(params) or [])
    for flags in ([], ["--max-tokens", "9", "--top-k", "4"], ["--generation-config", "vllm"]):
        assert cli.main(["generate", "--model", str(folder), "--num-blocks", "64", "--no-chat", "Once", *flags]) == 0
    assert [(p.temperature, p.repetition_penalty, p.max_tokens, p.top_k) for p in asked] == [
        (0.0, 1.3, 7, 0), (0.0, 1.3, 9, 4), (0.0, 1.0, 128, 0)]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(ValueError, match="generation_config .*elsewhere.*: no generation_config.json there"):
        LLM(stories_path, generation_config=str(elsewhere))


def test_bad_request_rejected_while_others_run_on(llm):
    engine = llm.engine
    engine.add_request("good", "The little girl", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match="prompt of 512 tokens leaves no room for output within max_model_len 512"):
        engine.add_request("too-long", {"prompt_token_ids": [1] * 512}, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 512\)"):
        engine.add_request("bad-ids", {"prompt_token_ids": [1, 512]}, GREEDY)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outputs] == ["good"]
    assert len(outputs[0].outputs[0].token_ids) == 12
    assert all_blocks_free(llm)


def test_generate_rejects_bad_prompt_and_keeps_serving(llm):
    with pytest.raises(ValueError, match="prompt 1: prompt of 600 tokens leaves no room"):
        llm.generate(["Once", {"prompt_token_ids": [1] * 600}], GREEDY, use_tqdm=False)
    for bad in ([1, 2.5], [1, True], [1, "a"]):
        with pytest.raises(ValueError, match=f"prompt 0: prompt token ids must be integers, got {bad[1]!r}"):
            llm.generate([bad], GREEDY, use_tqdm=False)
    for bad in (5, None, "12"):
        with pytest.raises(ValueError, match=f"prompt 1: prompt_token_ids must be a list of token ids, got {bad!r}"):
            llm.generate(["Once", {"prompt_token_ids": bad}], GREEDY, use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()  # "Once" left with the call
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams or a list of them"):
        llm.generate(["Once"], {"max_tokens": 3}, use_tqdm=False)
    for bad, kind in ((5, "int"), (b"Once", "bytes")):
        with pytest.raises(ValueError, match="prompts must be a string, a list of token ids, a dict, or a list of "
                                             f"those; got {kind}"):
            llm.generate(bad, GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="priority must be a list of ints, one per prompt; got int 3"):
        llm.generate(["Once"], GREEDY, priority=3, use_tqdm=False)
    # a lone UTF-16 surrogate is not text any tokenizer takes
    with pytest.raises(ValueError, match=r"prompt 1: prompt holds '\\ud800' at character 5, a lone UTF-16 surrogate"):
        llm.generate(["Once", "Once \ud800 upon"], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="the rendered chat holds .* a lone UTF-16 surrogate"):
        llm.chat([{"role": "user", "content": "Hi \udc00"}], GREEDY, use_tqdm=False,
                 chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ValueError, match="bad_words holds"):
        SamplingParams(bad_words=["fine", "\ud800"])
    assert all_blocks_free(llm)
    assert llm.generate({"prompt_token_ids": [1]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == GOLDEN_FROM_BOS


def test_generate_refuses_to_swallow_requests_added_through_the_engine(llm):
    """generate and beam_search step until their own requests finish: with a request added by hand
    waiting in the engine they refuse, and that request's outputs still come from engine.step()."""
    llm.engine.add_request("mine", {"prompt_token_ids": [1]}, GREEDY)
    with pytest.raises(RuntimeError, match="holds 1 unfinished requests added through llm.engine.add_request"):
        llm.generate("Once", GREEDY, use_tqdm=False)
    with pytest.raises(RuntimeError, match="beam_search steps the engine"):
        llm.beam_search(["Once"], BeamSearchParams(beam_width=2, max_tokens=4))
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += [out for out in llm.engine.step() if out.finished]
    assert [(out.request_id, out.outputs[0].token_ids) for out in outputs] == [("mine", GOLDEN_FROM_BOS)]
    assert outputs[0].outputs[0].finished() and all_blocks_free(llm)


def test_vllm_names_run_unchanged(stories_path):
    """vLLM's `trust_remote_code` / `enforce_eager` arguments, `llm_engine` and
    `SamplingParams.clone()`."""
    llm = LLM(stories_path, num_blocks=64, trust_remote_code=True, enforce_eager=True)
    assert llm.llm_engine is llm.engine
    params = SamplingParams(temperature=0, max_tokens=16, stop=["zq"])
    copy = params.clone()
    copy.stop.append("qz")
    assert params.stop == ["zq"] and copy.stop == ["zq", "qz"]
    assert llm.generate({"prompt_token_ids": [1]}, copy, use_tqdm=False)[0].outputs[0].token_ids == GOLDEN_FROM_BOS[:16]
    with pytest.raises(TypeError, match=r"unknown engine arguments: \['tensor_paralel_size'\]"):
        LLM(stories_path, tensor_paralel_size=2)


def test_interrupted_generate_leaves_nothing_behind(llm, fail_step, monkeypatch):
    """A generate call that stops half-way (a step that fails, or Ctrl-C) takes its requests out
    of the engine, so the next call runs alone and every block is free."""
    fail_step(llm.engine, 3)
    with pytest.raises(RuntimeError, match="the step failed"):
        llm.generate(STORY_STARTS[:4], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    monkeypatch.undo()
    assert not llm.engine.has_unfinished_requests() and all_blocks_free(llm)
    assert llm.generate({"prompt_token_ids": [1]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == GOLDEN_FROM_BOS


def test_ctrl_c_as_a_step_returns_leaves_the_engine_usable(llm, monkeypatch):
    """Ctrl-C that arrives while a step runs is raised when it returns: after the step has
    consumed (donated) the KV cache and before the runner stores the new one, unless it is held
    back until then. Afterwards the engine serves as before."""
    import signal

    runner = llm.engine.runner
    real_step = runner._step

    class InterruptedOnce:
        calls = 0

        def __call__(self, *args):
            result = real_step(*args)
            InterruptedOnce.calls += 1
            if InterruptedOnce.calls == 2:
                # SIGINT during the call: its handler runs there (called here directly, as a signal
                # left pending could be taken in a finalizer, which swallows the exception)
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            return result

        def __getattr__(self, name):
            return getattr(real_step, name)

    monkeypatch.setattr(runner, "_step", InterruptedOnce())
    # Python's own handler, as in a terminal: a process started in the background ignores SIGINT,
    # and the engine then leaves it alone
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(STORY_STARTS[:2], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert InterruptedOnce.calls == 2 and not llm.engine.has_unfinished_requests() and all_blocks_free(llm)
    assert llm.generate({"prompt_token_ids": [1]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == GOLDEN_FROM_BOS


def test_request_larger_than_cache_is_rejected(stories_path):
    small = LLM(stories_path, num_blocks=4)
    assert small.engine.max_model_len == 64  # lowered from the model's 512 to what the cache holds
    with pytest.raises(ValueError, match=r"leaves no room for output within max_model_len 64 \(what the KV cache holds\)"):
        small.generate({"prompt_token_ids": [1] * 64}, SamplingParams(max_tokens=100), use_tqdm=False)
    capped = small.generate("Once upon a time", SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert len(capped.prompt_token_ids) + len(capped.outputs[0].token_ids) == 64  # vLLM's: it ends at max_model_len
    assert capped.outputs[0].finish_reason == "length"
    out = small.generate({"prompt_token_ids": [1]}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == GOLDEN_FROM_BOS


def test_malformed_chat_messages_are_named(llm):
    for messages, named in [([{"role": "user"}], "conversation 0, message 0"), ("hello", "got str"),
                            ([], "a list of message dicts or a list of such lists, got \\[\\]"),
                            (["hello"], "conversation 0 must be a list"),
                            ([[{"role": "user", "content": "hi"}], []], "conversation 1 must be a list .* got no messages"),
                            ([[{"role": "user", "content": "hi"}], [{"content": "x"}]], "conversation 1, message 0"),
                            ([{"role": "user", "content": None}], "conversation 0, message 0: content must be"),
                            ([{"role": "user", "content": [{"type": "audio_url"}]}], "a list of text and image parts")]:
        with pytest.raises(ValueError, match=named):
            llm.chat(messages, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"the chat template \(chat_template\) failed on the conversation: .*no user"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False,
                 chat_template="{{ raise_exception('no user turns') }}")
    with pytest.raises(ValueError, match="UndefinedError"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False, chat_template="{{ messages[0].nope.x }}")
    parts = [{"type": "text", "text": "Once upon"}, {"type": "text", "text": "a time"}]  # joined as vLLM joins them
    template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    joined = llm.chat([{"role": "user", "content": parts}], GREEDY, use_tqdm=False, chat_template=template)[0]
    assert joined.prompt_token_ids == llm.get_tokenizer().encode("Once upon\na time|", add_special_tokens=False)
    assert joined.prompt == "Once upon\na time|"  # the rendered conversation, as vLLM reports it


def test_templates_that_loop_over_content_parts_get_parts_on_text_models(llm):
    """vLLM's "auto" content format reads the template alone: one that loops over a message's
    content gets every content as parts (a string as one text part), on a model that reads no
    images too; "string" gives it text, which such a template cannot read."""
    template = "{% for m in messages %}{{ m['role'] }}:{% for p in m['content'] %} {{ p['text'] }}{% endfor %}|{% endfor %}"
    messages = [{"role": "system", "content": "Once"}, {"role": "user", "content": [
        {"type": "text", "text": "upon"}, {"type": "text", "text": "a time"}]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template)[0]
    assert out.prompt == "system: Once|user: upon a time|"
    assert llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template,
                    chat_template_content_format="openai")[0].prompt == out.prompt
    as_text = llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template, chat_template_content_format="string")
    assert "upon" not in as_text[0].prompt


def test_templates_with_a_generation_block_render_as_transformers_renders_them(llm):
    """transformers' `{% generation %}` block (marking the assistant's tokens): such a template is
    taken, read for its content format like any other, and renders as HF's own
    `apply_chat_template` renders the messages in that format."""
    template = ("{% for m in messages %}{{ m['role'] }}:{% if m['role'] == 'assistant' %}{% generation %}"
                "{% for p in m['content'] %} {{ p['text'] }}{% endfor %}{% endgeneration %}{% else %}"
                "{% for p in m['content'] %} [{{ p['text'] }}]{% endfor %}{% endif %}|{% endfor %}")
    messages = [{"role": "user", "content": "Once upon"}, {"role": "assistant", "content": "a time"},
                {"role": "user", "content": "there was"}]
    as_parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    expected = llm.get_tokenizer().apply_chat_template(as_parts, chat_template=template, tokenize=False)
    assert expected == "user: [Once upon]|assistant: a time|user: [there was]|"
    assert llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template)[0].prompt == expected


def test_chat_continues_the_final_message_as_vllm(llm):
    """`continue_final_message`: the reply continues the final assistant message (HF's template
    rendering cut right after its text), the same tokens as `generate` on that text."""
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    conversation = [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": "Once upon a time"}]
    out = llm.chat(conversation, GREEDY, use_tqdm=False, chat_template=template, add_generation_prompt=False,
                   continue_final_message=True)[0]
    rendered = "user: Tell a story\nassistant: Once upon a time"
    assert out.prompt == rendered
    tokens = llm.get_tokenizer().encode(rendered, add_special_tokens=False)
    alone = llm.generate({"prompt_token_ids": tokens}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == alone.outputs[0].token_ids
    with pytest.raises(ValueError, match="continue_final_message .* needs add_generation_prompt=False"):
        llm.chat(conversation, GREEDY, chat_template=template, continue_final_message=True)


def test_detokenize_false_gives_the_same_tokens_without_text(llm):
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[265])
    full = llm.generate(STORY_STARTS[:3], params, use_tqdm=False)
    bare = llm.generate(STORY_STARTS[:3], dataclasses.replace(params, detokenize=False), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in bare] == [o.outputs[0].token_ids for o in full]
    assert [(o.outputs[0].text, o.outputs[0].finish_reason) for o in bare] == [
        ("", o.outputs[0].finish_reason) for o in full]
    assert any(o.outputs[0].stop_reason == 265 for o in bare)
    scored = [llm.generate(STORY_STARTS[0], dataclasses.replace(params, logprobs=2, prompt_logprobs=1, detokenize=d),
                           use_tqdm=False)[0] for d in (True, False)]
    entries = [[lp for entry in out.outputs[0].logprobs + out.prompt_logprobs[1:] for lp in entry.values()]
               for out in scored]
    assert all(lp.decoded_token for lp in entries[0]) and all(lp.decoded_token is None for lp in entries[1])
    assert [lp.logprob for lp in entries[0]] == [lp.logprob for lp in entries[1]]  # texts only, as vLLM's
    with pytest.raises(ValueError, match=r"stop strings \['\.'\] .* need detokenize=True"):
        SamplingParams(stop=".", detokenize=False)
    with pytest.raises(ValueError, match=r"a prompt dict takes 'prompt', 'prompt_token_ids', 'multi_modal_data', "
                                         r"'prompt_embeds', 'cache_salt', got also \['images'\]"):
        llm.generate({"prompt": "Hi", "images": None}, params, use_tqdm=False)
    with pytest.raises(ValueError, match=r"stories260K reads no images \(multi_modal_data holds 1\)"):
        llm.generate({"prompt": "Hi", "multi_modal_data": {"image": Image.new("RGB", (4, 4))}}, params, use_tqdm=False)
    empty = llm.generate({"prompt": "Hi", "multi_modal_data": {"image": []}}, GREEDY, use_tqdm=False)[0]  # none, as vLLM
    assert empty.outputs[0].token_ids == llm.generate("Hi", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert all_blocks_free(llm)


def test_a_cache_or_swap_pool_beyond_memory_is_a_clear_error(stories_path, caplog):
    with pytest.raises(ValueError, match=r"10000000 blocks need 190.73 GiB of cpu memory, more than the .* GiB "
                                         "available: lower num_blocks or cpu_kv_cache_gib"):
        LLM(stories_path, num_blocks=10**7)
    with pytest.raises(ValueError, match="swap_space_gib=100000 is more than the .* GiB of host memory"):
        LLM(stories_path, num_blocks=16, preemption_mode="swap", swap_space_gib=100000)
    LLM(stories_path, num_blocks=16, preemption_mode="swap", swap_space_gib=1e-9)
    assert "holds no KV block" in caplog.text  # swaps become recomputes, and the log says so


def test_max_tokens_none_runs_up_to_max_model_len(stories_path):
    small = LLM(stories_path, num_blocks=8, max_model_len=40)
    out = small.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=None, temperature=0,
                                                                         ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 40 - 3 and out.outputs[0].finish_reason == "length"
    for params in (SamplingParams(max_tokens=None, min_tokens=20, ignore_eos=True),  # ended by max_model_len
                   SamplingParams(max_tokens=25, ignore_eos=True)):
        out = small.generate({"prompt_token_ids": [1] * 30}, params, use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 10 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt of 40 tokens leaves no room for output within max_model_len 40"):
        small.generate({"prompt_token_ids": [1] * 40}, SamplingParams(max_tokens=None), use_tqdm=False)


def test_invalid_sampling_values_raise():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_sampling_params_changed_after_making_are_checked_again(llm):
    for field, value, message in [("max_tokens", 0, "max_tokens must be >= 1"), ("n", 0, "n must be >= 1"),
                                  ("temperature", -5, "temperature must be 0 \\(greedy\\) or in")]:
        params = SamplingParams(temperature=0.7, max_tokens=3)
        setattr(params, field, value)
        with pytest.raises(ValueError, match=message):
            llm.generate("Once", params, use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=8)
    params.stop = " time"  # one stop string, as if given to the constructor
    assert llm.generate("Once", params, use_tqdm=False)[0].outputs[0].text == \
        llm.generate("Once", SamplingParams(temperature=0, max_tokens=8, stop=" time"), use_tqdm=False)[0].outputs[0].text
    assert all_blocks_free(llm)


def test_stop_strings_and_stop_token_ids(llm):
    stop = llm.generate("Once upon a time, there was a dog named",
                        SamplingParams(temperature=0.0, max_tokens=40, stop=["toys"]), use_tqdm=False)[0]
    assert stop.outputs[0].text == " Max. Max loved to play with his "
    assert (stop.outputs[0].finish_reason, stop.outputs[0].stop_reason) == ("stop", "toys")
    by_id = llm.generate({"prompt_token_ids": [1]}, SamplingParams(temperature=0.0, max_tokens=32,
                         stop_token_ids=[GOLDEN_FROM_BOS[5]]), use_tqdm=False)[0]
    assert by_id.outputs[0].token_ids == GOLDEN_FROM_BOS[:6]
    assert by_id.outputs[0].stop_reason == GOLDEN_FROM_BOS[5]


def test_eos_from_generation_config_ends_generation_unless_ignored(stories_path, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(stories_path, folder)
    eos = GOLDEN_FROM_BOS[5]  # stories260K never emits its own EOS greedily; declare one it does emit
    (folder / "generation_config.json").write_text(f'{{"eos_token_id": [2, {eos}]}}')
    llm = LLM(str(folder), num_blocks=64)
    stopped = llm.generate({"prompt_token_ids": [1]}, GREEDY, use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == GOLDEN_FROM_BOS[:6]
    # vLLM's reading: the generation config's EOS ids other than the tokenizer's are stop tokens,
    # which name themselves as the stop_reason; the tokenizer's own EOS (checked first) has none
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", eos)
    assert llm.engine.primary_eos == 2 and llm.engine.eos_token_ids == {2, eos}
    both = llm.generate({"prompt_token_ids": [1]}, SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[eos]),
                        use_tqdm=False)[0].outputs[0]
    assert (both.token_ids, both.finish_reason, both.stop_reason) == (GOLDEN_FROM_BOS[:6], "stop", eos)
    ignored = llm.generate({"prompt_token_ids": [1]}, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == GOLDEN_FROM_BOS
    assert ignored.finish_reason == "length"


def test_seeded_sampling_is_reproducible_across_batches(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate("Tom and Sue", params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=10 + i) for i in range(5)]
    batch = llm.generate(["A bird sat"] * 5 + ["Tom and Sue"], others + [params], use_tqdm=False)
    assert batch[-1].outputs[0].token_ids == alone
    unseeded = llm.generate(["Tom and Sue"] * 2, SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True),
                            use_tqdm=False)
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids
    # seeds outside uint32 (any int64 or uint64, as vLLM takes) draw reproducibly, each its own way
    wide = [SamplingParams(temperature=1.0, seed=seed, max_tokens=24, ignore_eos=True)
            for seed in (-5, 2**40 + 1234, 2**63 + 5, 0)]
    twice = [llm.generate(["Tom and Sue"] * 4, wide, use_tqdm=False) for _ in range(2)]
    drawn = [tuple(out.outputs[0].token_ids) for out in twice[0]]
    assert drawn == [tuple(out.outputs[0].token_ids) for out in twice[1]] and len(set(drawn + [tuple(alone)])) == 5
    assert SamplingParams(seed=-1).seed is None  # vLLM's "no seed": drawn afresh each time


def test_sampled_request_joining_running_decodes_keeps_its_own_params(llm):
    """A prefill scheduled beside padded decode rows samples with its own params and seed."""
    params = SamplingParams(temperature=1.0, seed=77, max_tokens=12, ignore_eos=True)
    alone = llm.generate("The tree", params, use_tqdm=False)[0].outputs[0].token_ids
    engine = llm.engine
    for i in range(5):  # 5 decode rows pad to 6: the prefill's row is not its sequence index
        engine.add_request(f"decoding-{i}", STORY_STARTS[i], SamplingParams(temperature=0.0, max_tokens=30))
    engine.step()
    engine.add_request("joining", "The tree", params)
    joined = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == "joining":
                joined = out.outputs[0].token_ids
    assert joined == alone
    assert all_blocks_free(llm)


def test_max_model_len_beyond_the_model_is_refused(stories_path, tmp_path):
    with pytest.raises(ValueError, match="max_model_len 513 exceeds the model's limit of 512 tokens"):
        LLM(stories_path, max_model_len=513, num_blocks=8)
    folder = tmp_path / "windowed"
    shutil.copytree(stories_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=128)
    (folder / "config.json").write_text(json.dumps(config))
    windowed = LLM(str(folder), num_blocks=64).engine  # a sliding window does not cap the length
    assert windowed.max_model_len == 512 and set(windowed.model_config.sliding_windows) == {128}


@pytest.mark.parametrize("key", ["num_hidden_layers", "max_position_embeddings", "num_attention_heads", "vocab_size"])
def test_sizes_below_one_are_refused_at_load_naming_the_key(stories_path, key):
    with pytest.raises(ValueError, match=f"config.json's {key} must be >= 1, got 0"):
        LLM(stories_path, hf_overrides={key: 0}, num_blocks=8)


def test_unknown_architecture_and_broken_weights(stories_path, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(stories_path, folder)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*not supported"):
        LLM(str(folder))
    for flag in ("attention_bias", "mlp_bias"):  # HF's Llama then has o_proj / MLP biases too
        (folder / "config.json").write_text(json.dumps({**json.loads(config), flag: True}))
        with pytest.raises(ValueError, match=f"{flag}=True .* is not supported"):
            LLM(str(folder))
    (folder / "config.json").write_text(config)

    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(str(folder))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        LLM(str(folder))
    with pytest.raises(FileNotFoundError, match="neither an HF model folder, a .gguf file nor an HF hub id"):
        LLM(str(tmp_path / "nowhere"))


def test_top_k_beyond_int32_keeps_every_token(llm):
    """A top_k past int32 (any from the vocabulary's size up keeps every token) samples as top_k =
    vocabulary size does, beside another request, instead of failing the step."""
    vocab = llm.engine.model_config.vocab_size
    params = [SamplingParams(temperature=1.0, top_k=k, seed=3, max_tokens=8) for k in (2**31, 2**63, vocab)]
    outputs = llm.generate([STORY_STARTS[0]] * 3, params, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids == outputs[2].outputs[0].token_ids
    assert all_blocks_free(llm)


def test_bfloat16_weights_and_cache(stories_path):
    llm = LLM(stories_path, num_blocks=64, dtype="bfloat16")
    assert llm.engine.runner.kv_cache[0].dtype == "uint16"  # bfloat16 bits on CPU (quantized_kv.empty_cache)
    assert {leaf.dtype for leaf in jax.tree.leaves(llm.engine.runner.state)} == {jnp.dtype("bfloat16")}
    out = llm.generate({"prompt_token_ids": [1]}, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == GOLDEN_FROM_BOS[:16]


HLO_TYPES = {"float32": "f32", "bfloat16": "bf16", "uint16": "u16", "float16": "f16"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_step_updates_the_kv_cache_in_place(llm, stories_path, dtype):
    """XLA's compiled step (prefill and decode) aliases the donated KV cache to its output and
    writes the new tokens' slots without ever copying or converting the cache whole (a bfloat16
    cache is kept as its bits on CPU: XLA widened a bfloat16 one to float32 for every write)."""
    if dtype != "float32":
        llm = LLM(stories_path, num_blocks=256, dtype=dtype)
    runner = llm.engine.runner
    step_args, calls = runner._step_args, []
    runner._step_args = lambda *args: calls.append((step_args(*args), {})) or calls[-1][0]
    try:
        llm.generate(STORY_STARTS[:3], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    finally:
        del runner._step_args
    step = runner._step
    cache = runner.kv_cache[0]
    cache_type = re.escape(f"{HLO_TYPES[cache.dtype.name]}[{','.join(map(str, cache.shape))}]")
    assert {bool((np.asarray(args[2].attention.query_lens) > 1).any()) for args, _ in calls} == {False, True}  # prefills, decodes
    for args, kwargs in calls:
        hlo = step.lower(*args, **kwargs).compile().as_text()
        aliases = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", hlo)
        assert aliases and len(re.findall(r"(may|must)-alias", aliases.group(1))) == 2  # K and V caches
        assert re.search(cache_type + r"\{[\d,]*\} (scatter|dynamic-update-slice)\(", hlo)  # the slot writes
        assert not re.search(cache_type + r"\{[\d,]*\} copy\(", hlo)
        assert not re.search(r"\[" + re.escape(",".join(map(str, cache.shape))) + r"\]\{[\d,]*\} convert\(", hlo)


def test_samples_of_several_requests_never_exceed_max_num_seqs(stories_path):
    """Requests whose samples (n) add up past max_num_seqs wait their turn; every one is served,
    each sample runs, and every block is free after; a request of more samples than max_num_seqs
    starts alone, its samples taking turns (as vLLM serves any n), with the samples it gets on a
    roomier engine."""
    small = LLM(stories_path, num_blocks=64, max_num_seqs=4)
    params = [SamplingParams(temperature=1.0, n=n, max_tokens=5, seed=n) for n in (3, 2, 4, 1)]
    outputs = small.generate(STORY_STARTS[:4], params, use_tqdm=False)
    assert [len(o.outputs) for o in outputs] == [3, 2, 4, 1]
    assert all(len(c.token_ids) == 5 for o in outputs for c in o.outputs)
    assert all_blocks_free(small)
    # admitted before any of them forks, these would make 6 running sequences of 4; each waits
    # instead, and gives what it gives alone (seeded sampling does not depend on the batch)
    for params in (SamplingParams(temperature=1.0, n=2, max_tokens=5, seed=7),
                   SamplingParams(temperature=1.0, best_of=3, max_tokens=5, seed=7)):
        together = small.generate(STORY_STARTS[:3], params, use_tqdm=False)
        alone = [small.generate(prompt, params, use_tqdm=False)[0] for prompt in STORY_STARTS[:3]]
        assert [[c.token_ids for c in o.outputs] for o in together] == [[c.token_ids for c in o.outputs] for o in alone]
        assert all_blocks_free(small)
    wide = dict(temperature=1.0, max_tokens=6, seed=11)
    params = [SamplingParams(n=5, **wide), SamplingParams(n=2, **wide), SamplingParams(best_of=6, n=2, **wide)]
    roomy = LLM(stories_path, num_blocks=64, max_num_seqs=8)
    expected = [[c.token_ids for c in roomy.generate(prompt, sp, use_tqdm=False)[0].outputs]
                for prompt, sp in zip(STORY_STARTS[:3], params)]
    together = small.generate(STORY_STARTS[:3], params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in together] == expected and all_blocks_free(small)
    with pytest.raises(ValueError, match=r"stop_token_ids \[100000\] are outside the vocabulary"):
        small.generate(STORY_STARTS[:1], SamplingParams(stop_token_ids=[100000]), use_tqdm=False)


def test_engine_switches_and_counts_are_checked_before_loading():
    """A switch given as anything but a bool, or a logprob cap below -1, is refused naming it
    (not taken as true, as a non-empty string would be)."""
    from jpaged.llm import engine_config

    for kwargs, message in [({"enable_prefix_caching": "no"}, "enable_prefix_caching must be a bool, got 'no'"),
                            ({"compilation_cache": 0}, "compilation_cache must be a bool, got 0"),
                            ({"compile_warmup": "yes"}, "compile_warmup must be a bool"),
                            ({"attention_interpret": None}, "attention_interpret must be a bool")]:
        with pytest.raises(TypeError, match=message):
            engine_config(None, **kwargs)
    with pytest.raises(ValueError, match=r"max_logprobs must be -1 \(the whole vocabulary\) or >= 0, got -2"):
        engine_config(None, max_logprobs=-2)
    assert engine_config(None, enable_prefix_caching=False, max_logprobs=-1).cache.enable_prefix_caching is False
