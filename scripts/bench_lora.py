"""LoRA serving: what adapters cost, in jpaged and in its peers, on the default model.

SmolLM2-135M-Instruct (the default model's GGUF, dequantized to float32) serves the chat workload
of scripts/bench_throughput.py (`--num-requests` requests, outputs capped at `--output-cap`;
greedy, EOS ignored) in four settings:

    base          an engine without LoRA
    lora, none    an engine with LoRA on, every request on the base model
    lora, one     every request through adapter 0
    lora, mixed   request i through adapter i % `--num-adapters` (every adapter in every step)

The adapters are `--num-adapters` PEFT LoRA adapters of rank `--rank` on every projection of every
layer, made once by PEFT with random factors (B scaled down, so that the answers change but stay
answers) and kept in jpaged's cache directory (`lora_bench/`). Engines with LoRA hold
`--num-adapters` adapters at once (`max_loras`).

Engines: jpaged; vLLM's CPU build when `--vllm-python` names its venv's python (see
scripts/bench_vllm_worker.py); HF transformers + PEFT (`PeftModel`, static left-padded batches
of `--hf-batch-size`; mixed adapters through PEFT's `adapter_names`). Each setting's outputs are
checked token for token against jpaged's. Warm-up is excluded: jpaged runs each setting once cold
first, vLLM and HF run a short pass over all requests. One request alone (`--single-tokens`,
through the first request's adapter) is timed after a warm-up, the median of `--single-rounds`.

Output: a table, a JSON file (`--out`) and a bar plot beside it (same name, `.png`).

    python scripts/bench_lora.py --vllm-python /work/vllm-venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import jax
from bench_common import positive_float, positive_int, pyplot, save_figure, save_json
from bench_throughput import (
    SINGLE_QUESTION,
    EngineRun,
    Workload,
    build_workload,
    compare,
    hf_model_dir,
    load_hf_model,
    requests_json,
    run_worker,
    versions,
)

from jpaged import LLM, LoRARequest, SamplingParams
from jpaged.cache_dir import cache_dir
from jpaged.llm import chat_token_ids
from jpaged.loader.default_model import default_model_path
from jpaged.loader.gguf_cache import open_cached

SETTINGS = ("base", "lora, none", "lora, one", "lora, mixed")
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(folder: Path, count: int, rank: int) -> list[Path]:
    """`count` PEFT adapters of `rank` on every projection of the HF model in `folder`, written once."""
    paths = [cache_dir() / "lora_bench" / f"{folder.name}-r{rank}-{i}" for i in range(count)]
    missing = [p for p in paths if not (p / "adapter_model.safetensors").is_file()]
    if missing:
        import peft
        import torch

        for path in missing:
            torch.manual_seed(paths.index(path))
            model = peft.get_peft_model(load_hf_model(folder), peft.LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=MODULES, init_lora_weights=False))
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.mul_(0.05)
            model.save_pretrained(path)
    return paths


def adapter_of(setting: str, count: int, num_adapters: int) -> list[int | None]:
    """Each request's adapter index in `setting` (None: the base model)."""
    if setting == "lora, one":
        return [0] * count
    if setting == "lora, mixed":
        return [i % num_adapters for i in range(count)]
    return [None] * count


def run_jpaged(workload: Workload, single: list[int], adapters: list[Path], args) -> dict[str, EngineRun]:
    """Every setting: the base engine, then one engine with LoRA for the three others."""
    runs = {}
    settings = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    cpu_kv_cache_gib=args.kv_cache_gib)
    requests = [LoRARequest(f"adapter{i}", i + 1, str(path)) for i, path in enumerate(adapters)]
    for lora_on in (False, True):
        llm = LLM(None, **settings, **(dict(enable_lora=True, max_loras=len(adapters), max_lora_rank=args.rank)
                                      if lora_on else {}))
        for setting in SETTINGS[1:] if lora_on else SETTINGS[:1]:
            print(f"jpaged, {setting} ...", flush=True)
            loras = [None if i is None else requests[i] for i in adapter_of(setting, len(workload.prompts), len(adapters))]
            runs[setting] = timed_jpaged(llm, workload, single, loras, args)
        del llm
    return runs


def timed_jpaged(llm: LLM, workload: Workload, single: list[int], loras: list, args) -> EngineRun:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.max_tokens]
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]

    def timed(prompts, sampling, loras) -> tuple[float, list[list[int]]]:
        llm.engine.reset_prefix_cache()
        started = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False, lora_request=loras)
        return time.perf_counter() - started, [list(o.outputs[0].token_ids) for o in outputs]

    cold, _ = timed(prompts, params, loras)
    seconds, token_ids = timed(prompts, params, loras)
    single_params = [SamplingParams(temperature=0.0, max_tokens=args.single_tokens, ignore_eos=True)]
    single_prompt, single_lora = [{"prompt_token_ids": single}], loras[:1]
    timed(single_prompt, single_params, single_lora)
    single_seconds = statistics.median(timed(single_prompt, single_params, single_lora)[0]
                                       for _ in range(args.single_rounds))
    return EngineRun(seconds, token_ids, args.single_tokens / single_seconds,
                     {"cold_seconds": cold, "compilations": llm.engine.stats().num_compilations})


def run_vllm(python: str, folder: Path, workload: Workload, single: list[int], adapters: list[Path], args
             ) -> dict[str, EngineRun]:
    """vLLM in its own venv (scripts/bench_vllm_worker.py): one worker per setting."""
    runs = {}
    for setting in SETTINGS:
        print(f"vLLM, {setting} ...", flush=True)
        job = {"model": str(folder),
               "engine": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                          "max_model_len": 2048, "kv_cache_gib": args.kv_cache_gib, "enable_prefix_caching": True,
                          "lora": None if setting == "base" else {"max_loras": len(adapters),
                                                                  "max_lora_rank": args.rank}},
               **requests_json(workload, single, args.single_tokens, args.single_rounds)}
        if setting != "base":
            job["loras"] = [str(path) for path in adapters]
            for request, index in zip(job["requests"], adapter_of(setting, len(workload.prompts), len(adapters))):
                request["lora"] = index
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}")
        try:
            result, process_seconds = run_worker(python, "bench_vllm_worker.py", job, env)
        except (OSError, subprocess.CalledProcessError) as error:
            print(f"vLLM, {setting} left out: {error}")
            continue
        runs[setting] = EngineRun(result["seconds"], result["token_ids"],
                                  result["single_tokens"] / result["single_seconds"],
                                  {"startup_seconds": result["startup_seconds"], "process_seconds": process_seconds,
                                   "versions": result["versions"]})
    return runs


def run_hf(folder: Path, workload: Workload, single: list[int], adapters: list[Path], args) -> dict[str, EngineRun]:
    """HF transformers + PEFT: static left-padded batches, run until their longest request is done."""
    import peft
    import torch

    model = peft.PeftModel.from_pretrained(load_hf_model(folder), str(adapters[0]), adapter_name="adapter0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"adapter{i}")
    model.eval()
    pad = 0

    def generate(prompts, names, max_new_tokens):
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=None, pad_token_id=pad, adapter_names=names)
        return out[:, width:].tolist()

    runs = {}
    for setting in SETTINGS[1:]:
        print(f"HF + PEFT, {setting} ...", flush=True)
        names = ["__base__" if i is None else f"adapter{i}"
                 for i in adapter_of(setting, len(workload.prompts), len(adapters))]
        size = args.hf_batch_size
        generate(workload.prompts[:size], names[:size], 8)  # warm-up
        token_ids, started = [], time.perf_counter()
        for first in range(0, len(workload.prompts), size):
            limits = workload.max_tokens[first:first + size]
            rows = generate(workload.prompts[first:first + size], names[first:first + size], max(limits))
            token_ids += [row[:limit] for row, limit in zip(rows, limits)]
        seconds = time.perf_counter() - started
        generate([single], names[:1], args.single_tokens)
        single_seconds = statistics.median(_seconds(lambda: generate([single], names[:1], args.single_tokens))
                                           for _ in range(args.single_rounds))
        runs[setting] = EngineRun(seconds, token_ids, args.single_tokens / single_seconds)
    return runs


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def summarise(runs: dict[str, dict[str, EngineRun]], workload: Workload) -> dict:
    """Per engine and setting: output tokens/s, single-request rate, agreement with jpaged."""
    table = {}
    for engine, settings in runs.items():
        for setting, run in settings.items():
            tokens = sum(len(t) for t in run.token_ids)
            reference = runs["jpaged"].get(setting) if "jpaged" in runs else None
            table[f"{engine} | {setting}"] = {
                "engine": engine, "setting": setting, "seconds": run.seconds, "output_tokens": tokens,
                "tokens_per_s": tokens / run.seconds, "single_decode_tokens_per_s": run.single_tokens_per_s,
                "exact_lengths": [len(t) for t in run.token_ids] == workload.max_tokens,
                "agreement": compare(reference.token_ids, run.token_ids) if reference else None, **run.details}
    return table


def print_table(table: dict) -> None:
    print(f"{'engine':<12}{'setting':<14}{'output tok/s':>14}{'single tok/s':>14}{'same as jpaged':>16}{'wall s':>9}")
    for entry in table.values():
        agreement = entry["agreement"]
        same = f"{agreement['identical']}/{agreement['total']}" if agreement else "-"
        print(f"{entry['engine']:<12}{entry['setting']:<14}{entry['tokens_per_s']:>14.1f}"
              f"{entry['single_decode_tokens_per_s']:>14.1f}{same:>16}{entry['seconds']:>9.1f}")


def plot(table: dict, title: str, path: Path) -> Path:
    """Grouped bars: per setting, each engine's batch throughput and single-request rate."""
    plt = pyplot()
    if plt is None:
        return

    engines = list(dict.fromkeys(entry["engine"] for entry in table.values()))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    width = 0.8 / len(engines)
    for ax, key, heading in ((axes[0], "tokens_per_s", "batch throughput"),
                             (axes[1], "single_decode_tokens_per_s", "one request alone")):
        for k, engine in enumerate(engines):
            values = [table.get(f"{engine} | {s}", {}).get(key, float("nan")) for s in SETTINGS]  # nan: not run
            bars = ax.bar([i + k * width for i in range(len(SETTINGS))], values, width, label=engine)
            ax.bar_label(bars, labels=[f"{v:.0f}" if v == v else "" for v in values], fontsize=7)
        ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(SETTINGS))], SETTINGS, fontsize=8)
        ax.set_title(heading)
        ax.set_ylabel("output tokens/s")
        ax.legend(fontsize=8)
    return save_figure(fig, title, path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=positive_int, default=32)
    parser.add_argument("--output-cap", type=positive_int, default=64)
    parser.add_argument("--num-adapters", type=positive_int, default=4)
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--engines", default="jpaged,vllm,hf", help="comma-separated subset of jpaged,vllm,hf")
    parser.add_argument("--vllm-python", help="python of the venv with vllm-cpu (needed for the vllm engine)")
    parser.add_argument("--hf-batch-size", type=positive_int, default=32)
    parser.add_argument("--max-num-seqs", type=positive_int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=512)
    parser.add_argument("--kv-cache-gib", type=positive_float, default=2.0)
    parser.add_argument("--single-tokens", type=positive_int, default=64)
    parser.add_argument("--single-rounds", type=positive_int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_results/lora.json"))
    args = parser.parse_args()
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(args.engines) - {"jpaged", "vllm", "hf"}:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))}")
    if "vllm" in args.engines and not args.vllm_python:
        print("vllm skipped: no --vllm-python given")
        args.engines.remove("vllm")
    return args


def main() -> None:
    args = parse_args()
    gguf = default_model_path()
    tokenizer = open_cached(gguf)[1]()
    workload = build_workload("chat", tokenizer, args.num_requests, args.output_cap)
    single = chat_token_ids(tokenizer, [{"role": "user", "content": SINGLE_QUESTION}])
    folder = hf_model_dir(gguf)
    adapters = make_adapters(folder, args.num_adapters, args.rank)
    print(f"chat: {len(workload.prompts)} requests, {sum(workload.max_tokens)} output tokens; {len(adapters)} adapters "
          f"of rank {args.rank}; engines: {', '.join(args.engines)}")
    runs = {}
    if "jpaged" in args.engines:
        runs["jpaged"] = run_jpaged(workload, single, adapters, args)
    if "vllm" in args.engines:
        runs["vllm"] = run_vllm(args.vllm_python, folder, workload, single, adapters, args)
    if "hf" in args.engines:
        runs["hf+peft"] = run_hf(folder, workload, single, adapters, args)
    table = summarise(runs, workload)
    print_table(table)
    result = {"num_requests": len(workload.prompts), "output_tokens": sum(workload.max_tokens),
              "num_adapters": len(adapters), "rank": args.rank, "single_tokens": args.single_tokens,
              "machine": f"{platform.machine()} {platform.processor()}".strip(), "cpu_count": os.cpu_count(),
              "jax_backend": jax.default_backend(), "versions": versions(), "results": table}
    save_json(result, args.out)
    plot(table, f"LoRA on SmolLM2-135M: {len(workload.prompts)} requests, {len(adapters)} adapters of rank {args.rank}, "
                f"{os.cpu_count()} CPU cores", args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
