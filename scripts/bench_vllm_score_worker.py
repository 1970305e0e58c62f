"""vLLM's side of scripts/bench_scoring.py: runs in vLLM's own virtual environment (set up as
scripts/bench_vllm_worker.py's docstring says), importing only vLLM and the standard library.

Started as `<venv python> bench_vllm_score_worker.py JOB.json RESULT.json`. JOB.json holds the
model folder, its `hf_overrides` (a causal LM read as a reranker), the engine's settings and the
pairs as texts. The worker starts vLLM's pooling runner, scores every pair once as a warm-up
(excluded), then times `score` over all pairs `rounds` times (the median kept, the prefix cache
reset before each), and writes the scores, seconds and versions to RESULT.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    import torch
    import vllm
    from vllm import LLM

    settings = job["engine"]
    started = time.perf_counter()
    llm = LLM(model=job["model"], tokenizer=job["model"], dtype="float32", runner="pooling",
              hf_overrides=job["hf_overrides"], max_num_seqs=settings["max_num_seqs"],
              max_num_batched_tokens=settings["max_num_batched_tokens"],
              kv_cache_memory_bytes=int(settings["kv_cache_gib"] * (1 << 30)))
    startup = time.perf_counter() - started
    llm.score(job["queries"], job["documents"], use_tqdm=False)  # warm-up
    rounds, outputs = [], None
    for _ in range(job["rounds"]):
        llm.reset_prefix_cache()
        started = time.perf_counter()
        outputs = llm.score(job["queries"], job["documents"], use_tqdm=False)
        rounds.append(time.perf_counter() - started)
    result = {"seconds": statistics.median(rounds), "rounds": rounds, "startup_seconds": startup,
              "scores": [o.outputs.score for o in outputs], "settings": settings,
              "vllm_prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
              "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()}}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
