"""Pipeline, expert, tensor and data parallel layouts on 8 emulated CPU devices (a subprocess owns that
jax setup): every layout gives the single-device tokens, each device holds its share, and the
pipeline's stages overlap as the micro-batch count grows."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jpaged import LLM
from jpaged.step_batch import split_micro_batches

pytest.importorskip("transformers")
MODELS = ("llama", "mixtral", "qwen3_moe", "gpt_oss")  # the check's models; it owns their layouts


def layouts(report, model) -> list[tuple[int, ...]]:
    """`(tp, pp, ep, dp)` of each layout the check ran `model` with, single device first."""
    runs = [tuple(map(int, key.split("/")[1].split("x"))) for key in report["generate"]
            if key.split("/")[0] == model and key.split("/")[1][0].isdigit()]
    assert runs[0] == (1, 1, 1, 1) and len(runs) >= 2
    return runs


@pytest.fixture(scope="module")
def report(run_device_check):
    return run_device_check("parallel_layouts_check.py")


@pytest.mark.parametrize("model", MODELS)
def test_every_layout_gives_the_single_device_tokens(report, model):
    runs = report["generate"]
    single = runs[f"{model}/1x1x1x1"]["tokens"]
    assert len({t for tokens in single for t in tokens}) > 6
    for layout in layouts(report, model)[1:]:
        assert runs[f"{model}/{'x'.join(map(str, layout))}"]["tokens"] == single, f"tp, pp, ep, dp = {layout}"


def test_apply_model_runs_in_every_replica(report):
    """`LLM.apply_model` under data parallelism: one result per replica, each from the model on
    that replica's own devices, all holding the same weights."""
    runs = [run for key, run in report["generate"].items() if "replica_embeddings" in run]
    assert len(runs) == 2  # llama 2x1x1x4, mixtral 1x1x2x2
    for run in runs:
        devices = [tuple(ids) for ids, _ in run["replica_embeddings"]]
        assert len(devices) == len(run["generated_per_replica"]) and len(set(devices)) == len(devices)
        assert len({digest for _, digest in run["replica_embeddings"]}) == 1


@pytest.mark.parametrize("model", ("mixtral", "gpt_oss"))
def test_int8_layouts_give_the_single_device_int8_tokens(report, model):
    """Quantized weights and KV cache, values and scales split with the layout (tp x pp x ep): the
    same tokens as one device with the same quantization, and each device holds a share."""
    runs = report["generate"]
    single, split = runs[f"{model}/int8-1x1x1x1"], runs[f"{model}/int8-2x2x2x1"]
    assert split["tokens"] == single["tokens"]
    assert max(split["param_bytes"]) < 0.6 * sum(single["param_bytes"])
    assert sum(single["param_bytes"]) < 0.4 * runs[f"{model}/1x1x1x1"]["model_bytes"]
    assert max(split["kv_cache_bytes"]) == sum(single["kv_cache_bytes"]) // 4  # tp 2 x pp 2


def test_loaded_weights_give_the_single_device_loaded_tokens(report):
    """`LLM.load_weights` under tensor x pipeline, tensor x data and tensor x pipeline x expert
    layouts, int8 included: the new tensors split as the model's own, so every layout gives one
    device's tokens after the load, and one device gives HF's tokens of the new model (llama)."""
    runs = report["generate"]
    loaded = {key: run["loaded_tokens"] for key, run in runs.items() if "loaded_tokens" in run}
    assert len(loaded) == 7
    for key, tokens in loaded.items():
        model, layout = key.split("/")
        single = loaded[f"{model}/{'int8-' if layout.startswith('int8') else ''}1x1x1x1"]
        assert tokens == single, key
        assert tokens != runs[key]["tokens"], key  # not the model's own tokens
    assert loaded["llama/1x1x1x1"] == runs["llama/hf-loaded"]


def test_pipeline_under_preemption_gives_the_same_tokens_and_frees_every_block(report):
    runs = report["generate"]
    preempted = runs["llama/preempted"]
    assert preempted["num_preemptions"] > 0
    assert preempted["tokens"] == runs["llama/1x1x1x1"]["tokens"]
    assert preempted["blocks_leaked"] == 0
    for model in MODELS:
        for layout in layouts(report, model):
            assert runs[f"{model}/{'x'.join(map(str, layout))}"]["blocks_leaked"] == 0, (model, layout)


def test_one_prompt_cut_into_micro_batches_gives_the_same_tokens(report):
    split = report["generate"]["llama/one-prompt-split"]
    assert split["pp4"] == split["single"]


def test_data_parallel_replicas_abort_and_free_their_blocks(report):
    runs = report["generate"]
    run, single = runs["llama/replica-abort"], runs["llama/1x1x1x1"]["tokens"]
    assert "r1" not in run["seen_after_abort"] and sorted(run["finished"]) == ["r0", "r2", "r3", "r4"]
    assert [run["finished"][f"r{i}"] for i in (0, 2, 3, 4)] == [single[i] for i in (0, 2, 3, 4)]
    assert "request id 'r0' is already in use" in run["duplicate_error"]
    assert run["blocks_leaked"] == [0, 0] and all(run["requests_per_replica"])


def test_beam_search_on_data_parallel_replicas_gives_one_device_beams(report):
    beams = report["generate"]["llama/beam-replicas"]
    assert beams["dp2"]["beams"] == beams["single"]["beams"]
    assert len(beams["single"]["beams"]) == 3 and all(len(b) == 3 for b in beams["single"]["beams"])
    assert beams["dp2"]["blocks_leaked"] == beams["single"]["blocks_leaked"] == 0


def test_lora_adapters_under_data_and_tensor_parallelism_give_one_device_tokens(report):
    """Every other prompt through a LoRA adapter: two replicas, two tensor-parallel shards and both
    give one device's tokens (which tests/test_lora.py checks against PEFT); the base prompts keep
    the base model's tokens."""
    runs = report["generate"]
    lora, base = runs["llama/lora-replicas"], runs["llama/1x1x1x1"]["tokens"]
    for layout in ("dp2", "tp2", "tp2xdp2"):
        assert lora[layout]["tokens"] == lora["single"]["tokens"], layout
        assert lora[layout]["blocks_leaked"] == 0, layout
    for i, tokens in enumerate(lora["single"]["tokens"]):
        assert (tokens == base[i]) == (i % 2 == 1), i
    assert lora["dp2"]["replicas_used"] == lora["tp2xdp2"]["replicas_used"] == 2
    assert "enable_lora under tensor_parallel_size=4 needs at least as many KV heads" in lora["tp4_error"]
    changes = lora["dp2_changes"]  # one replica ran the adapter's requests, the other none
    assert sorted(changes["before"]) == [[], [1]]
    assert "lora_int_id 1 is adapter 'a'" in changes["add_error"] and changes["after_add"] == changes["before"]
    assert "in use by 1 unfinished requests" in changes["remove_error"] and changes["after_remove"] == changes["before"]
    assert changes["removed"] and changes["at_end"] == [[], []]


def test_lora_adapters_under_expert_parallelism_give_one_device_tokens(report):
    runs = report["generate"]
    lora, base = runs["qwen3_moe/lora-experts"], runs["qwen3_moe/1x1x1x1"]["tokens"]
    for layout in ("ep4", "tp2xep2"):
        assert lora[layout]["tokens"] == lora["single"]["tokens"], layout
        assert lora[layout]["blocks_leaked"] == 0, layout
    for i, tokens in enumerate(lora["single"]["tokens"]):
        assert (tokens == base[i]) == (i % 2 == 1), i


@pytest.mark.parametrize(("new_tokens", "num_groups"), [([1, 1, 1, 40], 4), ([40], 3), ([1], 4), ([5] * 6, 4),
                                                         ([1, 1, 100], 3), ([7, 1], 2)])
def test_micro_batches_cover_every_new_token_once_in_order(new_tokens, num_groups):
    scheduled = [SimpleNamespace(num_new_tokens=n, seq=SimpleNamespace(num_computed_tokens=3 * i))
                 for i, n in enumerate(new_tokens)]
    groups = split_micro_batches(scheduled, num_groups)
    assert len(groups) == min(num_groups, sum(new_tokens)) and all(groups)
    sizes = [sum(p.count for p in group) for group in groups]
    assert max(sizes) - min(sizes) <= 1
    pieces = [p for group in groups for p in group]
    for index, item in enumerate(scheduled):
        mine = [p for p in pieces if p.index == index]
        starts = [p.first for p in mine]
        assert starts[0] == item.seq.num_computed_tokens and sum(p.count for p in mine) == item.num_new_tokens
        assert starts == sorted(starts) and all(a.first + a.count == b.first for a, b in zip(mine, mine[1:]))


@pytest.mark.parametrize("model", MODELS)
def test_each_device_holds_its_share(report, model):
    runs = report["generate"]
    single = runs[f"{model}/1x1x1x1"]
    for tp, pp, ep, dp in layouts(report, model)[1:]:
        run = runs[f"{model}/{tp}x{pp}x{ep}x{dp}"]
        used = [b for b in run["param_bytes"] if b]
        assert len(used) == tp * pp * ep * dp
        assert all(run["generated_per_replica"]), "every data-parallel replica serves requests"
        # The KV cache is split by layer over stages and by KV head over tensor shards (the two
        # KV heads are copied until each tensor shard has one); "ep" shards hold copies, and
        # each data-parallel replica a cache of its own.
        kv_heads = max(2, tp)
        assert max(run["kv_bytes"]) == sum(single["kv_bytes"]) * kv_heads / 2 / (pp * tp)
        # Stages split the layers, expert shards the experts, tensor shards everything but the
        # norms; embeddings stay whole across stages and everything but experts across "ep";
        # every data-parallel replica holds the whole model.
        experts, layers = run["expert_bytes"], run["layer_bytes"]
        share = experts / (tp * pp * ep) + (layers - experts) / (tp * pp) + (run["model_bytes"] - layers) / tp
        assert 0.95 * share <= max(used) <= 1.05 * share, (tp, pp, ep, used, share)
        assert run["model_bytes"] >= single["model_bytes"]


def test_pipeline_stages_overlap_as_micro_batches_grow(report):
    """The schedule as it ran: stage s works on micro-batch t - s at tick t, idles otherwise."""
    num_stages = 4
    idle_shares = []
    for m, run in sorted(report["schedule"].items(), key=lambda item: int(item[0])):
        m = int(m)
        busy = np.array(run["busy"])
        assert busy.shape == (num_stages, m + num_stages - 1)
        assert run["max_error"] < 1e-5  # the pipelined stack computes what the stack computes
        assert run["kv"] == [m] * num_stages  # each stage's cache is touched once per micro-batch
        idle = 1 - busy.mean()
        assert idle == pytest.approx((num_stages - 1) / (m + num_stages - 1))
        idle_shares.append(idle)
    assert idle_shares == sorted(idle_shares, reverse=True) and idle_shares[-1] < 0.2


def test_bad_layouts_are_clear_errors(stories_path):
    with pytest.raises(ValueError, match="pipeline_parallel_size 3 does not divide the 5 layers"):
        LLM(stories_path, pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="expert_parallel_size 2 needs a mixture-of-experts model; llama is dense"):
        LLM(stories_path, expert_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_parallel_size 5 x tensor_parallel_size 2 needs 10 devices"):
        LLM(stories_path, tensor_parallel_size=2, pipeline_parallel_size=5)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be >= 1, got 0"):
        LLM(stories_path, pipeline_parallel_size=0)
    replicas = len(jax.devices()) + 1  # more replicas than devices, even before each needs 2
    with pytest.raises(ValueError, match=rf"data_parallel_size {replicas} x tensor_parallel_size 2 needs "
                                         rf"{2 * replicas} devices"):
        LLM(stories_path, data_parallel_size=replicas, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="prefill_micro_batches must be >= 1, got 0"):
        LLM(stories_path, prefill_micro_batches=0)
