"""Decoder layers streamed onto the device in every step (`offload_weights`): with every layer, half
of them and none offloaded, from host memory and from memory-mapped files, the same greedy tokens
and logprobs on a random Llama, a random Mixtral and the trained stories260K, and under tensor
parallelism on two emulated devices; the device holds no more than the budget, the KV cache and two
layers; bad settings are clear errors."""

import gc
import os

import jax
import numpy as np
import pytest

from jpaged import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(intermediate_size=128, num_hidden_layers=6, **SMALL),
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=32, num_hidden_layers=4, num_local_experts=4,
                                                  num_experts_per_tok=2, sliding_window=None, **SMALL),
}
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)


def prompts(vocab_size: int) -> list[dict]:
    rng = np.random.default_rng(11)
    return [{"prompt_token_ids": rng.integers(3, vocab_size, n).tolist()} for n in (19, 4, 33)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, stories_path):
    from hf_models import save_random_model

    out = {"stories": stories_path}
    for name, config in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        save_random_model(folder, config(), seed=7)
        out[name] = str(folder)
    return out


def run(folder: str, **kwargs) -> dict:
    llm = LLM(folder, dtype="float32", num_blocks=40, max_num_batched_tokens=64, **kwargs)
    vocab = llm.engine.model_config.vocab_size
    outputs = llm.generate(prompts(vocab), PARAMS, use_tqdm=False)
    manager = llm.engine.block_manager
    return {"tokens": [o.outputs[0].token_ids for o in outputs],
            "logprobs": [[sorted((t, lp.logprob, lp.rank) for t, lp in step.items()) for step in o.outputs[0].logprobs] for o in outputs],
            "stats": llm.engine.stats(), "blocks_leaked": manager.num_blocks - manager.num_free_blocks}


@pytest.mark.parametrize("model", ["llama", "mixtral", "stories"])
def test_offloaded_layers_give_the_same_tokens_and_logprobs(folders, model):
    resident = run(folders[model])
    everything = run(folders[model], offload_weights="host")
    stats = everything["stats"]
    num_layers = stats.num_streamed_layers
    assert stats.num_resident_layers == 0 and num_layers >= 2 and resident["stats"].num_streamed_layers == 0
    layer_bytes = stats.offloaded_weight_bytes // num_layers
    assert stats.streamed_bytes_per_step == stats.offloaded_weight_bytes
    assert stats.weight_bytes + stats.offloaded_weight_bytes == resident["stats"].weight_bytes
    half = (stats.weight_bytes + num_layers // 2 * layer_bytes) / 2**30
    runs = {"all, host": everything, "all, disk": run(folders[model], offload_weights="disk"),
            "half, host": run(folders[model], offload_weights="host", device_weight_budget_gib=half),
            "half, disk": run(folders[model], offload_weights="disk", device_weight_budget_gib=half)}
    assert len({t for tokens in resident["tokens"] for t in tokens}) > 5
    for name, got in runs.items():
        assert got["tokens"] == resident["tokens"], name
        assert got["logprobs"] == resident["logprobs"], name
        assert got["blocks_leaked"] == 0, name
        assert got["stats"].streamed_bytes >= got["stats"].streamed_bytes_per_step > 0, name
    assert runs["half, disk"]["stats"].num_resident_layers == num_layers // 2


@pytest.mark.parametrize(("model", "quantization"), [("llama", "int8"), ("mixtral", "fp8")])
def test_quantized_layers_stream_as_they_are_kept(folders, model, quantization):
    """int8 / fp8 values and their scales are what streams: a quarter of float32's bytes, and the
    tokens and logprobs of the same quantized model kept whole on the device."""
    resident = run(folders[model], quantization=quantization)
    streamed = run(folders[model], quantization=quantization, offload_weights="host")
    float_streamed = run(folders[model], offload_weights="disk")["stats"]
    assert streamed["tokens"] == resident["tokens"] and streamed["logprobs"] == resident["logprobs"]
    assert streamed["blocks_leaked"] == 0
    assert streamed["stats"].streamed_bytes_per_step < 0.3 * float_streamed.streamed_bytes_per_step


def test_packed_gguf_layers_stream_as_their_blocks(model_path):
    """The default model's GGUF blocks kept packed stream as they are (the packed model is 92 MiB
    against float32's 513), with the resident packed model's greedy tokens and logprobs (to 1e-5)."""
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)
    prompt = {"prompt_token_ids": [1, 504, 3458, 282, 4649, 314, 253, 1345, 30]}
    runs = {}
    for name, offload in (("resident", {}), ("streamed", dict(offload_weights="host"))):
        llm = LLM(model_path, quantization="gguf", max_model_len=64, num_blocks=16, **offload)
        out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        runs[name] = (out.token_ids, out.logprobs, llm.engine.stats())
        del llm
        gc.collect()
    # the same tokens; logprobs to float rounding (XLA fuses the per-layer programs' elementwise
    # work differently from the one-program step's on this model)
    assert runs["streamed"][0] == runs["resident"][0]
    for got, expected in zip(runs["streamed"][1], runs["resident"][1]):
        assert got.keys() == expected.keys()
        np.testing.assert_allclose([got[t].logprob for t in got], [expected[t].logprob for t in got], atol=1e-5)
    streamed, resident = runs["streamed"][2], runs["resident"][2]
    assert streamed.num_streamed_layers == 30 and streamed.streamed_bytes_per_step == streamed.offloaded_weight_bytes
    assert streamed.weight_bytes + streamed.offloaded_weight_bytes == resident.weight_bytes < 100 * 2**20  # packed


def live_device_bytes(exclude: set[int]) -> int:
    return sum(x.nbytes for x in jax.live_arrays()
               if id(x) not in exclude and x.sharding.memory_kind in (None, "device"))


def test_a_model_over_the_budget_serves_within_budget_kv_cache_and_two_layers(folders):
    gc.collect()
    before = {id(x) for x in jax.live_arrays()}
    whole = run(folders["llama"])["stats"].weight_bytes
    gc.collect()
    probe = LLM(folders["llama"], dtype="float32", num_blocks=40, offload_weights="host").engine.stats()
    layer_bytes = probe.offloaded_weight_bytes // probe.num_streamed_layers
    budget = probe.weight_bytes + layer_bytes  # the embeddings and LM head, and one layer
    del probe
    gc.collect()
    llm = LLM(folders["llama"], dtype="float32", num_blocks=40, max_num_batched_tokens=64, offload_weights="disk",
              device_weight_budget_gib=budget / 2**30)
    runner = llm.engine.runner
    assert llm.engine.stats().num_resident_layers == 1 and llm.engine.stats().weight_bytes <= budget
    peaks = []

    class Measured:  # the layer program, with the live device bytes taken before each run
        def __init__(self, program):
            self.program = program

        def __call__(self, *args):
            peaks.append(live_device_bytes(before))
            return self.program(*args)

        def __getattr__(self, name):
            return getattr(self.program, name)

    runner._layer = Measured(runner._layer)
    outputs = llm.generate(prompts(128), PARAMS, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == PARAMS.max_tokens for o in outputs)
    # between steps: the resident weights, the KV cache and the step arrays the runner keeps
    between_steps = live_device_bytes(before)
    assert between_steps <= budget + runner.kv_cache_bytes + 1.5 * 2**20
    in_flight = 128 * 2**10  # one step's own arrays: token ids, hidden states, logits
    assert in_flight < layer_bytes and whole > budget + 2 * layer_bytes  # the check can fail
    assert len(peaks) > 6 and max(peaks) <= between_steps + 2 * layer_bytes + in_flight


def test_bad_offload_settings_are_clear_errors(folders):
    with pytest.raises(ValueError, match=r"smaller than one decoder layer \(0\.\d+ MiB"):
        LLM(folders["llama"], dtype="float32", num_blocks=8, offload_weights="host", device_weight_budget_gib=1e-6)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 and expert_parallel_size=1 must be 1"):
        LLM(folders["llama"], offload_weights="disk", pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="offload_weights must be None, 'host' or 'disk', got 'gpu'"):
        LLM(folders["llama"], offload_weights="gpu")
    with pytest.raises(ValueError, match=r"device_weight_budget_gib=1\.0 needs offload_weights"):
        LLM(folders["llama"], device_weight_budget_gib=1.0)
    for budget in (float("inf"), "1", True, -2.0, float("nan")):
        with pytest.raises(ValueError, match=r"device_weight_budget_gib must be a positive, finite number of GiB, got"):
            LLM(folders["llama"], offload_weights="host", device_weight_budget_gib=budget)


def test_a_budget_that_holds_every_layer_streams_nothing(folders):
    plain = run(folders["llama"])["stats"]
    roomy = run(folders["llama"], offload_weights="host", device_weight_budget_gib=1.0)["stats"]
    assert roomy.num_streamed_layers == 0 and roomy.num_resident_layers == plain.num_resident_layers == 6
    assert roomy.num_compilations == plain.num_compilations and roomy.weight_bytes == plain.weight_bytes


def mine(offload) -> list:
    """This process's offload folders (other test processes may be loading beside it)."""
    return [f for f in offload.iterdir() if f.name.startswith(f"{os.getpid()}-")]


def test_disk_files_unlinked_after_loading_and_orphans_removed(folders, monkeypatch):
    """The files are unlinked once loaded (their maps keep them); a folder left by a process that
    no longer runs is removed; a full disk is a clear error that leaves nothing behind."""
    from jpaged.cache_dir import cache_dir

    offload = cache_dir() / "offload"
    orphan = offload / "999999999-leftover"
    orphan.mkdir(parents=True, exist_ok=True)
    (orphan / "layers.0.q_proj.bin").write_bytes(b"x" * 64)
    llm = LLM(folders["llama"], dtype="float32", num_blocks=16, offload_weights="disk")
    assert not orphan.exists() and not mine(offload)
    out = llm.generate(prompts(128)[:1], PARAMS, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == PARAMS.max_tokens

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", no_space)
    with pytest.raises(OSError, match=r"offload_weights='disk': no room for \d+\.\d MiB more in .*No space left"):
        LLM(folders["llama"], dtype="float32", num_blocks=16, offload_weights="disk")
    assert not mine(offload)


def logprob_values(logprobs) -> list[list[list[float]]]:
    """[request][step][rank] logprobs, the token ids checked equal."""
    return [[[value for _, value, _ in step] for step in request] for request in logprobs]


@pytest.mark.full  # 8 emulated devices in a subprocess
def test_tensor_parallel_shards_stream_their_slices(run_device_check):
    report = run_device_check("offload_check.py")
    for model, runs in report.items():
        single = runs["1, none"]["tokens"]
        for name, got in runs.items():
            assert got["tokens"] == single, (model, name)
            # streamed or not, the same layout gives the same logprobs (to float rounding under TP:
            # the per-layer programs' all-reduces are scheduled apart from the one-program step's)
            expected = runs[f"{name[0]}, none"]["logprobs"]
            np.testing.assert_allclose(logprob_values(got["logprobs"]), logprob_values(expected), atol=1e-5,
                                       err_msg=f"{model}, {name}")
            if name[0] == "1":
                assert got["logprobs"] == expected, (model, name)
        assert runs["2, all host"]["num_streamed_layers"] > 0
    llama = report["llama"]
    # each device receives its share of a layer, not the whole layer
    assert llama["2, all host"]["streamed_bytes_per_step"] < 0.75 * llama["1, all host"]["streamed_bytes_per_step"]
    assert 0 < llama["2, half disk"]["num_streamed_layers"] < llama["2, all host"]["num_streamed_layers"]
