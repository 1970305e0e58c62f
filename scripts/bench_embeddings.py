"""Embedding throughput: jpaged's pooling runner and vLLM's CPU build, side by side.

`--task embed` (the default) embeds each input as one vector; `--task token_embed` gives every
input token's normalised state (multi-vector retrieval, `LLM.encode(pooling_task="token_embed")`
in both engines, each loaded with `pooler_config={"task": "token_embed"}`); then only the first
`COMPARED_INPUTS` inputs' rows are compared (the others would make the worker's answer hundreds
of megabytes).

The model is the default model's float32 HF folder (SmolLM2-135M, written once from its GGUF into
jpaged's cache directory, as scripts/bench_throughput.py writes it) run as an embedding model:
the final hidden state at each input's last token, L2-normalised, in both engines
(`runner="pooling"`; vLLM with `convert="embed"` and last-token pooling). Inputs: `--num-inputs`
random token-id sequences of `--min-len` to `--max-len` tokens (seeded). Each engine embeds them
all once as a warm-up, then `--rounds` times (the median kept). The embeddings are compared (the
largest absolute difference and the lowest cosine between the engines' vectors of one input).

Output: a table (inputs/s, input tokens/s), a JSON file (`--out`) and a bar plot beside it.

    python scripts/bench_embeddings.py --vllm-python /work/vllm-venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from bench_common import positive_int, pyplot, save_figure, save_json
from bench_throughput import hf_model_dir, run_worker, versions

from jpaged import LLM
from jpaged.loader.default_model import default_model_path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-inputs", type=positive_int, default=128)
    parser.add_argument("--min-len", type=positive_int, default=32)
    parser.add_argument("--max-len", type=positive_int, default=512)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--task", choices=("embed", "token_embed"), default="embed")
    parser.add_argument("--max-num-seqs", type=positive_int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--vllm-python", help="python of a venv with vLLM's CPU build (bench_vllm_worker.py)")
    parser.add_argument("--out", default="bench_results/embeddings.json")
    return parser.parse_args()


COMPARED_INPUTS = 4  # with --task token_embed: the inputs whose rows the engines' comparison reads


def run_jpaged(folder: Path, inputs: list[list[int]], args) -> dict:
    started = time.perf_counter()
    llm = LLM(str(folder), runner="pooling", max_num_seqs=args.max_num_seqs, max_model_len=args.max_len,
              max_num_batched_tokens=args.max_num_batched_tokens, cpu_kv_cache_gib=args.kv_cache_gib,
              enable_prefix_caching=False, pooler_config={"task": args.task})
    startup = time.perf_counter() - started
    prompts = [{"prompt_token_ids": ids} for ids in inputs]
    llm.encode(prompts, use_tqdm=False, pooling_task=args.task)  # warm-up: compiles the step shapes
    rounds, outputs = [], None
    for _ in range(args.rounds):
        started = time.perf_counter()
        outputs = llm.encode(prompts, use_tqdm=False, pooling_task=args.task)
        rounds.append(time.perf_counter() - started)
    compared = outputs if args.task == "embed" else outputs[:COMPARED_INPUTS]
    return {"seconds": statistics.median(rounds), "rounds": rounds, "startup_seconds": startup,
            "compilations": llm.engine.stats().num_compilations,
            "embeddings": np.concatenate([np.atleast_2d(o.outputs.data) for o in compared]).tolist()}


def run_vllm(python: str, folder: Path, inputs: list[list[int]], args) -> dict:
    job = {"model": str(folder), "inputs": inputs, "rounds": args.rounds, "task": args.task,
           "compared_inputs": len(inputs) if args.task == "embed" else COMPARED_INPUTS,
           "engine": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                      "max_model_len": args.max_len, "kv_cache_gib": args.kv_cache_gib}}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}")
    result, process_seconds = run_worker(python, "bench_vllm_embed_worker.py", job, env)
    return {**result, "process_seconds": process_seconds}


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(0)
    folder = hf_model_dir(default_model_path())
    vocab = 49152
    inputs = [rng.integers(100, vocab, int(n)).tolist() for n in rng.integers(args.min_len, args.max_len + 1,
                                                                                args.num_inputs)]
    tokens = sum(map(len, inputs))
    runs = {"jpaged": run_jpaged(folder, inputs, args)}
    if args.vllm_python:
        runs["vllm"] = run_vllm(args.vllm_python, folder, inputs, args)
    reference = np.array(runs["jpaged"]["embeddings"])
    print(f"{len(inputs)} inputs, {tokens} tokens")
    print(f"{'engine':10} {'inputs/s':>9} {'tokens/s':>9} {'max |diff|':>11} {'min cosine':>11}")
    summary = {}
    for name, run in runs.items():
        vectors = np.array(run.pop("embeddings"))
        cosine = float(np.min(np.sum(vectors * reference, axis=1)
                              / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))))
        summary[name] = {**run, "inputs_per_s": len(inputs) / run["seconds"], "tokens_per_s": tokens / run["seconds"],
                         "max_abs_diff_vs_jpaged": float(np.abs(vectors - reference).max()),
                         "min_cosine_vs_jpaged": cosine}
        row = summary[name]
        print(f"{name:10} {row['inputs_per_s']:9.1f} {row['tokens_per_s']:9.0f} "
              f"{row['max_abs_diff_vs_jpaged']:11.2e} {cosine:11.6f}")
    result = {"engines": summary, "workload": {"task": args.task, "num_inputs": len(inputs), "tokens": tokens,
                                               "min_len": args.min_len,
                                               "max_len": args.max_len, "rounds": args.rounds},
              "model": str(folder), "versions": {**versions(), "machine": platform.machine()}}
    save_json(result, args.out)
    plt = pyplot()
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(summary)
    ax.bar(names, [summary[n]["tokens_per_s"] for n in names])
    ax.set_ylabel("input tokens / s")
    save_figure(fig, f"{args.task}, {len(inputs)} inputs of {args.min_len}-{args.max_len} tokens",
                Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
