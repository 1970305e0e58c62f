"""Profiler traces (`LLM.start_profile` / `stop_profile`, vLLM's; `jpaged serve --profiler-dir`).

Oracle: the trace as jax's profiler writes it, read back: its Perfetto / Chrome JSON holds the
engine's step program and the ops it ran.
"""

import gzip
import json
from pathlib import Path

import pytest

from jpaged import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def trace_events(folder) -> list[str]:
    traces = list(folder.glob("plugins/profile/*/*.trace.json.gz"))
    assert len(traces) == 1 and list(folder.glob("plugins/profile/*/*.xplane.pb"))
    return [event.get("name", "") for event in json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]]


@pytest.fixture(scope="module")
def llm(stories_path, tmp_path_factory):
    return LLM(stories_path, profiler_dir=str(tmp_path_factory.mktemp("profiles")), num_blocks=32, max_num_seqs=4)


def test_a_trace_holds_the_engines_steps(llm):
    llm.generate("Once upon a time", GREEDY, use_tqdm=False)  # compiled before the trace
    folder = llm.start_profile("decode")
    llm.generate("Once upon a time", GREEDY, use_tqdm=False)
    assert llm.stop_profile() == folder and folder.name == "decode"
    names = trace_events(folder)
    assert any(name.startswith("PjitFunction(jit(_step_fn") for name in names)  # the step program
    assert any(name.startswith("PjitFunction(jit(_sample") for name in names)  # and the sampler's
    assert any(name.endswith("_fusion") for name in names)  # the XLA ops they ran
    assert llm.start_profile().name.startswith("profile-")  # the time as the default name
    assert trace_events(llm.stop_profile())


def test_refusals_name_the_problem(llm, stories_path):
    with pytest.raises(ValueError, match=r"profiler_dir=FOLDER \(--profiler-dir\)"):
        LLM(stories_path, num_blocks=16).start_profile()
    with pytest.raises(ValueError, match="no profile is running"):
        llm.stop_profile()
    for prefix in ("a/b", "..", "", 3):
        with pytest.raises(ValueError, match="profile prefix must be a folder name"):
            llm.start_profile(prefix)
    llm.start_profile("first")
    with pytest.raises(ValueError, match="a profile is already running .*first.*: stop_profile first"):
        llm.start_profile("second")
    llm.stop_profile()
    with pytest.raises(ValueError, match="first already holds a trace: give start_profile another prefix"):
        llm.start_profile("first")
    first, second = llm.start_profile(), llm.stop_profile()
    assert first == second and llm.start_profile() != first  # default names never repeat
    llm.stop_profile()
    a_file = Path(llm.engine.profiler_dir) / "a-file"
    a_file.write_text("not a folder")
    writes_nowhere = LLM(stories_path, num_blocks=16, profiler_dir=str(a_file))
    with pytest.raises(ValueError, match="cannot trace into .*a-file/x"):
        writes_nowhere.start_profile("x")
    assert trace_events(llm.start_profile("after") and llm.stop_profile())  # the profiler still works
    with pytest.raises(ValueError, match="profiler_dir must be a folder, got ''"):
        LLM(stories_path, num_blocks=16, profiler_dir="")


def test_server_profile_routes(llm, stories_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from server_thread import serving

    from jpaged.server.launch import create_app

    with serving(create_app(llm.engine, served_model_name="stories")) as url:
        assert httpx.post(f"{url}/start_profile").status_code == 200
        refused = httpx.post(f"{url}/start_profile")
        assert refused.status_code == 400 and "already running" in refused.json()["error"]["message"]
        body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        assert httpx.post(f"{url}/stop_profile").status_code == 200
        assert httpx.post(f"{url}/stop_profile").status_code == 400
    assert any(trace_events(folder) for folder in Path(llm.engine.profiler_dir).glob("profile-*"))
    with serving(create_app(LLM(stories_path, num_blocks=16).engine, served_model_name="stories")) as url:
        assert httpx.post(f"{url}/start_profile").status_code == 404  # no --profiler-dir: no routes
