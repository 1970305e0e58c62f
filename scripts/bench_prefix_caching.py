"""Throughput with a shared system prompt: prefix caching on against off.

Every request starts with the same long system prompt and asks its own short question. With
prefix caching, the system prompt's full blocks are computed once and reused by every later
request; without it, each request prefills the whole prompt.

    python scripts/bench_prefix_caching.py [--model PATH] [--num-requests 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import time

from bench_common import positive_int, save_json

from jpaged import LLM, SamplingParams
from jpaged.llm import chat_token_ids

SYSTEM_PROMPT = (
    "You are a careful assistant for a public library. Answer briefly and politely. "
    "The library opens at nine in the morning and closes at six in the evening, Monday to Saturday. "
    "Members may borrow up to ten books for three weeks and renew them twice online. "
    "Late returns cost ten cents a day per book. The children's room is on the first floor, "
    "the quiet study hall on the second, and the archive, open by appointment only, in the basement. "
    "Printing costs five cents a page. Wi-Fi is free; the password is at the front desk. "
    "Lost cards are replaced for two dollars. Events are listed on the board by the entrance. "
) * 2
QUESTIONS = ["When do you open?", "How many books can I borrow?", "Where is the children's room?",
             "How much is printing?", "Is there Wi-Fi?", "What if I lose my card?", "Can I renew online?",
             "Where is the archive?"]


def shared_prefix_prompts(tokenizer, count: int) -> list[dict]:
    """`count` questions after the same system prompt, through the chat template (the default
    model is SmolLM2-135M-Instruct), or one after the other as plain text for a model without one."""
    def prompt(i: int) -> list[int]:
        question = QUESTIONS[i % len(QUESTIONS)] + f" (request {i})"
        if not getattr(tokenizer, "chat_template", None):
            return tokenizer.encode(f"{SYSTEM_PROMPT}\n\n{question}\n")
        return chat_token_ids(tokenizer, [{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": question}])

    return [{"prompt_token_ids": prompt(i)} for i in range(count)]


def run(llm: LLM, prompts, params) -> dict:
    llm.generate(prompts[:2], params, use_tqdm=False)  # host-side warm-up
    llm.engine.reset_prefix_cache()
    before = llm.engine.stats()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    after = llm.engine.stats()
    return {
        "seconds": seconds,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
        "prompt_tokens_computed": after.num_prompt_tokens_computed - before.num_prompt_tokens_computed,
        "cached_prompt_tokens": sum(o.metrics.num_cached_prompt_tokens for o in outputs),
        "mean_time_to_first_token": sum(o.metrics.time_to_first_token for o in outputs) / len(outputs),
        "token_ids": [o.outputs[0].token_ids for o in outputs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: the built-in model)")
    parser.add_argument("--num-requests", type=positive_int, default=32)
    parser.add_argument("--max-tokens", type=positive_int, default=32)
    parser.add_argument("--out", default="bench_results/prefix_caching.json")
    args = parser.parse_args()

    caching = LLM(args.model, enable_prefix_caching=True)
    prompts = shared_prefix_prompts(caching.get_tokenizer(), args.num_requests)
    longest = max(len(p["prompt_token_ids"]) for p in prompts) + args.max_tokens
    if longest > caching.engine.max_model_len:
        parser.error(f"the prompts share a system prompt of about {len(prompts[0]['prompt_token_ids'])} tokens: with "
                     f"--max-tokens {args.max_tokens} they need a context of {longest} tokens, more than the model's "
                     f"{caching.engine.max_model_len}")
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    caching.engine.warm_up()  # every step program compiled before timing, in both engines: neither pays for a compile
    on = run(caching, prompts, params)
    del caching
    off = run(LLM(args.model, enable_prefix_caching=False, compile_warmup=True), prompts, params)
    rows = [("", "caching on", "caching off")]
    for key, label in (("seconds", "wall time (s)"), ("prompt_tokens_computed", "prompt tokens computed"),
                       ("cached_prompt_tokens", "prompt tokens from cache"),
                       ("mean_time_to_first_token", "mean time to first token (s)")):
        rows.append((label, f"{on[key]:.2f}" if isinstance(on[key], float) else str(on[key]),
                     f"{off[key]:.2f}" if isinstance(off[key], float) else str(off[key])))
    rows.append(("output tokens/s", f"{on['output_tokens'] / on['seconds']:.1f}",
                 f"{off['output_tokens'] / off['seconds']:.1f}"))
    for row in rows:
        print(f"{row[0]:<32}{row[1]:>14}{row[2]:>14}")
    identical = on["token_ids"] == off["token_ids"]
    print(f"speed-up: {off['seconds'] / on['seconds']:.2f}x; outputs identical: {identical}")
    result = {"machine": platform.machine(), "num_requests": args.num_requests,
              "prompt_tokens_per_request": on["prompt_tokens"] / args.num_requests,
              "speedup": off["seconds"] / on["seconds"], "outputs_identical": identical,
              "on": {k: v for k, v in on.items() if k != "token_ids"},
              "off": {k: v for k, v in off.items() if k != "token_ids"}}
    save_json(result, args.out)


if __name__ == "__main__":
    main()
