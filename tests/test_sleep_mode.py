"""Sleep mode (`LLM.sleep` / `wake_up`; level 2 also in tests/test_load_weights.py): the device
memory of the weights and the KV cache is freed while the engine sleeps, and after waking it
answers as before.

Oracles: jax's own count of the arrays alive on the device (`jax.live_arrays`), and the engine's
own greedy tokens before it slept (themselves checked against HF elsewhere); no step program is
compiled again after waking.
"""

import jax
import pytest

from jpaged import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
PROMPTS = ["Once upon a time", "Lily and Ben went to the park. They", "One day, a little bird"]


def device_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


def tokens(llm) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def llm(stories_path):
    return LLM(stories_path, enable_sleep_mode=True, num_blocks=64, max_num_seqs=4)


def test_sleep_frees_the_weights_and_cache_and_wake_up_answers_as_before(llm):
    runner = llm.engine.runner
    weights = sum(x.nbytes for x in jax.tree.leaves(runner.state))
    cache = sum(x.nbytes for x in jax.tree.leaves(runner.kv_cache))
    expected = tokens(llm)
    compiled = runner.num_compilations
    awake = device_bytes()
    llm.sleep()
    assert llm.engine.is_sleeping() and awake - device_bytes() >= weights + cache
    with pytest.raises(ValueError, match=r"sleeping \(weights and KV cache off the device\): wake it up first"):
        llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    llm.wake_up(["weights"])  # the weights first (to update them), then the cache
    assert llm.engine.is_sleeping() and device_bytes() < awake
    with pytest.raises(ValueError, match=r"the engine is sleeping \(KV cache off the device\)"):
        llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    llm.wake_up(["kv_cache"])
    assert not llm.engine.is_sleeping()
    assert tokens(llm) == expected and runner.num_compilations == compiled
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_sleep_empties_the_prefix_cache(llm):
    prompt = " ".join(PROMPTS * 3)  # several full blocks
    first = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens > 0
    llm.sleep()
    llm.wake_up()
    again = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids


def test_reset_prefix_cache_empties_it_unless_requests_hold_blocks(llm):
    """`LLM.reset_prefix_cache` (vLLM's): True, and the next same prompt finds nothing cached;
    False while a request runs, whose blocks stay cached for the prompts that share them."""
    prompt = " ".join(reversed(PROMPTS)) * 2
    llm.generate(prompt, GREEDY, use_tqdm=False)
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens > 0
    assert llm.reset_prefix_cache() is True
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    llm.engine.add_request("running", prompt, SamplingParams(temperature=0.0, max_tokens=50))
    llm.engine.step()
    assert llm.reset_prefix_cache() is False
    llm.engine.abort_request("running")
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks


def test_refusals_name_the_problem(llm, stories_path):
    llm.engine.add_request("busy", "Once upon a time", GREEDY)
    with pytest.raises(ValueError, match="sleep with 1 unfinished request: finish or abort"):
        llm.sleep()
    llm.engine.abort_request("busy")
    with pytest.raises(ValueError, match=r"sleep level must be 1 .* or 2 .*, got 0"):
        llm.sleep(level=0)
    with pytest.raises(ValueError, match=r"sleep level must be 1 .* or 2 .*, got True"):
        llm.sleep(True)
    with pytest.raises(ValueError, match=r"wake_up tags \['cache'\] are not among"):
        llm.wake_up(["cache"])
    with pytest.raises(ValueError, match=r"wake_up tags must be a list such as \['weights'\], got 'weights'"):
        llm.wake_up("weights")
    with pytest.raises(ValueError, match="with offload_weights 'host' the weights already live in host memory"):
        LLM(stories_path, enable_sleep_mode=True, offload_weights="host")
    assert not llm.engine.is_sleeping()
    with pytest.raises(ValueError, match="enable_sleep_mode=True"):
        LLM(stories_path, num_blocks=16).sleep()
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks


def test_server_sleep_routes(llm):
    """`jpaged serve --enable-sleep-mode`: POST /sleep, GET /is_sleeping, POST /wake_up (vLLM's
    routes); a completion while asleep is a 400, and after waking it is the engine's answer."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from server_thread import serving

    from jpaged.server.launch import create_app

    expected = tokens(llm)[0]
    with serving(create_app(llm.engine, served_model_name="stories")) as url:
        body = {"model": "stories", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
        assert httpx.post(f"{url}/sleep", params={"level": "1"}).status_code == 200
        assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}
        refused = httpx.post(f"{url}/v1/completions", json=body)
        assert refused.status_code == 400 and "sleeping" in refused.json()["error"]["message"]
        for level in ("two", "3", "\u00b2"):
            refused = httpx.post(f"{url}/sleep", params={"level": level})
            assert refused.status_code == 400 and "level" in refused.json()["error"]["message"]
        assert httpx.post(f"{url}/wake_up", params={"tags": ["weights", "kv_cache"]}).status_code == 200
        assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False}
        answer = httpx.post(f"{url}/v1/completions", json={**body, "return_token_ids": True}).json()
        assert answer["choices"][0]["token_ids"] == expected
        assert httpx.post(f"{url}/sleep", params={"level": "2"}).status_code == 200  # the weights discarded
        assert httpx.post(f"{url}/wake_up").status_code == 200  # and read again from the model's files
        answer = httpx.post(f"{url}/v1/completions", json={**body, "return_token_ids": True}).json()
        assert answer["choices"][0]["token_ids"] == expected
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks
