"""Run in a subprocess with 8 emulated CPU devices: greedy tokens and per-device parameter bytes
of random-weight models at each tensor-parallel degree, printed as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import save_random_model  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402

CONFIGS = {
    # 8 query heads over 2 KV heads: at TP 4 and 8 each KV head is replicated.
    "llama": transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256),
    "qwen2": transformers.Qwen2Config(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                      use_sliding_window=False),
    # Checkpoint-fused q / k / v and gate / up, half of each head rotated, a window of 8.
    "phi3": transformers.Phi3Config(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                    sliding_window=8, pad_token_id=0,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.5}),
    # q / k norms over all heads, which the shards split (at TP 4 and 8 the KV heads and k norm repeat).
    "olmo2": transformers.Olmo2Config(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                      pad_token_id=0),
}


# The newer families at one degree that splits the KV heads and one that repeats them.
DEGREES = {"phi3": (1, 2, 4), "olmo2": (1, 2, 4)}


def device_bytes(llm) -> list[int]:
    per_device = [0] * len(jax.devices())
    for leaf in jax.tree.leaves(llm.engine.runner.state):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] += shard.data.nbytes
    return per_device


def main(folder_root: str) -> None:
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(3, 96, n).tolist()} for n in (21, 16, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    report = {}
    for name, config in CONFIGS.items():
        folder = os.path.join(folder_root, name)
        save_random_model(folder, config, seed=4)
        for tp in DEGREES.get(name, (1, 2, 4, 8)):
            llm = LLM(folder, tensor_parallel_size=tp, dtype="float32", num_blocks=32, max_num_batched_tokens=16)
            outputs = llm.generate(prompts, params, use_tqdm=False)
            report[f"{name}/{tp}"] = {"tokens": [o.outputs[0].token_ids for o in outputs],
                                      "device_bytes": device_bytes(llm),
                                      "model_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(llm.engine.runner.state))}
    report.update(image_prompts(os.path.join(folder_root, "llava")))
    print(json.dumps(report))


def image_prompts(folder: str) -> dict:
    """Greedy tokens of a random LLaVA (tests/test_images.py's, whose tokens that file checks
    against HF) for prompts with images, on one device and split over two."""
    import torch
    from hf_models import randomize_weights, torch_single_thread
    from test_images import CLIP_VISION, IMAGE_TOKEN, LLAMA_TEXT, TEMPLATE, _image, _tokenizer

    config = transformers.LlavaConfig(text_config=LLAMA_TEXT, vision_config=CLIP_VISION,
                                      image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                                      vision_feature_select_strategy="default")
    with torch_single_thread(), torch.no_grad():
        model = transformers.LlavaForConditionalGeneration(config).eval()
        randomize_weights(model, seed=5)
    model.save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    transformers.LlavaProcessor(image_processor=image_processor, tokenizer=_tokenizer(), patch_size=7,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=TEMPLATE).save_pretrained(folder)
    prompts = [{"prompt": "t5 t6 <image> t7 t8", "multi_modal_data": {"image": _image(seed)}} for seed in (1, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    report = {}
    for tp in (1, 2):
        llm = LLM(folder, tensor_parallel_size=tp, dtype="float32", num_blocks=64, block_size=4,
                  max_num_batched_tokens=16, max_model_len=128)
        report[f"llava/{tp}"] = {"tokens": [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                                           use_tqdm=False)]}
    return report


if __name__ == "__main__":
    main(sys.argv[1])
