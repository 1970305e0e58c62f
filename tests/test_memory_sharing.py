"""Memory sharing end to end: prefix caching, parallel sampling with copy-on-write, swap
preemption, and the sampling parameters that ride on them (logprobs, penalties), with metrics."""

import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.sampling_params import derive_seed

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big red ball.")
ENDINGS = [" Lily", " The ball", " She was happy", " Her mom", " A dog", " Then", " The sun", " Tim"]


def greedy(max_tokens=24):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def token_lists(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def all_blocks_free(llm) -> bool:
    manager = llm.engine.block_manager
    manager.check_invariants()
    return manager.num_free_blocks == manager.num_blocks and not any(manager.ref_counts)


def test_prefix_caching_reuses_shared_prefix_and_changes_nothing(stories_path):
    prompts = [STORY + ending for ending in ENDINGS]
    cached = LLM(stories_path, num_blocks=128)
    first = cached.generate(prompts[0], greedy(), use_tqdm=False)
    before = cached.engine.stats().num_prompt_tokens_computed
    rest = cached.generate(prompts[1:], greedy(), use_tqdm=False)
    computed = cached.engine.stats().num_prompt_tokens_computed - before

    plain = LLM(stories_path, num_blocks=128, enable_prefix_caching=False)
    expected = plain.generate(prompts, greedy(), use_tqdm=False)
    assert token_lists(first + rest) == token_lists(expected)

    tokenizer = cached.get_tokenizer()
    lengths = [len(tokenizer.encode(p)) for p in prompts[1:]]
    shared = len(tokenizer.encode(STORY)) // 16 * 16  # full blocks of the common story
    assert computed <= sum(lengths) - len(lengths) * (shared - 16)
    assert computed < sum(lengths)
    hits = [o.num_cached_tokens for o in rest]
    assert hits == [o.metrics.num_cached_prompt_tokens for o in rest]
    assert all(h >= shared - 16 and h % 16 == 0 for h in hits)
    assert cached.engine.stats().prefix_cache_hit_rate > 0.5
    assert all_blocks_free(cached)


def test_eviction_under_memory_pressure_keeps_outputs_right(stories_path):
    prompts = [f"{ending.strip()} went to the park. " * 3 + STORY for ending in ENDINGS] * 2
    tight = LLM(stories_path, num_blocks=40, max_num_seqs=4)
    plain = LLM(stories_path, num_blocks=256, enable_prefix_caching=False)
    assert token_lists(tight.generate(prompts, greedy(), use_tqdm=False)) == token_lists(
        plain.generate(prompts, greedy(), use_tqdm=False))
    assert all_blocks_free(tight)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_modes_give_unpreempted_outputs(stories_path, mode):
    prompts = [STORY[: 20 + 7 * i] for i in range(12)]
    params = [greedy(30 + 5 * (i % 4)) for i in range(12)]
    roomy = LLM(stories_path, num_blocks=512, enable_prefix_caching=False)
    expected = token_lists(roomy.generate(prompts, params, use_tqdm=False))
    tight = LLM(stories_path, num_blocks=24, enable_prefix_caching=False, preemption_mode=mode,
                swap_space_gib=0.01)
    assert token_lists(tight.generate(prompts, params, use_tqdm=False)) == expected
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0
    assert (stats.num_swap_outs > 0) == (mode == "swap")
    assert all_blocks_free(tight)
    assert tight.engine.block_manager.num_free_host_blocks == tight.engine.block_manager.num_host_blocks


def test_parallel_samples_share_prompt_blocks_and_copy_on_write(stories_path):
    llm = LLM(stories_path, num_blocks=128)
    engine = llm.engine
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)
    engine.add_request("fan", STORY, params)
    engine.step()  # prefill: the first sample is drawn and the other two fork from it
    request = engine.requests["fan"]
    assert len(request.seqs) == 3
    prompt_blocks = request.seqs[0].block_table[:-1]
    assert [engine.block_manager.ref_counts[b] for b in prompt_blocks] == [3] * len(prompt_blocks)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    samples = [c.token_ids for c in outputs[0].outputs]
    assert len({tuple(s) for s in samples}) == 3
    assert all_blocks_free(llm)
    # Each sample equals a single request drawing with that sample's seed: no sibling's writes leaked.
    for index, sample in enumerate(samples):
        alone = SamplingParams(temperature=1.0, seed=derive_seed(7, index), max_tokens=20, ignore_eos=True)
        assert llm.generate(STORY, alone, use_tqdm=False)[0].outputs[0].token_ids == sample
    again = llm.generate([STORY, "Tom and Sue"], [params, greedy()], use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == samples


def test_best_of_returns_the_most_likely_samples(stories_path):
    llm = LLM(stories_path, num_blocks=128)
    out = llm.generate(STORY, SamplingParams(n=2, best_of=5, temperature=1.0, seed=3, max_tokens=12,
                                             ignore_eos=True, logprobs=0), use_tqdm=False)[0]
    assert len(out.outputs) == 2
    scores = [c.cumulative_logprob for c in out.outputs]
    assert scores[0] >= scores[1]
    for completion in out.outputs:
        per_token = [entry[token].logprob for entry, token in zip(completion.logprobs, completion.token_ids)]
        assert completion.cumulative_logprob == pytest.approx(sum(per_token), abs=1e-4)
    all_five = llm.generate([STORY] * 5, [SamplingParams(temperature=1.0, seed=derive_seed(3, i), max_tokens=12,
                                                   ignore_eos=True, logprobs=0) for i in range(5)], use_tqdm=False)
    best = sorted((o.outputs[0].cumulative_logprob for o in all_five), reverse=True)[:2]
    assert scores == pytest.approx(best, abs=1e-4)


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from hf_models import save_random_model

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("llama_for_logprobs")
    model = save_random_model(folder, config, seed=11)
    return model, LLM(str(folder), num_blocks=64, dtype="float32")


def test_logprobs_and_prompt_logprobs_match_hf(random_llama):
    from hf_models import hf_logits

    model, llm = random_llama
    prompt = np.random.default_rng(5).integers(3, 96, 21).tolist()
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    tokens = out.outputs[0].token_ids
    logits = hf_logits(model, prompt + tokens)
    logprobs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    for step, (token, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        row = logprobs[len(prompt) - 1 + step]
        top3 = np.argsort(-row)[:3].tolist()
        assert set(entry) == {token, *top3} and next(iter(entry)) == token  # the chosen token first
        for candidate, value in entry.items():
            assert value.logprob == pytest.approx(row[candidate], abs=1e-4)
            assert value.rank == int((row >= row[candidate]).sum())  # vLLM's rank, from HF's logits
    assert out.prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entry, row = out.prompt_logprobs[position], logprobs[position - 1]
        chosen = entry[prompt[position]]
        assert chosen.logprob == pytest.approx(row[prompt[position]], abs=1e-4)
        assert chosen.rank == int((row >= row[prompt[position]]).sum())
        assert set(entry) == {prompt[position], *np.argsort(-row)[:2].tolist()}


def test_repetition_penalty_matches_hf_generate(random_llama):
    import torch
    from hf_models import torch_single_thread

    model, llm = random_llama
    prompt = np.random.default_rng(9).integers(3, 96, 12).tolist()
    ours = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.5), use_tqdm=False)[0]
    with torch.no_grad(), torch_single_thread():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=1.5)
    assert ours.outputs[0].token_ids == theirs[0, len(prompt):].tolist()


def test_request_metrics(stories_path):
    llm = LLM(stories_path, num_blocks=64)
    out = llm.generate(STORY, greedy(10), use_tqdm=False)[0]
    metrics = out.metrics
    assert metrics.num_output_tokens == 10
    assert 0 < metrics.time_to_first_token <= metrics.finished_time - metrics.arrival_time
    assert metrics.time_per_output_token > 0
    stats = llm.engine.stats()
    assert stats.num_generated_tokens == 10 and stats.kv_cache_usage == 0.0


def test_get_metrics_reads_back_what_the_requests_did(stories_path):
    """`LLM.get_metrics()` as vLLM documents it: a counter, gauge or histogram object per metric
    (names as the server's `/metrics`, counters without `_total`); counters match the outputs'
    token counts, each latency histogram observed every finished request (its `"+Inf"` bucket
    equal to its count, buckets cumulative) and the TTFT sum is the outputs' own; the same
    metrics' text exposition (the server's `/metrics`), read by prometheus_client's parser, holds
    the same values."""
    from prometheus_client.parser import text_string_to_metric_families

    from jpaged.metrics import Counter, Gauge, Histogram, Metrics

    with pytest.raises(ValueError, match="disable_log_stats=False"):
        LLM(stories_path, num_blocks=64).get_metrics()
    llm = LLM(stories_path, num_blocks=64, disable_log_stats=False)
    fresh = {m.name: m for m in llm.get_metrics() if isinstance(m, Histogram)}  # there from the start, as vLLM's
    assert len(fresh) == 3 and all(m.count == 0 == m.buckets["+Inf"] for m in fresh.values())
    outputs = llm.generate([STORY, "Once upon a time"], [greedy(10), greedy(6)], use_tqdm=False)
    prompt_tokens = next(m.value for m in llm.get_metrics() if m.name == "jpaged:prompt_tokens")
    assert prompt_tokens == sum(len(out.prompt_token_ids) - out.num_cached_tokens for out in outputs)
    outputs += llm.generate("The cat", SamplingParams(n=2, max_tokens=3, ignore_eos=True), use_tqdm=False)
    llm.engine.abort_request(llm.enqueue("Lily", greedy(4))[0])
    assert llm.wait_for_completion(use_tqdm=False) == []
    metrics = {(m.name, tuple(sorted(m.labels.items()))): m for m in llm.get_metrics()}
    labels = (("model_name", llm.engine.model_name),)
    by_name = {name: m for (name, key), m in metrics.items() if key == labels}

    generated = sum(len(sample.token_ids) for out in outputs for sample in out.outputs)
    assert isinstance(by_name["jpaged:generation_tokens"], Counter)
    assert by_name["jpaged:generation_tokens"].value == generated == 22
    assert by_name["jpaged:prompt_tokens"].value > prompt_tokens
    assert isinstance(by_name["jpaged:num_requests_running"], Gauge) and by_name["jpaged:num_requests_running"].value == 0
    assert by_name["jpaged:kv_cache_usage_perc"].value == 0.0
    finished = {dict(key)["finished_reason"]: m.value for (name, key), m in metrics.items()
                if name == "jpaged:request_success"}
    assert finished == {"length": 4, "stop": 0, "abort": 1}  # each of n samples counts, as vLLM's child requests
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        histogram = by_name[f"jpaged:{name}"]
        assert isinstance(histogram, Histogram) and histogram.count == 3 == histogram.buckets["+Inf"]
        counts = list(histogram.buckets.values())
        assert counts == sorted(counts)
    ttft = by_name["jpaged:time_to_first_token_seconds"]
    assert ttft.sum == pytest.approx(sum(out.metrics.time_to_first_token for out in outputs))

    server_side = Metrics(llm.engine.model_name)  # what a server that ran these requests would serve
    for out in outputs:
        server_side.observe_finished(out)
    server_side.observe_aborted("the aborted one")
    text = server_side.render(llm.engine.stats()).decode()
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):  # creation timestamps, which vLLM's reader leaves out too
            continue
        for sample in family.samples:
            labels_of = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            metric = metrics[(family.name, labels_of)]
            if sample.name.endswith("_bucket"):
                assert metric.buckets[sample.labels["le"]] == sample.value
            elif sample.name.endswith("_sum"):
                assert metric.sum == pytest.approx(sample.value)
            elif not sample.name.endswith("_created"):
                assert getattr(metric, "count" if sample.name.endswith("_count") else "value") == sample.value


def test_enqueued_requests_run_at_wait_for_completion(stories_path):
    """vLLM's `enqueue` / `enqueue_chat` / `wait_for_completion`: requests wait until asked for,
    then give `generate`'s and `chat`'s outputs, in the order enqueued; `generate` will not
    swallow them; an aborted one has no output; every block is free afterwards."""
    llm = LLM(stories_path, num_blocks=64)
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    conversation = [{"role": "user", "content": "The dog ran"}]
    prompts = [STORY, "Once upon a time"]
    expected = llm.generate(prompts, [greedy(10), greedy(6)], use_tqdm=False)
    expected_chat = llm.chat(conversation, greedy(5), use_tqdm=False, chat_template=template)
    first = llm.enqueue(prompts, [greedy(10), greedy(6)])
    dropped = llm.enqueue("Lily", greedy(4))
    second = llm.enqueue_chat(conversation, greedy(5), chat_template=template)
    assert len(first) == 2 and len({*first, *dropped, *second}) == 4
    assert llm.engine.get_num_unfinished_requests() == 4 and llm.engine.stats().num_generated_tokens == 16 + 5
    with pytest.raises(RuntimeError, match="4 requests added by enqueue wait: wait_for_completion"):
        llm.generate("Lily", greedy(2), use_tqdm=False)
    llm.engine.abort_request(dropped[0])
    outputs = llm.wait_for_completion(use_tqdm=False)
    assert [out.request_id for out in outputs] == first + second
    assert [out.outputs[0].token_ids for out in outputs] == [out.outputs[0].token_ids for out in expected + expected_chat]
    assert outputs[2].prompt == expected_chat[0].prompt
    assert llm.wait_for_completion(use_tqdm=False) == []
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    with pytest.raises(ValueError, match="prompt 1"):
        llm.enqueue(["fine", {"prompt_token_ids": []}])
    assert llm.engine.get_num_unfinished_requests() == 0 and llm.wait_for_completion(use_tqdm=False) == []
    llm.engine.add_request("by hand", "Lily", greedy(2))  # its output would be swallowed: refused
    with pytest.raises(RuntimeError, match="enqueue: the engine holds 1 unfinished requests added through"):
        llm.enqueue("Lily", greedy(2))
    llm.engine.abort_request("by hand")
    for request_id in llm.enqueue(["A", "B"], greedy(2)):  # all aborted: nothing waits any more
        llm.engine.abort_request(request_id)
    assert len(llm.generate("Lily", greedy(2), use_tqdm=False)) == 1


def test_logprobs_are_vllm_logprob_objects(stories_path):
    """Each position's entry maps token ids to `Logprob` (vLLM's fields): greedy picks rank 1, the
    top ones are ranked 1..k, and the chosen tokens' decoded texts, joined, are the output text."""
    from jpaged import Logprob

    llm = LLM(stories_path, num_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)
    out = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    assert len(out.logprobs) == len(out.token_ids) == 16
    for token, entry in zip(out.token_ids, out.logprobs):
        assert all(isinstance(value, Logprob) for value in entry.values())
        assert entry[token].rank == 1 and sorted(value.rank for value in entry.values()) == [1, 2, 3]
        for candidate, value in entry.items():
            assert value.decoded_token.strip() == tokenizer.decode([candidate]).strip()
    assert "".join(entry[token].decoded_token for token, entry in zip(out.token_ids, out.logprobs)) == out.text
