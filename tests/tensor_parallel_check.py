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
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
