"""The step's compiled programs depend on the configuration alone: a warm-up compiles all of them,
and afterwards a varied stream of requests (lengths, sampling settings, logprobs, penalties, bias,
structured outputs, n, aborts, preemptions) runs without a single new compilation, and with the same tokens as an
engine that compiled as it went."""

from __future__ import annotations

import gc
import random

import jax
import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.padding import StepShapes

WORDS = "the dog cat sun sky ran jumped happy little big tree park ball friend".split()


def varied_requests(seed: int, count: int) -> list[tuple[str, SamplingParams]]:
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120)))
        kind = i % 8
        params = dict(max_tokens=rng.randint(1, 60), seed=i)
        if kind == 1:
            params.update(temperature=0.8, top_p=0.9, top_k=rng.choice([0, 5]))
        elif kind == 2:
            params.update(temperature=0.0, logprobs=rng.randint(0, 5))
        elif kind == 3:
            params.update(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
        elif kind == 4:
            params.update(temperature=0.0, logit_bias={rng.randrange(512): -5.0}, min_tokens=3)
        elif kind == 5:
            params.update(temperature=1.0, n=2, best_of=3)
        elif kind == 6:
            params.update(temperature=0.0, prompt_logprobs=2, stop=["the"])
        elif kind == 7:
            params.update(temperature=0.8, structured_outputs={"regex": r"(the|a) (dog|cat) ran [0-9]{1,9} times"})
        else:
            params.update(temperature=0.0)
        requests.append((prompt, SamplingParams(**params)))
    return requests


def serve(llm: LLM, requests, abort_every: int = 7) -> dict[str, list[list[int]]]:
    """Feed requests a few at a time while stepping, aborting some midway; tokens per request."""
    engine, pending, outputs = llm.engine, list(enumerate(requests)), {}
    steps = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(min(3, len(pending))):
            i, (prompt, params) = pending.pop(0)
            engine.add_request(str(i), prompt, params)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = [c.token_ids for c in out.outputs]
        steps += 1
        if steps % abort_every == 0:
            running = [r for r in list(engine.requests) if r not in outputs]
            if running:
                engine.abort_request(running[0])
                outputs[running[0]] = None
    return outputs


def count_backend_compiles():
    events = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_no_compilation_after_warm_up(stories_path, preemption_mode):
    config = dict(max_model_len=512, num_blocks=28, block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
                  preemption_mode=preemption_mode, compilation_cache=False)
    warm = LLM(stories_path, compile_warmup=True, **config)
    programs = warm.engine.stats().num_compilations
    shapes = StepShapes.for_limits(64, 8, 512, 16, 512)
    samplers = {shapes.num_rows(count) for count in shapes.token_counts}  # two per logits row count
    assert programs == len(shapes.token_counts) + 2 * len(samplers) <= 16 + 2 * 8
    compiles = count_backend_compiles()
    requests = varied_requests(0, 40)
    warm_tokens = serve(warm, requests)
    assert warm.engine.stats().num_compilations == programs
    assert compiles == [], f"{len(compiles)} compilations after the warm-up"
    assert warm.engine.stats().num_preemptions > 0, "the stream should have preempted"
    assert warm.engine.block_manager.num_free_blocks == warm.engine.block_manager.num_blocks

    del warm  # and its programs, which a later engine of this process would otherwise take over
    gc.collect()
    cold = LLM(stories_path, **config)
    assert serve(cold, requests) == warm_tokens
    assert 0 < cold.engine.stats().num_compilations <= programs
    assert compiles, "the listener sees the compilations of an engine that was not warmed up"


def test_a_small_models_quick_compile_gives_the_same_tokens(stories_path, monkeypatch):
    """stories260K's programs compile without LLVM's optimisations (its weights are under
    `QUICK_COMPILE_BELOW`); an engine that compiles them fully gives the same tokens over greedy,
    sampled, penalised and biased requests, and the same logprobs to float32 rounding (code
    generated otherwise may round otherwise)."""
    from jpaged import model_runner

    requests = [(prompt, params) for prompt, params in varied_requests(3, 8) if params.structured_outputs is None]
    for _, params in requests:
        params.logprobs, params.max_tokens = 3, min(params.max_tokens, 24)
    config = dict(max_model_len=256, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=256,
                  compilation_cache=False)

    def run(llm):
        outputs = llm.generate([p for p, _ in requests], [q for _, q in requests], use_tqdm=False)
        samples = [c for out in outputs for c in out.outputs]
        logprobs = [[(i, lp.logprob) for i, lp in step.items()] for c in samples for step in c.logprobs]
        return [c.token_ids for c in samples], [i for step in logprobs for i, _ in step], np.array(
            [value for step in logprobs for _, value in step])

    quick = LLM(stories_path, **config)
    assert quick.engine.runner._step._compiler_options == model_runner.QUICK_COMPILE
    quick_tokens, quick_ids, quick_logprobs = run(quick)
    monkeypatch.setattr(model_runner, "QUICK_COMPILE_BELOW", 0)
    full = LLM(stories_path, **config)
    assert full.engine.runner._step._compiler_options is None
    tokens, ids, logprobs = run(full)
    assert tokens == quick_tokens and ids == quick_ids
    np.testing.assert_allclose(logprobs, quick_logprobs, rtol=0, atol=1e-4)
    assert len({tuple(t) for t in tokens}) > 5


def test_greedy_batches_run_a_smaller_sampler_with_the_same_tokens(stories_path):
    """A batch of greedy rows that want no logprobs samples with the greedy sampler; an engine
    serving only those never compiles the whole sampler, and a greedy request gets the same
    tokens when sampled rows or logprobs put it in a step of the whole sampler."""
    traced = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, fun_name=None, **__: traced.append(fun_name) if event.endswith("jaxpr_trace_duration") else None)
    llm = LLM(stories_path, num_blocks=32, compilation_cache=False)
    prompts = ["Once upon a time", "The little dog", "Lily and Tom went to the park"]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    samplers = [name for name in traced if name and name.startswith("_sample")]
    assert samplers and all(name.startswith("_sample_greedy_") for name in samplers)

    mixed = [greedy, SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.0, logprobs=2, max_tokens=12, ignore_eos=True)]
    outputs = llm.generate(prompts, mixed, use_tqdm=False)
    assert any(name and name.startswith("_sample_") and not name.startswith("_sample_greedy_") for name in traced)
    assert outputs[0].outputs[0].token_ids == alone[0]
    assert outputs[2].outputs[0].token_ids == alone[2]
    assert all(entry[token].logprob < 0 for token, entry in zip(outputs[2].outputs[0].token_ids,
                                                                 outputs[2].outputs[0].logprobs))
