"""Tensor parallelism on 8 emulated CPU devices (a subprocess owns that jax setup)."""

import jax
import pytest

from jpaged import LLM

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def report(run_device_check):
    return run_device_check("tensor_parallel_check.py")


@pytest.mark.parametrize("model", ["llama", "qwen2", "phi3", "olmo2"])
def test_every_degree_gives_the_single_device_tokens(report, model):
    single = report[f"{model}/1"]["tokens"]
    assert len({t for tokens in single for t in tokens}) > 6
    degrees = [int(key.split("/")[1]) for key in report if key.startswith(f"{model}/")]
    assert set(degrees) >= {1, 2, 4}
    for tp in degrees:
        assert report[f"{model}/{tp}"]["tokens"] == single, f"tensor_parallel_size={tp}"


def test_image_prompts_give_the_single_device_tokens(report):
    """LLaVA (its vision tower on one device, the language model split over two): the prompts'
    tokens as on one device, which tests/test_images.py checks against HF."""
    single = report["llava/1"]["tokens"]
    assert report["llava/2"]["tokens"] == single and single[0] != single[1]  # and the image counts


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_each_device_holds_about_a_share_of_the_parameters(report, model):
    single = report[f"{model}/1"]["model_bytes"]
    for tp in (2, 4, 8):
        run = report[f"{model}/{tp}"]
        used = [b for b in run["device_bytes"] if b]
        assert len(used) == tp
        # Only the norms stay whole on every device; all else is split 1/tp.
        assert max(used) < 1.05 * run["model_bytes"] / tp, (tp, used, run["model_bytes"])
        # The model grows only by the KV heads replicated so that each shard has one.
        kv_heads, bias_rows = (2, 0) if model == "llama" else (4, 1)
        kv_projection_bytes = 2 * 2 * (128 + bias_rows) * kv_heads * 16 * 4  # layers, k and v, [128 (+bias), heads*16] f32
        replicas = max(1, tp // kv_heads)
        assert run["model_bytes"] == single + (replicas - 1) * kv_projection_bytes


def test_bad_tensor_parallel_configs_are_clear_errors(stories_path):
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not divide the 8 attention heads"):
        LLM(stories_path, tensor_parallel_size=3)
    too_many = 2 * len(jax.devices())  # divides stories260K's heads while one device is visible
    with pytest.raises(ValueError, match=rf"tensor_parallel_size {too_many} needs {too_many} devices; "
                                         rf"{len(jax.devices())} cpu device"):
        LLM(stories_path, tensor_parallel_size=too_many)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        LLM(stories_path, tensor_parallel_size=0)


@pytest.mark.parametrize("setting", [dict(tensor_parallel_size=2.0), dict(tensor_parallel_size="2"),
                                     dict(num_blocks=8.0), dict(max_model_len=64.5), dict(block_size=True),
                                     dict(max_num_seqs=None)])
def test_integer_settings_must_be_integers(stories_path, setting):
    (name, value), = setting.items()
    with pytest.raises(ValueError, match=rf"{name} must be .*got {value!r}"):
        LLM(stories_path, **setting)
