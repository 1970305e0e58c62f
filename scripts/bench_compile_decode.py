"""Compile time of the jitted step and decode step time of the default model (CPU).

`LLM()` (SmolLM2-135M-Instruct, 30 layers, float32) with the persistent compilation cache off.
Compile time: jax's trace, lowering and XLA compile durations of every step program (`_step_fn`,
the model) and sampler program (`_sample`) the run builds: one 272-token prompt generated greedily for 16 tokens (its prefill and decode
programs), then one decode program per batch size. Decode step time: `n` requests, each with
its own random 64-token prompt, decoding greedily with EOS ignored; after the prompts and two
untimed steps, the median wall time of 8 `engine.step()` calls.

    python scripts/bench_compile_decode.py [--out FILE] [--rows 1 8 64]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from bench_common import positive_int, save_json
from jax import monitoring

from jpaged import LLM, SamplingParams

rng = np.random.default_rng(0)


def listen_to_step_compiles() -> dict[str, list[float]]:
    """Seconds of each compile phase (`jaxpr_trace_duration`, ...) of each step and sampler program, in order."""
    durations = defaultdict(list)

    def listen(event, seconds, fun_name="", **_):
        if event.startswith("/jax/core/compile/") and ("_step_fn" in str(fun_name) or "_sample" in str(fun_name)):
            durations[event.rsplit("/", 1)[1]].append(seconds)

    monitoring.register_event_duration_secs_listener(listen)
    return durations


def decode_step_ms(engine, rows: int, prompt_len: int = 64, steps: int = 8) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    ids = [f"decode{rows}-{i}" for i in range(rows)]
    for request_id in ids:
        engine.add_request(request_id, rng.integers(100, 49000, prompt_len).tolist(), params)
    seqs = [engine.get_sequence(request_id) for request_id in ids]
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in seqs):
        engine.step()
    for _ in range(2):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for request_id in ids:
        engine.abort_request(request_id)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON result file")
    parser.add_argument("--rows", type=positive_int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args()
    durations = listen_to_step_compiles()
    llm = LLM(compilation_cache=False)
    prompt = {"prompt_token_ids": rng.integers(100, 49000, 272).tolist()}
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    first_generate_s = time.perf_counter() - start
    decode_ms = {rows: decode_step_ms(llm.engine, rows) for rows in args.rows}
    per_program = np.sum([durations[phase] for phase in sorted(durations)], axis=0)
    result = dict(first_generate_s=first_generate_s, decode_step_ms=decode_ms,
                  compile_s_per_program=per_program.tolist(), compile_phases_s=dict(durations))
    print(f"first generate {first_generate_s:.2f} s; step and sampler programs: {len(per_program)}, "
          f"compile median {np.median(per_program):.2f} s, total {per_program.sum():.1f} s")
    print("decode step ms: " + ", ".join(f"{rows} rows {ms:.1f}" for rows, ms in decode_ms.items()))
    if args.out:
        save_json(result, args.out)


if __name__ == "__main__":
    main()
