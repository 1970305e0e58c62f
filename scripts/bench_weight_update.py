"""What a weight update costs: the default model's sleep / wake-up and `load_weights` times, as an
RLHF loop would call them between rounds of generation.

For each weight format (float32, and int8 with `--quantization int8`), one engine with
`enable_sleep_mode=True` runs, each `--repeats` times (medians reported):

- `sleep(level=1)` and `wake_up()`: the weights to host memory and back;
- `sleep(level=2)` and `wake_up()`: the weights discarded, then read again from the GGUF file;
- `load_weights(state_dict)` while awake: HF transformers' own float32 load of the same GGUF,
  handed over as torch tensors (new weights are placed before the old ones go);
- `sleep(level=2)`, `load_weights(state_dict)`, `wake_up()`: the same without two copies;
- `load_weights` of the same tensors one a call (as TRL hands them over): each q / k / v and gate /
  up part written into its rows of the fused projection.

Greedy tokens of a chat prompt after every update must equal those before it (the same weights
come back), so a wrong load stops the run.

    python scripts/bench_weight_update.py [--repeats 3] [--out bench_results/weight_update.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from bench_common import positive_int, save_json

from jpaged import LLM, SamplingParams
from jpaged.loader.default_model import default_model_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


def hf_state_dict() -> dict:
    """HF transformers' float32 load of the default model's GGUF, as a trainer would hold it."""
    import torch
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).state_dict()


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure(quantization: str | None, weights: dict, repeats: int) -> dict:
    llm = LLM(enable_sleep_mode=True, quantization=quantization)
    answer = llm.chat(QUESTION, GREEDY, use_tqdm=False)[0].outputs[0].token_ids

    def check():
        got = llm.chat(QUESTION, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        if got != answer:
            raise RuntimeError(f"{quantization or 'float32'}: the tokens changed after an update: {got} != {answer}")

    def level_2_load():
        llm.sleep(level=2)
        llm.load_weights(weights)
        llm.wake_up()

    runs = {name: [] for name in ("sleep(1)", "wake_up() after sleep(1)", "sleep(2)", "wake_up() after sleep(2)",
                                  "load_weights (awake)", "sleep(2) + load_weights + wake_up()",
                                  "load_weights, one tensor a call (all calls)")}
    for _ in range(repeats):
        runs["sleep(1)"].append(timed(lambda: llm.sleep(level=1)))
        runs["wake_up() after sleep(1)"].append(timed(llm.wake_up))
        check()
        runs["sleep(2)"].append(timed(lambda: llm.sleep(level=2)))
        runs["wake_up() after sleep(2)"].append(timed(llm.wake_up))
        check()
        runs["load_weights (awake)"].append(timed(lambda: llm.load_weights(weights)))
        check()
        runs["sleep(2) + load_weights + wake_up()"].append(timed(level_2_load))
        check()
        runs["load_weights, one tensor a call (all calls)"].append(
            timed(lambda: [llm.load_weights({name: tensor}) for name, tensor in weights.items()]))
        check()
    return {"weight_bytes": llm.engine.runner.weight_bytes, "kv_cache_bytes": llm.engine.runner.kv_cache_bytes,
            "seconds": {name: statistics.median(times) for name, times in runs.items()}, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=3, help="times each action runs (medians reported)")
    parser.add_argument("--out", default="bench_results/weight_update.json", help="where the JSON result goes")
    args = parser.parse_args()
    weights = hf_state_dict()
    results = {fmt: measure(None if fmt == "float32" else fmt, weights, args.repeats) for fmt in ("float32", "int8")}
    print(f"\n| action | {' | '.join(results)} |\n|---|{'---|' * len(results)}")
    for action in results["float32"]["seconds"]:
        print(f"| {action} (s) | " + " | ".join(f"{r['seconds'][action]:.2f}" for r in results.values()) + " |")
    print("| weights on the device (MiB) | " + " | ".join(f"{r['weight_bytes'] / 2**20:.0f}" for r in results.values())
          + " |")
    save_json({"machine": platform.platform(), "processor": platform.processor(), "repeats": args.repeats,
               "results": results}, args.out)


if __name__ == "__main__":
    main()
