"""Quantized weights against float: device bytes, perplexity, batch throughput and single-request
decode speed of the default model, one engine per weight format, in one run.

    python scripts/bench_quantization.py [--formats float32,int8,fp8,gguf] [--out bench_results/quantization.json]

Formats: float32 (the GGUF dequantized at load, as by default), int8 and fp8 (quantized at load
from those float32 values), gguf (the file's own Q4_1 / Q8_0 blocks kept packed). For each: the
weights' device bytes (`engine.stats().weight_bytes`) and the KV cache's
bytes per token; perplexity over `tests/data/public_domain.txt` (the Declaration of Independence
and the start of the US Constitution, about 2,500 tokens, scored as one prompt through
`prompt_logprobs`); output tokens/s of the 64-request chat workload of `bench_throughput.py`
(greedy, EOS ignored, a cold pass that compiles, then the timed pass); and one request's decode
speed (128 tokens, after a warm-up run of it). Prints a table, saves JSON and a bar plot beside it.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from bench_common import save_json  # noqa: E402
from bench_throughput import SINGLE_QUESTION, chat_workload  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402
from jpaged.llm import chat_token_ids  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "public_domain.txt"
FORMATS = {  # bfloat16 is left out by default: XLA's CPU matmuls in bfloat16 make the chat pass take minutes
    "float32": dict(dtype="float32"),
    "int8": dict(dtype="float32", quantization="int8"),
    "fp8": dict(dtype="float32", quantization="fp8"),
    "gguf": dict(dtype="float32", quantization="gguf"),
    "bfloat16": dict(dtype="bfloat16"),
}
SINGLE_TOKENS = 128


def perplexity(llm: LLM, token_ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of each token after the first, given those before it."""
    out = llm.generate({"prompt_token_ids": token_ids}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    nll = [-entry[token] for entry, token in zip(out.prompt_logprobs[1:], token_ids[1:])]
    return math.exp(sum(nll) / len(nll))


def timed(llm: LLM, requests, params) -> float:
    llm.engine.reset_prefix_cache()
    started = time.perf_counter()
    llm.generate(requests, params, use_tqdm=False)
    return time.perf_counter() - started


def measure(name: str, kwargs: dict) -> dict:
    llm = LLM(None, **kwargs)
    tokenizer = llm.get_tokenizer()
    text_ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    stats, cfg = llm.engine.stats(), llm.engine.model_config
    kv_itemsize = 2 if kwargs["dtype"] == "bfloat16" else 4
    row = {"format": name, "weight_mib": stats.weight_bytes / 2**20,
           "kv_bytes_per_token": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_itemsize,
           "text_tokens": len(text_ids), "perplexity": perplexity(llm, text_ids)}
    workload = chat_workload(tokenizer, 64)
    requests = [{"prompt_token_ids": p} for p in workload.prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.max_tokens]
    timed(llm, requests, params)  # compiles
    row["batch_tokens_per_s"] = sum(workload.max_tokens) / timed(llm, requests, params)
    single = {"prompt_token_ids": chat_token_ids(tokenizer, [{"role": "user", "content": SINGLE_QUESTION}])}
    single_params = SamplingParams(temperature=0.0, max_tokens=SINGLE_TOKENS, ignore_eos=True)
    timed(llm, single, single_params)
    row["single_tokens_per_s"] = SINGLE_TOKENS / timed(llm, single, single_params)
    return row


def plot(rows: list[dict], path: Path) -> None:
    keys = [("weight_mib", "weights (MiB)"), ("perplexity", "perplexity"),
            ("batch_tokens_per_s", "64 requests, output tok/s"), ("single_tokens_per_s", "one request, tok/s")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for ax, (key, title) in zip(axes, keys):
        ax.bar([r["format"] for r in rows], [r[key] for r in rows], color="tab:blue")
        ax.set_title(title)
    fig.suptitle("Default model (SmolLM2-135M-Instruct) by weight format, this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="float32,int8,fp8,gguf", help=f"subset of {','.join(FORMATS)}")
    parser.add_argument("--out", default="bench_results/quantization.json")
    args = parser.parse_args()
    rows = []
    for name in args.formats.split(","):
        rows.append(measure(name, FORMATS[name]))
        gc.collect()
        print(rows[-1], flush=True)
    print(f"\n| format | weights MiB | KV bytes/token | perplexity ({rows[0]['text_tokens']} tokens) | "
          "batch tok/s | single tok/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['weight_mib']:.1f} | {r['kv_bytes_per_token']} | {r['perplexity']:.3f} | "
              f"{r['batch_tokens_per_s']:.1f} | {r['single_tokens_per_s']:.1f} |")
    out = Path(args.out)
    save_json({"rows": rows}, out)
    plot(rows, out.with_suffix(".png"))
    print(f"saved {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
