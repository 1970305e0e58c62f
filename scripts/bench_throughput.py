"""Offline throughput: jpaged against HF transformers `generate` on the same chat requests.

Both run SmolLM2-135M-Instruct (the default model's GGUF, dequantized to float32) greedily on
the same requests. HF batches them with left padding, so a batch runs until its longest
request is done; jpaged batches continuously. Useful tokens are counted the same way for
both: each request's tokens up to its EOS or its own `max_tokens`.

    python scripts/bench_throughput.py [--num-requests 64] [--hf-batch-size 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
from bench_common import save_json

from jpaged import LLM, SamplingParams
from jpaged.llm import chat_token_ids
from jpaged.loader.default_model import default_model_path

TOPICS = ["the moon", "volcanoes", "honey bees", "the Roman empire", "rainbows", "chess", "coffee",
          "the ocean", "penguins", "electricity", "bread", "the piano", "glaciers", "owls",
          "the internet", "tea"]
TEMPLATES = ["What is {}? Answer in one sentence.", "Tell me three facts about {}.",
             "Write a short poem about {}.", "Explain {} to a child."]
MAX_TOKENS = [24, 64, 128, 200]


def build_requests(tokenizer, count: int) -> tuple[list[list[int]], list[int]]:
    prompts, max_tokens = [], []
    for i in range(count):
        question = TEMPLATES[i % len(TEMPLATES)].format(TOPICS[(i // len(TEMPLATES)) % len(TOPICS)])
        prompts.append(chat_token_ids(tokenizer, [{"role": "user", "content": question}]))
        max_tokens.append(MAX_TOKENS[(i * 3 + i // 4) % len(MAX_TOKENS)])
    return prompts, max_tokens


def useful(tokens: list[int], limit: int, eos_ids: set[int]) -> list[int]:
    tokens = tokens[:limit]
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


def run_jpaged(llm: LLM, prompts, max_tokens) -> tuple[float, list[list[int]]]:
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in max_tokens]
    llm.engine.reset_prefix_cache()  # no reuse of an earlier pass's prompts
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - started, [o.outputs[0].token_ids for o in outputs]


def run_hf(model, tokenizer, prompts, max_tokens, batch_size: int, eos_ids) -> tuple[float, list[list[int]]]:
    import torch

    results: list[list[int]] = []
    started = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                       max_new_tokens=max(max_tokens[first : first + batch_size]),
                                       pad_token_id=tokenizer.pad_token_id)
        for row, limit in zip(generated[:, width:].tolist(), max_tokens[first : first + batch_size]):
            results.append(useful(row, limit, eos_ids))
    return time.perf_counter() - started, results


def single_decode(llm, model, tokenizer, num_tokens: int) -> tuple[float, float]:
    import torch

    prompt = chat_token_ids(tokenizer, [{"role": "user", "content": "Tell me a long story."}])
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)  # compile every shape first
    started = time.perf_counter()
    llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    jpaged_rate = num_tokens / (time.perf_counter() - started)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=num_tokens,
                       min_new_tokens=num_tokens, pad_token_id=tokenizer.pad_token_id)
    return jpaged_rate, num_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--single-tokens", type=int, default=128)
    parser.add_argument("--out", default="bench_results/throughput.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    gguf = default_model_path()
    llm = LLM(None, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    tokenizer = llm.get_tokenizer()
    eos_ids = llm.engine.eos_token_ids
    prompts, max_tokens = build_requests(tokenizer, args.num_requests)

    cold_seconds, _ = run_jpaged(llm, prompts, max_tokens)
    compilations = llm.engine.stats().num_compilations
    jpaged_seconds, jpaged_tokens = run_jpaged(llm, prompts, max_tokens)

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    hf_seconds, hf_tokens = run_hf(model, tokenizer, prompts, max_tokens, args.hf_batch_size, eos_ids)
    jpaged_single, hf_single = single_decode(llm, model, tokenizer, args.single_tokens)

    num_jpaged = sum(len(t) for t in jpaged_tokens)
    num_hf = sum(len(t) for t in hf_tokens)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "jax_backend": jax.default_backend(),
        "torch_threads": torch.get_num_threads(),
        "num_requests": args.num_requests,
        "hf_batch_size": args.hf_batch_size,
        "jpaged_tokens": num_jpaged,
        "hf_tokens": num_hf,
        "jpaged_seconds": jpaged_seconds,
        "jpaged_cold_seconds": cold_seconds,
        "hf_seconds": hf_seconds,
        "jpaged_tokens_per_s": num_jpaged / jpaged_seconds,
        "hf_tokens_per_s": num_hf / hf_seconds,
        "throughput_ratio": (num_jpaged / jpaged_seconds) / (num_hf / hf_seconds),
        "identical_outputs": sum(a == b for a, b in zip(jpaged_tokens, hf_tokens)),
        "jpaged_single_decode_tokens_per_s": jpaged_single,
        "hf_single_decode_tokens_per_s": hf_single,
        "jpaged_compilations": compilations,
    }
    rows = [
        ("", "jpaged", "HF transformers"),
        ("batch throughput (tok/s)", f"{result['jpaged_tokens_per_s']:.1f}", f"{result['hf_tokens_per_s']:.1f}"),
        ("useful tokens", str(num_jpaged), str(num_hf)),
        ("wall time (s)", f"{jpaged_seconds:.1f} (cold {cold_seconds:.1f})", f"{hf_seconds:.1f}"),
        ("single-request decode (tok/s)", f"{jpaged_single:.1f}", f"{hf_single:.1f}"),
    ]
    for row in rows:
        print(f"{row[0]:<32}{row[1]:>24}{row[2]:>20}")
    print(f"throughput ratio jpaged / HF: {result['throughput_ratio']:.2f}x; "
          f"identical outputs: {result['identical_outputs']}/{args.num_requests}; "
          f"jpaged compilations: {compilations}")
    save_json(result, args.out)


if __name__ == "__main__":
    main()
