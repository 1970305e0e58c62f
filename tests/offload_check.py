"""Run in a subprocess with 2 emulated CPU devices: greedy tokens of a random Llama and Mixtral on
one device and under tensor parallelism 2, with no layer, every layer and half the layers streamed
(host memory and memory-mapped files), printed as JSON with their logprobs and what each run
streamed."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import numpy as np  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import save_random_model  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama": transformers.LlamaConfig(intermediate_size=128, num_hidden_layers=4, **SMALL),
    "mixtral": transformers.MixtralConfig(intermediate_size=32, num_hidden_layers=4, num_local_experts=4,
                                          num_experts_per_tok=2, sliding_window=None, **SMALL),
}

HOST, DISK = dict(offload_weights="host"), dict(offload_weights="disk", half=True)
RUNS = {  # (tensor parallel size, label, offload settings); "1, none" first
    "llama": [(1, "none", {}), (1, "all host", HOST), (2, "none", {}), (2, "all host", HOST),
              (2, "half disk", DISK)],
    "mixtral": [(1, "none", {}), (2, "none", {}), (2, "all host", HOST)],
}


def main(root: str) -> dict:
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(3, 96, n).tolist()} for n in (21, 5, 12)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
    report = {}
    for name, config in CONFIGS.items():
        folder = os.path.join(root, name)
        save_random_model(folder, config, seed=4)
        runs = report[name] = {}
        for tp, label, offload in RUNS[name]:
            offload = dict(offload)
            if offload.pop("half", False):
                probe = runs["2, all host"]
                layer = probe["streamed_bytes_per_step"] // probe["num_streamed_layers"]
                offload["device_weight_budget_gib"] = (probe["weight_bytes_per_device"] + 2 * layer) / 2**30
            llm = LLM(folder, tensor_parallel_size=tp, dtype="float32", num_blocks=32, max_num_batched_tokens=64,
                      **offload)
            outputs = llm.generate(prompts, params, use_tqdm=False)
            stats = llm.engine.stats()
            runs[f"{tp}, {label}"] = {"tokens": [o.outputs[0].token_ids for o in outputs],
                                      "logprobs": [[sorted((t, lp.logprob, lp.rank) for t, lp in step.items()) for step in o.outputs[0].logprobs]
                                                   for o in outputs],
                                      "num_streamed_layers": stats.num_streamed_layers,
                                      "streamed_bytes_per_step": stats.streamed_bytes_per_step,
                                      "weight_bytes_per_device": stats.weight_bytes // tp}
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
