"""vLLM's side of scripts/bench_embeddings.py: runs in vLLM's own virtual environment (set up as
scripts/bench_vllm_worker.py's docstring says), importing only vLLM and the standard library.

Started as `<venv python> bench_vllm_embed_worker.py JOB.json RESULT.json`. JOB.json holds the
model folder, the engine's settings and the inputs as token ids. The worker starts vLLM's pooling
runner (last-token pooling, normalised, as jpaged's; or, with the job's task "token_embed",
every token's state, normalised), encodes every input once as a warm-up (excluded), then times
`encode` over all inputs `rounds` times (the median kept), and writes the first
`compared_inputs` inputs' vectors (stacked rows), seconds and versions to RESULT.json.
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
    llm = LLM(model=job["model"], tokenizer=job["model"], dtype="float32", runner="pooling", convert="embed",
              pooler_config={"task": job["task"], "pooling_type": "LAST" if job["task"] == "embed" else "ALL",
                             "use_activation": True},
              max_model_len=settings["max_model_len"], max_num_seqs=settings["max_num_seqs"],
              max_num_batched_tokens=settings["max_num_batched_tokens"],
              kv_cache_memory_bytes=int(settings["kv_cache_gib"] * (1 << 30)), enable_prefix_caching=False)
    startup = time.perf_counter() - started
    prompts = [{"prompt_token_ids": ids} for ids in job["inputs"]]
    llm.encode(prompts, use_tqdm=False, pooling_task=job["task"])  # warm-up
    rounds, outputs = [], None
    for _ in range(job["rounds"]):
        started = time.perf_counter()
        outputs = llm.encode(prompts, use_tqdm=False, pooling_task=job["task"])
        rounds.append(time.perf_counter() - started)
    rows = [row for o in outputs[:job["compared_inputs"]] for row in o.outputs.data.reshape(-1, o.outputs.data.shape[-1]).tolist()]
    result = {"seconds": statistics.median(rounds), "rounds": rounds, "startup_seconds": startup,
              "embeddings": rows, "settings": settings,
              "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()}}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
