"""Reranking throughput: `LLM.score` in jpaged and in vLLM's CPU build, side by side.

The model is the default model's float32 HF folder (SmolLM2-135M, written once from its GGUF into
jpaged's cache directory, as scripts/bench_throughput.py writes it) read as a reranker the way
both engines read a causal LM as one: `hf_overrides` name it `LlamaForSequenceClassification`
with `classifier_from_token` ["Ġno", "Ġyes"] (" no" and " yes" as its vocabulary spells them)
and `method` "from_2_way_softmax", so a pair's score
is the softmax of the two tokens' logits after the joined query and document, taken at " yes".
Its scores mean little (the model was not trained for this); the work per pair is a reranker's.

Workload: `--num-queries` queries (sentences of the public-domain text the tests ship), each with
`--docs-per-query` documents (passages of `--min-words` to `--max-words` words of it), scored as
one N:N call (each query repeated for its documents, so its pairs share the query as a prefix).
Each engine scores them once as a warm-up, then `--rounds` times (the median kept). The scores
are compared: the largest difference from jpaged's, and how often each query's best document is
the same.

Output: a table (pairs/s, prompt tokens/s), a JSON file (`--out`) and a bar plot beside it.

    python scripts/bench_scoring.py --vllm-python /work/vllm-venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from pathlib import Path

import numpy as np
from bench_common import positive_int, pyplot, save_figure, save_json
from bench_throughput import hf_model_dir, run_worker, versions

from jpaged import LLM
from jpaged.loader.default_model import default_model_path

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "public_domain.txt"
RERANKER = {"architectures": ["LlamaForSequenceClassification"], "classifier_from_token": ["Ġno", "Ġyes"],
            "method": "from_2_way_softmax"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-queries", type=positive_int, default=8)
    parser.add_argument("--docs-per-query", type=positive_int, default=16)
    parser.add_argument("--min-words", type=positive_int, default=40)
    parser.add_argument("--max-words", type=positive_int, default=200)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--max-num-seqs", type=positive_int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--vllm-python", help="python of a venv with vLLM's CPU build (bench_vllm_worker.py)")
    parser.add_argument("--out", default="bench_results/scoring.json")
    return parser.parse_args()


def workload(args) -> tuple[list[str], list[str]]:
    """Queries (each repeated for its documents) and documents, paired in order, from the text."""
    words = TEXT.read_text().split()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(words)) if 8 <= len(s.split()) <= 30]
    rng = np.random.default_rng(0)
    queries, documents = [], []
    for q in rng.choice(len(sentences), args.num_queries, replace=False):
        for _ in range(args.docs_per_query):
            length = int(rng.integers(args.min_words, args.max_words + 1))
            start = int(rng.integers(0, len(words) - length))
            queries.append(sentences[q])
            documents.append(" " + " ".join(words[start:start + length]))
    return queries, documents


def run_jpaged(folder: Path, queries: list[str], documents: list[str], args) -> dict:
    started = time.perf_counter()
    llm = LLM(str(folder), runner="pooling", hf_overrides=RERANKER, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, cpu_kv_cache_gib=args.kv_cache_gib)
    startup = time.perf_counter() - started
    llm.score(queries, documents, use_tqdm=False)  # warm-up: compiles the step shapes
    rounds, outputs = [], None
    for _ in range(args.rounds):
        llm.engine.reset_prefix_cache()
        started = time.perf_counter()
        outputs = llm.score(queries, documents, use_tqdm=False)
        rounds.append(time.perf_counter() - started)
    return {"seconds": statistics.median(rounds), "rounds": rounds, "startup_seconds": startup,
            "compilations": llm.engine.stats().num_compilations,
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
            "scores": [o.outputs.score for o in outputs]}


def run_vllm(python: str, folder: Path, queries: list[str], documents: list[str], args) -> dict:
    job = {"model": str(folder), "queries": queries, "documents": documents, "rounds": args.rounds,
           "hf_overrides": RERANKER,
           "engine": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                      "kv_cache_gib": args.kv_cache_gib}}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}")
    result, process_seconds = run_worker(python, "bench_vllm_score_worker.py", job, env)
    return {**result, "process_seconds": process_seconds}


def best_documents(scores: np.ndarray, args) -> np.ndarray:
    return scores.reshape(args.num_queries, args.docs_per_query).argmax(axis=1)


def main() -> None:
    args = parse_args()
    folder = hf_model_dir(default_model_path())
    queries, documents = workload(args)
    runs = {"jpaged": run_jpaged(folder, queries, documents, args)}
    if args.vllm_python:
        runs["vllm"] = run_vllm(args.vllm_python, folder, queries, documents, args)
    reference = np.array(runs["jpaged"]["scores"])
    tokens = runs["jpaged"]["prompt_tokens"]
    print(f"{len(queries)} pairs ({args.num_queries} queries x {args.docs_per_query} documents), {tokens} prompt tokens")
    print(f"{'engine':10} {'pairs/s':>8} {'tokens/s':>9} {'max |diff|':>11} {'same best':>10}")
    summary = {}
    for name, run in runs.items():
        scores = np.array(run.pop("scores"))
        same_best = float(np.mean(best_documents(scores, args) == best_documents(reference, args)))
        summary[name] = {**run, "pairs_per_s": len(queries) / run["seconds"], "tokens_per_s": tokens / run["seconds"],
                         "max_abs_diff_vs_jpaged": float(np.abs(scores - reference).max()),
                         "same_best_document_vs_jpaged": same_best}
        row = summary[name]
        print(f"{name:10} {row['pairs_per_s']:8.1f} {row['tokens_per_s']:9.0f} "
              f"{row['max_abs_diff_vs_jpaged']:11.2e} {same_best:10.2f}")
    result = {"engines": summary, "workload": {"pairs": len(queries), "queries": args.num_queries,
                                               "docs_per_query": args.docs_per_query, "prompt_tokens": tokens,
                                               "min_words": args.min_words, "max_words": args.max_words,
                                               "rounds": args.rounds},
              "model": str(folder), "reranker": RERANKER, "versions": {**versions(), "machine": platform.machine()}}
    save_json(result, args.out)
    plt = pyplot()
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(summary)
    ax.bar(names, [summary[n]["pairs_per_s"] for n in names])
    ax.set_ylabel("pairs / s")
    save_figure(fig, f"Reranking, {len(queries)} pairs", Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
