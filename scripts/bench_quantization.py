"""Quantized weights and KV cache against float: device bytes, perplexity, batch throughput and
single-request decode speed, one engine per format, in one run.

    python scripts/bench_quantization.py [--formats float32,int8,...] [--out bench_results/quantization.json]
    python scripts/bench_quantization.py --random-0.5b [--out bench_results/quantization_0.5b.json]

Formats (`FORMATS`): float32 (the default model's GGUF dequantized at load, as by default) and
bfloat16; int8 and fp8 weights (quantized at load from the float32 values); gguf (the file's own
blocks kept packed); float32 weights with an int8 or fp8 KV cache; int8 weights with an int8 KV
cache. For each: the weights' device bytes (`engine.stats().weight_bytes`) and the KV cache's
bytes per token (scales included); perplexity over `tests/data/public_domain.txt` (the
Declaration of Independence and the start of the US Constitution, about 2,500 tokens of the
default model's tokenizer, scored as one prompt through `prompt_logprobs`); output tokens/s of the
64-request (`--num-requests`) chat workload of `bench_throughput.py` (greedy, EOS ignored, a cold pass that
compiles, then the timed pass); and one request's decode speed (128 tokens, the prefill and
first token's time taken out), measured last in `--single-rounds` rounds with every format's
engine loaded side by side and the formats one after another within a round, reported as the
median and as each round's ratio to the first format: this VM's speed drifts over minutes, and
ratios of runs seconds apart drift less.

`--random-0.5b` runs the formats but gguf on a random-weight Llama of 0.47B parameters (the
default model's vocabulary, 24 layers of width 1024) built once into `--random-dir`: bytes,
perplexity over the same token ids (random weights: only its change across formats means
anything) and single-request decode speed (32 tokens); no batch pass. Prints a table, saves JSON and a
bar plot beside it.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

from bench_common import _at_least, positive_int, pyplot, save_figure, save_json  # noqa: E402
from bench_throughput import SINGLE_QUESTION, chat_workload  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402
from jpaged.llm import chat_token_ids  # noqa: E402
from jpaged.loader.source import open_model  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "public_domain.txt"
FORMATS = {
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "int8": dict(dtype="float32", quantization="int8"),
    "fp8": dict(dtype="float32", quantization="fp8"),
    "gguf": dict(dtype="float32", quantization="gguf"),
    "kv-int8": dict(dtype="float32", kv_cache_dtype="int8"),
    "kv-fp8": dict(dtype="float32", kv_cache_dtype="fp8_e4m3"),
    "int8+kv-int8": dict(dtype="float32", quantization="int8", kv_cache_dtype="int8"),
}
SINGLE_TOKENS = 128
RANDOM_SINGLE_TOKENS = 32
RANDOM_MODEL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    num_key_value_heads=4, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False)


def at_least_two(text: str) -> int:
    """An argparse type: an integer >= 2 (a decode speed needs a token past the first)."""
    return _at_least(text, 2)


def perplexity(llm: LLM, token_ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of each token after the first, given those before it."""
    out = llm.generate({"prompt_token_ids": token_ids}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    nll = [-entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], token_ids[1:])]
    return math.exp(sum(nll) / len(nll))


def timed(llm: LLM, requests, params) -> float:
    llm.engine.reset_prefix_cache()
    started = time.perf_counter()
    llm.generate(requests, params, use_tqdm=False)
    return time.perf_counter() - started


def text_token_ids(limit: int | None) -> list[int]:
    """The text in the default model's tokens, the first `limit` of them (None: all)."""
    tokenizer = open_model(None).load_tokenizer()
    return tokenizer.encode(TEXT.read_text(), add_special_tokens=False)[:limit]


def measure(name: str, kwargs: dict, text_ids: list[int], model: str | None, num_requests: int) -> dict:
    """One format's row of bytes and perplexity; `model` None: the default model, with the batch
    pass of `num_requests` too; else a random model, without it. (One-request speed:
    `single_request_rounds`.)"""
    llm = LLM(model, max_model_len=4096, **kwargs)
    stats, runner = llm.engine.stats(), llm.engine.runner
    row = {"format": name, "weight_mib": stats.weight_bytes / 2**20,
           "kv_bytes_per_token": runner.block_bytes // runner.block_size,
           "text_tokens": len(text_ids), "perplexity": perplexity(llm, text_ids)}
    if model is not None:
        return row
    tokenizer = llm.get_tokenizer()
    workload = chat_workload(tokenizer, num_requests)
    requests = [{"prompt_token_ids": p} for p in workload.prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.max_tokens]
    timed(llm, requests, params)  # compiles
    row["batch_tokens_per_s"] = sum(workload.max_tokens) / timed(llm, requests, params)
    return row


def single_request_rounds(names: list[str], model: str | None, text_ids: list[int], rounds: int,
                          tokens: int) -> dict:
    """Each format's one-request decode tokens/s of `tokens` tokens in `rounds` rounds, the formats' engines loaded
    side by side (a small KV cache each) and measured one after another within a round, so that
    a ratio to float32 compares runs seconds apart on a VM whose speed drifts over minutes."""
    engines = {name: LLM(model, max_model_len=1024, num_blocks=64, **FORMATS[name]) for name in names}
    if model is None:
        tokenizer = next(iter(engines.values())).get_tokenizer()
        question = [{"role": "user", "content": SINGLE_QUESTION}]
        request = {"prompt_token_ids": chat_token_ids(tokenizer, question)}
    else:
        request = {"prompt_token_ids": text_ids[:64]}
    rates = {name: [] for name in names}
    for _ in range(rounds):
        for name, llm in engines.items():
            rates[name].append(decode_speed(llm, request, tokens))
    return rates


def decode_speed(llm: LLM, request: dict, tokens: int) -> float:
    """One request's decode tokens/s: (tokens - 1) over the time of `tokens` output tokens less
    that of one (the prefill and first token), each after a warm-up run; NaN where the difference
    is not positive (too few tokens to time against this VM's noise)."""
    times = {}
    for n in (1, tokens):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        timed(llm, request, params)
        times[n] = timed(llm, request, params)
    decoding = times[tokens] - times[1]
    return (tokens - 1) / decoding if decoding > 0 else math.nan


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    keys = [("weight_mib", "weights (MiB)"), ("kv_bytes_per_token", "KV bytes per token"), ("perplexity", "perplexity"),
            ("batch_tokens_per_s", "64 requests, output tok/s"), ("single_tokens_per_s", "one request, tok/s")]
    keys = [(key, label) for key, label in keys if key in rows[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4))
    for ax, (key, label) in zip(axes, keys):
        ax.bar([r["format"] for r in rows], [r[key] for r in rows], color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=60)
    save_figure(fig, title, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"subset of {','.join(FORMATS)}")
    parser.add_argument("--random-0.5b", dest="random", action="store_true",
                        help="a random-weight 0.47B Llama instead of the default model (no gguf, no batch pass)")
    parser.add_argument("--random-dir", default="bench_results/random-0.5b", help="where the random model is kept")
    parser.add_argument("--single-rounds", type=positive_int, default=5, help="rounds of the one-request measurement")
    parser.add_argument("--single-tokens", type=at_least_two, default=None,
                        help=f"tokens of the one-request measurement (default: {SINGLE_TOKENS}; "
                             f"{RANDOM_SINGLE_TOKENS} with --random-0.5b)")
    parser.add_argument("--num-requests", type=positive_int, default=64, help="requests of the batch pass")
    parser.add_argument("--text-tokens", type=positive_int, default=None,
                        help="score only the text's first tokens (default: all of it)")
    parser.add_argument("--out", default="bench_results/quantization.json", help="JSON path; the plot goes beside it")
    args = parser.parse_args()
    unknown = [name for name in args.formats.split(",") if name not in FORMATS]
    if unknown:
        parser.error(f"--formats: unknown {', '.join(map(repr, unknown))}; choose from {','.join(FORMATS)}")
    names = [name for name in args.formats.split(",") if not args.random or name != "gguf"]
    if not names:
        parser.error("--formats: the random model has no gguf form; name another format")
    model = random_model(Path(args.random_dir)) if args.random else None
    text_ids = text_token_ids(args.text_tokens)
    single_tokens = args.single_tokens or (RANDOM_SINGLE_TOKENS if args.random else SINGLE_TOKENS)
    rows = []
    for name in names:
        rows.append(measure(name, FORMATS[name], text_ids, model, args.num_requests))
        gc.collect()
        print(rows[-1], flush=True)
    rates = single_request_rounds(names, model, text_ids, args.single_rounds, single_tokens)
    for row in rows:
        row["single_tokens_per_s_rounds"] = rates[row["format"]]
        row["single_tokens_per_s"] = statistics.median(rates[row["format"]])
        row["single_ratio_rounds"] = [a / b for a, b in zip(rates[row["format"]], rates[rows[0]["format"]])]
    print({name: [round(r, 1) for r in rate] for name, rate in rates.items()}, flush=True)
    float_ppl = rows[0]["perplexity"]
    print(f"\n| format | weights MiB | KV bytes/token | perplexity ({rows[0]['text_tokens']} tokens) | vs {rows[0]['format']} "
          "| batch tok/s | single tok/s (median) | single vs first, each round |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        batch = f"{r['batch_tokens_per_s']:.1f}" if "batch_tokens_per_s" in r else "-"
        ratios = " ".join(f"{x:.2f}" for x in r["single_ratio_rounds"])
        print(f"| {r['format']} | {r['weight_mib']:.1f} | {r['kv_bytes_per_token']:,} | {r['perplexity']:.3f} | "
              f"{100 * (r['perplexity'] / float_ppl - 1):+.2f}% | {batch} | {r['single_tokens_per_s']:.1f} | {ratios} |")
    out = Path(args.out)
    save_json({"rows": rows, "model": "random 0.47B Llama" if model else "default"}, out)
    title = "Random 0.47B Llama" if model else "Default model (SmolLM2-135M-Instruct)"
    plot(rows, out.with_suffix(".png"), f"{title} by weight and KV format, this CPU")


def random_model(folder: Path) -> str:
    """The random-weight Llama of `RANDOM_MODEL`, built (with torch, about a minute) unless `folder` has it."""
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(TEXT.parents[1]))
        from hf_models import save_random_model
        from transformers import LlamaConfig

        save_random_model(folder, LlamaConfig(**RANDOM_MODEL), std=0.02)
    return str(folder)


if __name__ == "__main__":
    main()
