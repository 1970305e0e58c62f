"""Offline throughput: jpaged side by side with vLLM's CPU build and HF transformers.

Engines (`--engines`, comma-separated; default: jpaged, hf, hf-batch, vllm, llama.cpp):

    jpaged        jpaged's `LLM.generate` (continuous batching)
    jpaged+ngram  the same with n-gram speculative decoding (`--speculative-tokens` drafts)
    hf            HF transformers `generate`: static left-padded batches of `--hf-batch-size`
    hf-batch      HF transformers continuous batching (the manager behind `generate_batch`)
    vllm          vLLM's CPU build, in its own venv, through scripts/bench_vllm_worker.py; runs
                  only when `--vllm-python` names that venv's python (its docstring tells how to
                  set it up)
    vllm+ngram    the same with vLLM's n-gram speculative decoding, the same setting as jpaged's
    llama.cpp     llama.cpp through llama-cpp-python, through scripts/bench_llama_cpp_worker.py on
                  an all-float32 copy of the GGUF, every request decoded together in one context;
                  runs only when `--llama-cpp-python` names a python that has it (see the
                  worker's docstring)

"vs vLLM" is each engine's output tokens/s over the faster vLLM setting of the run.

Every engine runs SmolLM2-135M-Instruct (the default model's GGUF, dequantized to float32) on
the same requests, given as token ids: greedy (or, with `--temperature`, sampled, each request
seeded by its index in jpaged; jpaged and vLLM only), EOS ignored, each request exactly its own
`max_tokens`, so every engine produces the same number of tokens. HF and vLLM load an HF
float32 folder (config, safetensors, tokenizer) written once from the GGUF by transformers' GGUF
loader into jpaged's cache directory (`hf/<gguf name>`). Each engine's outputs are checked
token for token against jpaged's (near-ties in float32 can flip a greedy choice; the first
differing position of each mismatch is reported).

Workloads (`--workload`):

    chat   64 chat questions through the chat template, outputs of 16 to 160 tokens
    long   16 requests asking for a summary of a passage of 200 to 1,000 prompt tokens (cut
           from the running Python's standard-library documentation), outputs of 100 to 400

Warm-up is excluded for every engine: jpaged runs the workload once cold (its time and its
step compilations are reported) and is then timed on a second pass; HF and vLLM run a small
generate first. Each engine also decodes one request alone (`--single-tokens`, EOS ignored),
timed after a warm-up run of the same request: the median of `--single-rounds` runs.

Output: a table, a JSON file (`--out`) and a bar plot beside it (same name, `.png`).

    python scripts/bench_throughput.py --workload chat --vllm-python /work/vllm-venv/bin/python \\
        --llama-cpp-python /work/llama-venv/bin/python
    python scripts/bench_throughput.py --workload long --vllm-python /work/vllm-venv/bin/python \\
        --llama-cpp-python /work/llama-venv/bin/python
    # each engine with and without n-gram speculation, in one run:
    python scripts/bench_throughput.py --workload long --engines jpaged,jpaged+ngram,vllm,vllm+ngram \\
        --vllm-python /work/vllm-venv/bin/python
    # a quick check that every engine runs:
    python scripts/bench_throughput.py --num-requests 4 --output-cap 16 --single-tokens 16 \\
        --vllm-python /work/vllm-venv/bin/python --llama-cpp-python /work/llama-venv/bin/python \\
        --out bench_results/smoke.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import jax
from bench_common import positive_float, positive_int, pyplot, save_figure, save_json

from jpaged import LLM, SamplingParams
from jpaged.cache_dir import cache_dir
from jpaged.llm import chat_token_ids
from jpaged.loader.default_model import default_model_path
from jpaged.loader.gguf_cache import open_cached

ENGINES = ("jpaged", "jpaged+ngram", "hf", "hf-batch", "vllm", "vllm+ngram", "llama.cpp")
DEFAULT_ENGINES = ("jpaged", "hf", "hf-batch", "vllm", "llama.cpp")
SPECULATIVE = "+ngram"  # the engine-name suffix of a speculative setting
LABELS = {"jpaged": "jpaged", "jpaged+ngram": "jpaged, n-gram drafts", "hf": "HF generate",
          "hf-batch": "HF continuous batching", "vllm": "vLLM (CPU)", "vllm+ngram": "vLLM (CPU), n-gram drafts",
          "llama.cpp": "llama.cpp"}

TOPICS = ["the moon", "volcanoes", "honey bees", "the Roman empire", "rainbows", "chess", "coffee",
          "the ocean", "penguins", "electricity", "bread", "the piano", "glaciers", "owls",
          "the internet", "tea"]
TEMPLATES = ["What is {}? Answer in one sentence.", "Tell me three facts about {}.",
             "Write a short poem about {}.", "Explain {} to a child."]
CHAT_MAX_TOKENS = [16, 64, 112, 160]

# Standard-library modules whose documentation is mostly prose.
PASSAGE_MODULES = ["pdb", "configparser", "socketserver", "statistics", "wave", "site", "argparse",
                   "json", "csv", "http.cookies", "urllib.request", "cmd", "timeit", "hashlib",
                   "copy", "unittest", "uuid", "sys"]
LONG_MAX_TOKENS = [100, 200, 300, 400]
LONG_PROMPT_TOKENS = (200, 1000)

SINGLE_QUESTION = "Tell me a long story."


@dataclasses.dataclass
class Workload:
    """Requests as token ids, each with its exact output length."""

    name: str
    prompts: list[list[int]]
    max_tokens: list[int]


@dataclasses.dataclass
class EngineRun:
    """One engine's timed pass over a workload and its single-request decode rate."""

    seconds: float
    token_ids: list[list[int]]
    single_tokens_per_s: float
    details: dict = dataclasses.field(default_factory=dict)



def chat_workload(tokenizer, count: int) -> Workload:
    """Chat questions over topics and templates; outputs cycle over 16..160 tokens."""
    prompts, max_tokens = [], []
    for i in range(count):
        question = TEMPLATES[i % len(TEMPLATES)].format(TOPICS[(i // len(TEMPLATES)) % len(TOPICS)])
        prompts.append(chat_token_ids(tokenizer, [{"role": "user", "content": question}]))
        max_tokens.append(CHAT_MAX_TOKENS[(i * 3 + i // 4) % len(CHAT_MAX_TOKENS)])
    return Workload("chat", prompts, max_tokens)


def passage_tokens(tokenizer) -> list[int]:
    """The documentation of `PASSAGE_MODULES`, concatenated and tokenized."""
    docs = [inspect.getdoc(importlib.import_module(name)) or "" for name in PASSAGE_MODULES]
    return tokenizer.encode("\n\n".join(docs), add_special_tokens=False)


def long_workload(tokenizer, count: int) -> Workload:
    """Summaries of passages whose prompts spread evenly over 200..1,000 tokens; outputs cycle
    over 100..400 tokens."""
    corpus = passage_tokens(tokenizer)
    instruction = "Summarize the following documentation in a few paragraphs.\n\n"
    overhead = len(chat_token_ids(tokenizer, [{"role": "user", "content": instruction}]))
    low, high = LONG_PROMPT_TOKENS
    prompts, max_tokens = [], []
    for i in range(count):
        length = low + (high - low) * ((i * 7) % count) // max(count - 1, 1) - overhead
        start = (i * 1009) % (len(corpus) - length)
        passage = tokenizer.decode(corpus[start : start + length])
        prompts.append(chat_token_ids(tokenizer, [{"role": "user", "content": instruction + passage}]))
        max_tokens.append(LONG_MAX_TOKENS[(i + i // 4) % len(LONG_MAX_TOKENS)])
    return Workload("long", prompts, max_tokens)


def build_workload(name: str, tokenizer, count: int, output_cap: int | None) -> Workload:
    """The named workload of `count` requests, each output capped at `output_cap` if given."""
    workload = (chat_workload if name == "chat" else long_workload)(tokenizer, count)
    if output_cap:
        workload.max_tokens = [min(n, output_cap) for n in workload.max_tokens]
    return workload



def speculative_config(args, engine: str) -> dict | None:
    """n-gram speculative decoding, the same setting for jpaged and vLLM, for an engine named with
    the `+ngram` suffix; None for the others."""
    if not engine.endswith(SPECULATIVE):
        return None
    return {"method": "ngram", "num_speculative_tokens": args.speculative_tokens, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2}


def request_params(max_tokens: int, index: int, temperature: float) -> SamplingParams:
    """EOS ignored, so every request yields exactly `max_tokens` tokens: greedy at temperature 0,
    else sampled with the request's `index` as its seed (vLLM samples with its engine's seed)."""
    return SamplingParams(temperature=temperature, seed=index if temperature else None, max_tokens=max_tokens,
                          ignore_eos=True)


def run_jpaged(workload: Workload, single: list[int], single_tokens: int, args, engine: str,
               model: str | None = None) -> EngineRun:
    """A cold pass (compiles), then the timed pass; the single request likewise; on `model` (the
    default model for None)."""
    llm = LLM(model, attention_backend=args.attention_backend, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              cpu_kv_cache_gib=args.kv_cache_gib, speculative_config=speculative_config(args, engine))
    params = [request_params(n, i, args.temperature) for i, n in enumerate(workload.max_tokens)]
    requests = [{"prompt_token_ids": p} for p in workload.prompts]

    def timed(prompts, sampling) -> tuple[float, list[list[int]]]:
        llm.engine.reset_prefix_cache()  # no reuse of an earlier pass's prompts
        started = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        return time.perf_counter() - started, [list(o.outputs[0].token_ids) for o in outputs]

    cold, _ = timed(requests, params)
    compilations = llm.engine.stats().num_compilations
    seconds, token_ids = timed(requests, params)
    single_params = request_params(single_tokens, 0, args.temperature)
    timed({"prompt_token_ids": single}, single_params)
    single_seconds = statistics.median(timed({"prompt_token_ids": single}, single_params)[0]
                                       for _ in range(args.single_rounds))
    stats = llm.engine.stats()
    details = {"cold_seconds": cold, "compilations": compilations,
               "compilations_after_single": stats.num_compilations,
               "draft_tokens": stats.num_draft_tokens, "accepted_draft_tokens": stats.num_accepted_draft_tokens,
               "settings": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                            "cpu_kv_cache_gib": args.kv_cache_gib, "prefix_caching": True,
                            "speculative_config": speculative_config(args, engine)}}
    return EngineRun(seconds, token_ids, single_tokens / single_seconds, details)


def hf_model_dir(gguf: Path) -> Path:
    """An HF float32 folder of the GGUF (config, safetensors, tokenizer), written once."""
    folder = cache_dir() / "hf" / gguf.stem
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    print(f"writing the float32 HF folder of {gguf.name} to {folder}")
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # weights are dequantized: save them as plain float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        open_cached(gguf)[1]().save_pretrained(staging)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_hf_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> list[list[int]]:
    """One left-padded static batch, greedy, EOS ignored; every row `max_new_tokens` long."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=pad_id)
    return generated[:, width:].tolist()


def run_hf(model, workload: Workload, single: list[int], single_tokens: int, batch_size: int,
           pad_id: int, rounds: int) -> EngineRun:
    """Static batches run until their longest request is done; each row is cut to its own length."""
    hf_generate(model, workload.prompts[:2], 8, pad_id)  # warm-up
    results: list[list[int]] = []
    started = time.perf_counter()
    for first in range(0, len(workload.prompts), batch_size):
        limits = workload.max_tokens[first : first + batch_size]
        rows = hf_generate(model, workload.prompts[first : first + batch_size], max(limits), pad_id)
        results.extend(row[:limit] for row, limit in zip(rows, limits))
    seconds = time.perf_counter() - started
    hf_generate(model, [single], 8, pad_id)

    def timed_single() -> float:
        started = time.perf_counter()
        hf_generate(model, [single], single_tokens, pad_id)
        return time.perf_counter() - started

    single_rate = single_tokens / statistics.median(timed_single() for _ in range(rounds))
    return EngineRun(seconds, results, single_rate, {"settings": {"batch_size": batch_size}})


def cb_generate(manager, prompts: list[list[int]], max_tokens: list[int], tag: str) -> tuple[float, list[list[int]]]:
    """All requests through a running continuous-batching manager, EOS ignored, each its own length."""
    started = time.perf_counter()
    ids = [manager.add_request(p, request_id=f"{tag}-{i}", max_new_tokens=n, eos_token_id=-1)
           for i, (p, n) in enumerate(zip(prompts, max_tokens))]
    done: dict[str, list[int]] = {}
    while len(done) < len(ids):
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("HF continuous batching stopped before finishing")
            continue
        if result.error is not None:
            raise RuntimeError(f"HF continuous batching request {result.request_id}: {result.error}")
        if result.is_finished():
            done[result.request_id] = list(result.generated_tokens)
    return time.perf_counter() - started, [done[i] for i in ids]


def cb_config(model, args):
    """Continuous-batching settings matched to jpaged's: batch tokens, batch rows, KV memory."""
    from transformers.generation import ContinuousBatchingConfig

    text = model.config.get_text_config()
    page_size = 256
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    block_bytes = page_size * text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4
    return ContinuousBatchingConfig(page_size=page_size, num_blocks=int(args.kv_cache_gib * (1 << 30) // block_bytes),
                                    max_batch_tokens=args.max_num_batched_tokens,
                                    max_requests_per_batch=args.max_num_seqs)


def run_hf_batch(model, workload: Workload, single: list[int], single_tokens: int, args) -> EngineRun:
    """HF's continuous batching: one manager for the warm-up, the timed pass and the single request."""
    from transformers import GenerationConfig

    generation = GenerationConfig(do_sample=False, max_new_tokens=max(workload.max_tokens), eos_token_id=-1,
                                  pad_token_id=model.config.pad_token_id)
    config = cb_config(model, args)
    with model.continuous_batching_context_manager(generation_config=generation,
                                                   continuous_batching_config=config) as manager:
        cb_generate(manager, [single, single], [8, 8], "warmup")  # no workload prompt: its blocks could be shared
        seconds, token_ids = cb_generate(manager, workload.prompts, workload.max_tokens, "run")
        cb_generate(manager, [single], [8], "single-warmup")
        single_seconds = statistics.median(cb_generate(manager, [single], [single_tokens], f"single-{i}")[0]
                                           for i in range(args.single_rounds))
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k in ("page_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch",
                         "allow_block_sharing", "use_cuda_graph", "use_async_batching")}
    settings["attn_implementation"] = model.config._attn_implementation
    return EngineRun(seconds, token_ids, single_tokens / single_seconds, {"settings": settings})


def run_worker(python: str, script: str, job: dict, env: dict) -> tuple[dict, float]:
    """Another engine's worker script run by `python`: it gets the job as JSON and writes its
    result as JSON. The result and the process's wall seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        started = time.perf_counter()
        subprocess.run([python, str(Path(__file__).with_name(script)), str(job_path), str(result_path)], env=env,
                       check=True)
        return json.loads(result_path.read_text()), time.perf_counter() - started


def worker_run(result: dict, process_seconds: float, keys: tuple[str, ...]) -> EngineRun:
    """A worker's result as an EngineRun, with its `keys` and the process's seconds as details."""
    details = {key: result[key] for key in keys}
    details["process_seconds"] = process_seconds
    return EngineRun(result["seconds"], result["token_ids"], result["single_tokens"] / result["single_seconds"], details)


def requests_json(workload: Workload, single: list[int], single_tokens: int, rounds: int) -> dict:
    """The workload's requests and the single request (timed `rounds` times, the median kept), as
    a worker's job gives them."""
    return {"requests": [{"prompt_token_ids": p, "max_tokens": n} for p, n in zip(workload.prompts, workload.max_tokens)],
            "single": {"prompt_token_ids": single, "max_tokens": single_tokens, "rounds": rounds}}


def run_vllm(python: str, folder: Path, workload: Workload, single: list[int], single_tokens: int,
             args, engine: str) -> EngineRun:
    """vLLM in its own venv (scripts/bench_vllm_worker.py)."""
    max_model_len = max(len(p) + n for p, n in zip(workload.prompts + [single], workload.max_tokens + [single_tokens]))
    job = {"model": str(folder),
           "engine": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                      "max_model_len": max(2048, max_model_len), "kv_cache_gib": args.kv_cache_gib,
                      "enable_prefix_caching": True, "speculative_config": speculative_config(args, engine)},
           "temperature": args.temperature, **requests_json(workload, single, single_tokens, args.single_rounds)}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{os.cpu_count() - 1}" if args.vllm_omp_bind == "all" else args.vllm_omp_bind
    result, seconds = run_worker(python, "bench_vllm_worker.py", job, env)
    return worker_run(result, seconds, ("startup_seconds", "warmup_seconds", "settings", "versions", "env"))


def run_llama_cpp(python: str, gguf: Path, workload: Workload, single: list[int], single_tokens: int,
                  args) -> EngineRun:
    """llama.cpp through llama-cpp-python in its own venv (scripts/bench_llama_cpp_worker.py), on an
    all-float32 copy of the GGUF kept in jpaged's cache directory (`llama.cpp/<name>-f32.gguf`)."""
    job = {"gguf": str(gguf), "float32_gguf": str(cache_dir() / "llama.cpp" / f"{gguf.stem}-f32.gguf"),
           "n_batch": args.max_num_batched_tokens, **requests_json(workload, single, single_tokens, args.single_rounds)}
    result, seconds = run_worker(python, "bench_llama_cpp_worker.py", job, dict(os.environ))
    return worker_run(result, seconds, ("startup_seconds", "warmup_seconds", "settings", "versions"))


def compare(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How many requests match the reference token for token; where each other one first differs."""
    differences = []
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            position = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            differences.append({"request": i, "position": position})
    return {"identical": len(reference) - len(differences), "total": len(reference),
            "first_differences": differences}


def summarise(runs: dict[str, EngineRun], workload: Workload) -> dict:
    """Per engine: output tokens/s, ratio to vLLM, single-request rate, agreement with jpaged."""
    reference = "jpaged" if "jpaged" in runs else next(iter(runs))
    engines = {}
    for name, run in runs.items():
        tokens = sum(len(t) for t in run.token_ids)
        engines[name] = {"seconds": run.seconds, "output_tokens": tokens, "tokens_per_s": tokens / run.seconds,
                         "single_decode_tokens_per_s": run.single_tokens_per_s,
                         "exact_lengths": [len(t) for t in run.token_ids] == workload.max_tokens,
                         "agreement": compare(runs[reference].token_ids, run.token_ids), **run.details}
    vllm_rate = max((entry["tokens_per_s"] for name, entry in engines.items() if name.startswith("vllm")),
                    default=None)
    for entry in engines.values():
        entry["ratio_to_vllm"] = entry["tokens_per_s"] / vllm_rate if vllm_rate else None
    return {"reference": reference, "engines": engines}


def print_table(summary: dict) -> None:
    print(f"{'engine':<28}{'output tok/s':>14}{'vs vLLM':>10}{'single tok/s':>14}"
          f"{'identical to ' + summary['reference']:>22}{'wall s':>9}")
    for name, entry in summary["engines"].items():
        ratio = f"{entry['ratio_to_vllm']:.2f}x" if entry["ratio_to_vllm"] else "-"
        agreement = f"{entry['agreement']['identical']}/{entry['agreement']['total']}"
        print(f"{LABELS[name]:<28}{entry['tokens_per_s']:>14.1f}{ratio:>10}"
              f"{entry['single_decode_tokens_per_s']:>14.1f}{agreement:>22}{entry['seconds']:>9.1f}")
    for name, entry in summary["engines"].items():
        differences = entry["agreement"]["first_differences"]
        if differences:
            shown = ", ".join(f"#{d['request']}@{d['position']}" for d in differences[:12])
            print(f"{LABELS[name]}: first differing token (request#@position): {shown}"
                  + (" ..." if len(differences) > 12 else ""))
        if not entry["exact_lengths"]:
            print(f"{LABELS[name]}: some outputs are not exactly their max_tokens long")


def plot(summary: dict, title: str, path: Path) -> Path:
    """Two bar charts side by side: batch throughput and single-request decode rate."""
    plt = pyplot()
    if plt is None:
        return

    names = list(summary["engines"])
    labels = [textwrap.fill(LABELS[n], 12) for n in names]
    colors = ["#1f77b4" if n.startswith("jpaged") else "#7f7f7f" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(max(11, 2.2 * len(names)), 4.6))
    for ax, key, heading in ((axes[0], "tokens_per_s", "batch throughput"),
                             (axes[1], "single_decode_tokens_per_s", "one request alone")):
        values = [summary["engines"][n][key] for n in names]
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(heading)
        ax.set_ylabel("output tokens/s")
        ax.tick_params(axis="x", labelsize=8)
    return save_figure(fig, title, path)


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}



def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("chat", "long"), default="chat")
    parser.add_argument("--num-requests", type=positive_int, help="default: 64 (chat), 16 (long)")
    parser.add_argument("--output-cap", type=positive_int, help="cap every request's output length (quick checks)")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                        help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--vllm-python", help="python of the venv with vllm-cpu (needed for the vllm engine)")
    parser.add_argument("--llama-cpp-python",
                        help="python of a venv with llama-cpp-python (needed for the llama.cpp engine)")
    parser.add_argument("--vllm-omp-bind", default="all",
                        help="VLLM_CPU_OMP_THREADS_BIND: 'all' binds every core; 'auto' is vLLM's default, "
                             "which keeps one core for its scheduler")
    parser.add_argument("--attention-backend", default="auto", help="jpaged's attention backend (auto, cpu, reference)")
    parser.add_argument("--hf-batch-size", type=positive_int, default=64)
    parser.add_argument("--max-num-seqs", type=positive_int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=512)
    parser.add_argument("--kv-cache-gib", type=positive_float, default=2.0)
    parser.add_argument("--single-tokens", type=positive_int, default=128)
    parser.add_argument("--speculative-tokens", type=positive_int, default=4,
                        help="drafts per step of the +ngram engines (jpaged and vLLM alike)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample at this temperature, each request seeded by its index (jpaged and vLLM "
                             "engines only; outputs then agree between jpaged settings, not with vLLM's)")
    parser.add_argument("--single-rounds", type=positive_int, default=3,
                        help="timed runs of the single request per engine (the median is reported)")
    parser.add_argument("--out", help="default: bench_results/throughput_<workload>.json")
    args = parser.parse_args()
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))}")
    for name in [e for e in args.engines if e.startswith("vllm")]:
        if not args.vllm_python:
            print(f"{name} skipped: no --vllm-python given")
            args.engines.remove(name)
    if "llama.cpp" in args.engines and not args.llama_cpp_python:
        print("llama.cpp skipped: no --llama-cpp-python given")
        args.engines.remove("llama.cpp")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.temperature:
        greedy_only = [e for e in args.engines if e in ("hf", "hf-batch", "llama.cpp")]
        if greedy_only:
            parser.error(f"--temperature {args.temperature}: engines {', '.join(greedy_only)} run greedy only")
    args.num_requests = args.num_requests or (64 if args.workload == "chat" else 16)
    args.out = Path(args.out or f"bench_results/throughput_{args.workload}.json")
    return args


def run_engines(args, workload: Workload, single: list[int], tokenizer, failed: dict[str, str]
                ) -> dict[str, EngineRun]:
    """Each chosen engine in turn, jpaged first (the reference); a peer that cannot run is left
    out, its error in `failed`."""
    runs: dict[str, EngineRun] = {}
    for name in [e for e in args.engines if e.startswith("jpaged")]:
        print(f"{LABELS[name]} ...", flush=True)
        runs[name] = run_jpaged(workload, single, args.single_tokens, args, name)
    hf_engines = [e for e in args.engines if e in ("hf", "hf-batch") or e.startswith("vllm")]
    folder = hf_model_dir(default_model_path()) if hf_engines else None
    if "hf" in args.engines or "hf-batch" in args.engines:
        model = load_hf_model(folder)
        if "hf" in args.engines:
            print("HF generate ...", flush=True)
            runs["hf"] = run_hf(model, workload, single, args.single_tokens, args.hf_batch_size,
                                tokenizer.pad_token_id, args.single_rounds)
        if "hf-batch" in args.engines:
            print("HF continuous batching ...", flush=True)
            runs["hf-batch"] = run_hf_batch(model, workload, single, args.single_tokens, args)
        del model
    for name in [e for e in args.engines if e.startswith("vllm")]:
        print(f"{LABELS[name]} ...", flush=True)
        try:
            runs[name] = run_vllm(args.vllm_python, folder, workload, single, args.single_tokens, args, name)
        except (OSError, subprocess.CalledProcessError) as error:
            print(f"{LABELS[name]} left out: {error}")
            failed[name] = str(error)
    if "llama.cpp" in args.engines:
        print("llama.cpp ...", flush=True)
        try:
            runs["llama.cpp"] = run_llama_cpp(args.llama_cpp_python, default_model_path(), workload, single,
                                              args.single_tokens, args)
        except (OSError, subprocess.CalledProcessError) as error:
            print(f"llama.cpp left out: {error}")
            failed["llama.cpp"] = str(error)
    return runs


def main() -> None:
    args = parse_args()
    gguf = default_model_path()
    tokenizer = open_cached(gguf)[1]()
    workload = build_workload(args.workload, tokenizer, args.num_requests, args.output_cap)
    single = chat_token_ids(tokenizer, [{"role": "user", "content": SINGLE_QUESTION}])
    prompt_lengths = [len(p) for p in workload.prompts]
    print(f"{args.workload}: {len(workload.prompts)} requests, prompts {min(prompt_lengths)}..{max(prompt_lengths)} "
          f"tokens, outputs {min(workload.max_tokens)}..{max(workload.max_tokens)} "
          f"({sum(workload.max_tokens)} in all); engines: {', '.join(args.engines)}")
    failed: dict[str, str] = {}
    runs = run_engines(args, workload, single, tokenizer, failed)
    if not runs:
        raise SystemExit(f"no engine could run (asked for: {', '.join(args.engines)}); see the lines above")
    summary = summarise(runs, workload)
    print_table(summary)
    result = {"workload": args.workload, "temperature": args.temperature, "num_requests": len(workload.prompts),
              "prompt_tokens": sum(prompt_lengths), "prompt_tokens_range": [min(prompt_lengths), max(prompt_lengths)],
              "output_tokens": sum(workload.max_tokens), "max_tokens": workload.max_tokens,
              "single_tokens": args.single_tokens, "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(), "versions": versions(),
              "engines_failed": failed, **summary}
    save_json(result, args.out)
    sampled = f", temperature {args.temperature}" if args.temperature else ""
    plot(summary, f"{args.workload}{sampled}: {len(workload.prompts)} requests, {sum(workload.max_tokens)} output tokens, "
                  f"{os.cpu_count()} CPU cores", args.out.with_suffix(".png"))
    if failed:
        raise SystemExit(f"engines asked for but left out: {', '.join(failed)} (see above; the JSON's engines_failed)")


if __name__ == "__main__":
    main()
