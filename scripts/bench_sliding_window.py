"""Sliding-window attention at long context: jpaged and vLLM's CPU build on a Gemma 3 model.

A Gemma 3 text model with Gemma 3 270M's layer shapes (18 layers, hidden 640, 4 query heads over 1
KV head of 256, intermediate 2,048; every sixth layer global, the others windowed at
`--window` tokens) but a 32,768-token vocabulary (the real one's 262,144 would make the LM head
most of a decode step), with HF's own random initialisation, saved once as an HF folder in
jpaged's cache directory (`sliding_window_bench/`), beside a copy whose layers all attend to the
whole context (`layer_types` all "full_attention", same weights).

Workload: `--num-requests` prompts of `--prompt-len` random token ids, `--max-tokens` output
tokens each (greedy, EOS ignored), and one request alone (prompt of `--prompt-len`,
`--single-tokens` outputs, the median of `--single-rounds` after a warm-up). Engines: jpaged on
both folders, and vLLM's CPU build on both where `--vllm-python` names its venv's python
(scripts/bench_vllm_worker.py). Tokens are checked against jpaged's on the same folder.

Output: a table, a JSON file (`--out`) and a bar plot beside it (same name, `.png`).

    python scripts/bench_sliding_window.py --vllm-python /work/vllm-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import numpy as np
from bench_common import positive_int, pyplot, save_figure, save_json
from bench_throughput import EngineRun, Workload, compare, run_jpaged, run_vllm, versions

from jpaged.cache_dir import cache_dir

VOCAB = 32768


def gemma3_config(window: int, windowed: bool, max_positions: int):
    from transformers import Gemma3TextConfig

    layer_types = ["sliding_attention" if windowed and (i + 1) % 6 else "full_attention" for i in range(18)]
    return Gemma3TextConfig(architectures=["Gemma3ForCausalLM"], vocab_size=VOCAB, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=window, layer_types=layer_types, max_position_embeddings=max_positions,
                            bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)


def word_level_tokenizer(folder: Path) -> None:
    """A tokenizer of `VOCAB` words (`<pad> <eos> <bos> t3 t4 ...`): the prompts are token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                            bos_token="<bos>").save_pretrained(str(folder))


def model_folders(window: int, max_positions: int) -> dict[str, Path]:
    """The windowed model's folder and its all-global twin (same weights), made once."""
    root = cache_dir() / "sliding_window_bench" / f"gemma3-270m-shape-w{window}"
    folders = {"windowed": root / "windowed", "global": root / "global"}
    if not (folders["global"] / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(gemma3_config(window, True, max_positions), dtype=torch.float32)
        model.save_pretrained(str(folders["windowed"]))
        word_level_tokenizer(folders["windowed"])
        shutil.copytree(folders["windowed"], folders["global"], dirs_exist_ok=True)
        gemma3_config(window, False, max_positions).save_pretrained(str(folders["global"]))
    return folders


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=positive_int, default=512)
    parser.add_argument("--num-requests", type=positive_int, default=4)
    parser.add_argument("--prompt-len", type=positive_int, default=3072)
    parser.add_argument("--max-tokens", type=positive_int, default=64)
    parser.add_argument("--single-tokens", type=positive_int, default=64)
    parser.add_argument("--single-rounds", type=positive_int, default=3)
    parser.add_argument("--max-num-seqs", type=positive_int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=512)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--vllm-python", help="python of vLLM's CPU venv (scripts/bench_vllm_worker.py)")
    parser.add_argument("--vllm-omp-bind", default="all")
    parser.add_argument("--out", default="bench_results/sliding_window_cpu.json")
    args = parser.parse_args()
    args.speculative_tokens = 0
    return args


def summarise(runs: dict[str, EngineRun], workload: Workload, folders: dict[str, Path]) -> dict:
    engines = {}
    for name, run in runs.items():
        reference = runs["jpaged, " + name.split(", ")[1]]
        engines[name] = {"output_tokens_per_s": sum(workload.max_tokens) / run.seconds, "seconds": run.seconds,
                         "single_tokens_per_s": run.single_tokens_per_s,
                         "agreement_with_jpaged": compare(reference.token_ids, run.token_ids), **run.details}
    return {"engines": engines, "models": {k: str(v) for k, v in folders.items()}}


def print_table(summary: dict) -> None:
    print(f"{'engine':<20} {'tok/s':>8} {'single tok/s':>13} {'same tokens':>12}")
    for name, row in summary["engines"].items():
        agreement = row["agreement_with_jpaged"]
        print(f"{name:<20} {row['output_tokens_per_s']:8.1f} {row['single_tokens_per_s']:13.1f} "
              f"{agreement['identical']:>6}/{agreement['total']}")


def plot(summary: dict, path: Path) -> Path:
    plt = pyplot()
    if plt is None:
        return

    names = list(summary["engines"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("output_tokens_per_s", "single_tokens_per_s"),
                              ("batch, output tokens/s", "one request, tokens/s")):
        ax.bar(range(len(names)), [summary["engines"][n][key] for n in names],
               color=["tab:blue", "tab:cyan", "tab:orange", "tab:red"][:len(names)])
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_title(title)
    return save_figure(fig, f"Gemma 3 270M shapes, {summary['workload']['prompt_len']}-token prompts "
                            f"(window {summary['workload']['window']})", path.with_suffix(".png"))


def main() -> None:
    args = parse_args()
    max_model_len = args.prompt_len + max(args.max_tokens, args.single_tokens)
    folders = model_folders(args.window, 32768)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB, args.prompt_len).tolist() for _ in range(args.num_requests + 1)]
    workload = Workload("long random prompts", prompts[1:], [args.max_tokens] * args.num_requests)
    runs: dict[str, EngineRun] = {}
    for kind, folder in folders.items():
        runs[f"jpaged, {kind}"] = run_jpaged(workload, prompts[0], args.single_tokens, args, "jpaged", str(folder))
        print(f"jpaged, {kind}: {runs[f'jpaged, {kind}'].seconds:.1f} s", flush=True)
    if args.vllm_python:
        for kind, folder in folders.items():
            runs[f"vllm, {kind}"] = run_vllm(args.vllm_python, folder, workload, prompts[0], args.single_tokens, args,
                                             "vllm")
    summary = summarise(runs, workload, folders)
    summary["workload"] = {"window": args.window, "num_requests": args.num_requests, "prompt_len": args.prompt_len,
                           "max_tokens": args.max_tokens, "single_tokens": args.single_tokens,
                           "max_model_len": max_model_len}
    summary["versions"] = {**versions(), "machine": platform.processor() or platform.machine()}
    print_table(summary)
    out = Path(args.out)
    save_json(summary, out)
    plot(summary, out)
    print(json.dumps({k: v["output_tokens_per_s"] for k, v in summary["engines"].items()}))


if __name__ == "__main__":
    main()
