"""Where one engine step's time goes on CPU, per step kind, with the matmul, attention and sampler comparisons beside it.

On the default model (`LLM()`: SmolLM2-135M-Instruct, float32), each step kind runs warmed up
(its shape compiled by untimed steps first; the script checks that the timed steps compile
nothing): decode-only batches of 1, 8 and 64 sequences at contexts of about 280 tokens (each
its own random 272-token prompt, then greedy decoding with EOS ignored), and a mixed step of one
fresh 256-token prompt chunk plus 8 such decodes. Three measurements:

1. Host phases of `LLMEngine.step()`, timed by wrapping its pieces on the engine object (the
   engine's code is unchanged): `scheduler.schedule`, `runner.move_blocks`, `prepare_step`
   (batch and sampling arrays), the jitted call until it returns (dispatch), from then until its
   outputs are ready (`block_until_ready`: the step's own compute), the outputs' copy to numpy,
   and the rest of `step()` (append tokens, stop checks, detokenize, `RequestOutput`s).
   Medians over the timed steps.
2. Inside the jitted step, from a jax profiler trace of 3 more steps of the same kind: XLA's
   per-thunk durations summed over the threads that ran them (so parts can add up to more than
   the step's wall time where thunks overlap), each thunk assigned by the compiled module's
   metadata (op name, source function and file) to layer matmuls, attention (the CPU kernel's
   custom call, or the reference jnp paged attention), KV write, norms and RoPE, LM head, sampler, or other.
3. The clues: XLA's matmul against numpy's (OpenBLAS) on the decode shapes (per-layer shapes
   over all 30 layers' weights, both LM head layouts, and one 566 MB product that no cache
   holds), the reference
   attention as the block table's padded width grows over the same 256-token context, and the
   sampler with all rows greedy against one row and every row that sample with top-p or top-k.

    python scripts/bench_step_breakdown.py [--out docs/results/step_breakdown_cpu.json] [--steps 12]
    XLA_FLAGS=... python scripts/bench_step_breakdown.py --matmul-only --out FILE   # the matmuls alone
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import subprocess
import tempfile
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import positive_int, save_json
from flax import nnx
from jax.profiler import ProfileData

import jpaged.model_runner as model_runner
from jpaged import LLM, SamplingParams
from jpaged.model_runner import matmul_precision
from jpaged.sampler import sample_with_logprobs
from jpaged.step_batch import SamplingArrays
from pallas_kernels.paged_attention import AttentionMetadata, ragged_paged_attention

CHUNK = 256
DECODE_BATCHES = (1, 8, 64)
PHASES = ("schedule", "move_blocks", "prepare", "dispatch", "device", "to_numpy", "outputs", "total")
rng = np.random.default_rng(0)


def median_ms(fn, repeats: int = 7) -> float:
    """Median wall time of `fn()` in ms after one untimed call (which compiles)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


class StepClock:
    """Wraps the pieces of one engine's `step()` with timers; keeps the last jitted call's
    arguments (abstract: the KV cache is donated)."""

    def __init__(self, engine):
        self.times: dict[str, float] = defaultdict(float)
        self.args = None  # the last step's arguments (the donated KV cache's shape survives it)
        runner = engine.runner
        self.jitted = runner._step
        engine.scheduler.schedule = self._timed("schedule", engine.scheduler.schedule)
        runner.move_blocks = self._timed("move_blocks", runner.move_blocks)
        runner.execute = self._timed("execute", runner.execute)
        prepare = self._timed("prepare", model_runner.prepare_step)
        model_runner.prepare_step = prepare
        runner._step = self._split(runner._step)
        runner._sampler = self._split(runner._sampler, keep_args=False)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[name] += time.perf_counter() - start
        return timed

    def _split(self, programs, keep_args: bool = True):
        """The runner's program cache, its calls split into dispatch and device time (the step's
        and the sampler's together)."""
        recorder = self

        class Split:
            def __getattr__(self, name):  # prefetch, num_programs, ...: the cache's own
                return getattr(programs, name)

            def __call__(self, *args, **kwargs):
                if keep_args:
                    recorder.args = args  # as they are: mapping the tree here would count in the host phases
                start = time.perf_counter()
                out = programs(*args, **kwargs)
                returned = time.perf_counter()
                jax.block_until_ready(out)
                recorder.times["dispatch"] += returned - start
                recorder.times["device"] += time.perf_counter() - returned
                return out

        return Split()

    def step(self, engine) -> dict[str, float]:
        """Run one engine step; its phases in ms."""
        self.times.clear()
        start = time.perf_counter()
        engine.step()
        t = defaultdict(float, self.times, total=time.perf_counter() - start)
        t["to_numpy"] = t["execute"] - t["prepare"] - t["dispatch"] - t["device"]
        t["outputs"] = t["total"] - t["schedule"] - t["move_blocks"] - t["execute"]
        return {name: 1e3 * t[name] for name in PHASES}


def random_prompt(length: int) -> list[int]:
    return rng.integers(100, 49000, length).tolist()


def start_decodes(engine, count: int, prompt_tokens: int) -> None:
    """Admit `count` requests with random prompts and step until all of them decode."""
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    for i in range(count):
        engine.add_request(f"d{count}-{i}", random_prompt(prompt_tokens), params)
    seqs = [engine.get_sequence(f"d{count}-{i}") for i in range(count)]
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in seqs):
        engine.step()


def stop_all(engine) -> None:
    for request_id in list(engine.requests):
        engine.abort_request(request_id)


def timed_steps(clock, engine, steps: int, before=None) -> tuple[list[dict], int]:
    """Two untimed steps (compiling the shape), then `steps` timed ones; compilations among them."""
    for _ in range(2):
        before and before()
        clock.step(engine)
    compiled = engine.runner.num_compilations
    records = []
    for _ in range(steps):
        before and before()
        records.append(clock.step(engine))
    return records, engine.runner.num_compilations - compiled


def summarize(records: list[dict], rows: int, new_compilations: int) -> dict:
    phases = {name: float(np.median([r[name] for r in records])) for name in PHASES}
    return dict(phases_ms=phases, steps=len(records), sequences=rows, new_compilations=new_compilations,
                tokens_per_s=rows * 1e3 / phases["total"])


def measure_engine(llm: LLM, steps: int, decode_batches: list[int], prompt_tokens: int) -> tuple[dict, dict]:
    """Host phases and the device split per step kind."""
    engine = llm.engine
    clock = StepClock(engine)
    phases, split = {}, {}
    for count in decode_batches:
        start_decodes(engine, count, prompt_tokens)
        records, compiled = timed_steps(clock, engine, steps)
        phases[f"decode {count}"] = summarize(records, count, compiled)
        split[f"decode {count}"] = device_split(engine, clock)
        stop_all(engine)
    start_decodes(engine, 8, prompt_tokens)
    fresh = iter(range(10**6))
    one_chunk = SamplingParams(temperature=0.0, max_tokens=1)

    def add_chunk():
        engine.add_request(f"chunk-{next(fresh)}", random_prompt(CHUNK), one_chunk)

    kind = f"mixed {CHUNK}+8"
    records, compiled = timed_steps(clock, engine, steps, add_chunk)
    phases[kind], split[kind] = summarize(records, 9, compiled), device_split(engine, clock, before=add_chunk)
    stop_all(engine)
    return phases, split


@jax.jit
def _attention(q, k_cache, v_cache, md):
    def body(acc, layer):
        return acc + ragged_paged_attention(q, k_cache, v_cache, layer, md, q.shape[-1] ** -0.5), None
    return jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), jnp.arange(k_cache.shape[0]))[0]


_sampler = jax.jit(sample_with_logprobs, static_argnames=("all_greedy", "num_logprobs"))


def _section(text: str, name: str) -> dict[int, str]:
    block = text.split(f"\n{name}\n", 1)[1].split("\n\n", 1)[0]
    return {int(line.split(" ", 1)[0]): line.split(" ", 1)[1] for line in block.splitlines()}


def hlo_categories(text: str) -> dict[str, str]:
    """Each instruction of a compiled module's text -> the part of the step it belongs to, from
    its op name and the source function and file of its stack frame."""
    files = {k: v.strip('"').rsplit("/", 1)[-1] for k, v in _section(text, "FileNames").items()}
    functions = {k: v.strip('"') for k, v in _section(text, "FunctionNames").items()}
    locations = {k: (files[int(re.search(r"file_name_id=(\d+)", v)[1])],
                     functions[int(re.search(r"function_name_id=(\d+)", v)[1])])
                 for k, v in _section(text, "FileLocations").items()}
    frames = {k: locations[int(re.search(r"file_location_id=(\d+)", v)[1])]
              for k, v in _section(text, "StackFrames").items()}
    pattern = r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?(?:metadata=\{op_name="([^"]*)"(?: stack_frame_id=(\d+))?|$)'
    return {name: _category(op_name or ("dot_general" if name.startswith("dot") else ""),
                            *frames.get(int(frame or 0), ("", "")))
            for name, op_name, frame in re.findall(pattern, text, re.M)}


def _category(op_name: str, file: str, function: str) -> str:
    if function == "write_kv":
        return "KV write"
    if function == "LlamaForCausalLM.logits" or "/lm_head/" in op_name:
        return "LM head"
    if file in ("cpu_quantized_matmul.py", "cpu_float_matmul.py"):
        return "layer matmuls"
    if file in ("paged_attention.py", "cpu_paged_attention.py") or "ffi_call" in op_name:
        return "attention"
    if file == "sampler.py":
        return "sampler"
    if function in ("rms_norm", "apply_rope", "rope_angles"):
        return "norms, RoPE"
    if op_name.endswith("dot_general"):
        return "layer matmuls"
    return "other"


def device_split(engine, clock, steps: int = 3, before=None) -> dict[str, float]:
    """ms per step of each part of the jitted step: XLA's per-thunk events from a jax profiler
    trace of `steps` engine steps, summed over both CPU threads (so they can add up to more than
    the step's wall time), grouped by `hlo_categories` of the step's compiled module."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), clock.args)
    text = clock.jitted.lower(*abstract).compile().as_text()
    categories = hlo_categories(text)
    # Loops, conditionals and calls: their events span the instructions inside, counted on their own.
    wrappers = set(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? (?:while|conditional|call)\(", text, re.M))
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        for _ in range(steps):
            before and before()
            clock.step(engine)
        jax.profiler.stop_trace()
        profile = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
        split: dict[str, float] = defaultdict(float)
        for plane in profile.planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in categories and event.name not in wrappers:
                        split[categories[event.name]] += event.duration_ns / 1e6 / steps
    return dict(sorted(split.items(), key=lambda item: -item[1]))


def matmul_comparison(runner) -> list[dict]:
    """XLA against numpy on the decode shapes; per-layer shapes over all 30 layers' weights."""
    params = nnx.to_pure_dict(runner.state)
    layers, embed = params["layers"].values(), params["embed_tokens"]

    def stacked(name):
        return jnp.stack([layer[name] for layer in layers])

    cases = [("q / k / v fused 576x960, 30 layers", stacked("qkv_proj"), "layers"),
             ("o_proj 576x576, 30 layers", stacked("o_proj"), "layers"),
             ("gate / up fused 576x3072, 30 layers", stacked("gate_up_proj"), "layers"),
             ("down 1536x576, 30 layers", stacked("down_proj"), "layers"),
             ("LM head x @ E.T (E 49152x576, as the model)", embed, "transposed"),
             ("LM head x @ W (W 576x49152, pre-transposed)", jnp.asarray(np.ascontiguousarray(np.asarray(embed).T)),
              "plain"),
             ("all weights at once, 576x245760 (566 MB, over L3)",
              jnp.asarray(rng.standard_normal((576, 5 * 49152), np.float32)), "plain")]
    # Per-layer weights: one array per layer, as the model keeps them.
    xla = {"layers": jax.jit(lambda x, w: [x @ wl for wl in w]),
           "transposed": jax.jit(lambda x, w: x @ w.T), "plain": jax.jit(lambda x, w: x @ w)}
    numpy = {"layers": lambda x, w: [x @ wl for wl in w], "transposed": lambda x, w: x @ w.T,
             "plain": lambda x, w: x @ w}
    runs = [(name, weight, kind, count) for name, weight, kind in cases for count in DECODE_BATCHES]
    inputs = [rng.standard_normal((count, weight.shape[-1] if kind == "transposed" else weight.shape[-2]),
                                  np.float32) for _, weight, kind, count in runs]
    xla_weights = [list(weight) if kind == "layers" else weight for _, weight, kind, _ in runs]
    with matmul_precision(jnp.float32):  # all XLA runs first: the libraries' idle threads spin a while
        xla_ms = [median_ms(lambda: jax.block_until_ready(xla[kind](x, weight)))
                  for (_, _, kind, _), weight, x in zip(runs, xla_weights, map(jnp.asarray, inputs))]
    time.sleep(1)
    numpy_ms = [median_ms(lambda: numpy[kind](x, weight)) for (_, weight, kind, _), x in
                zip([(n, np.asarray(w), k, c) for n, w, k, c in runs], inputs)]
    results = []
    for (name, weight, _, count), xla_t, numpy_t in zip(runs, xla_ms, numpy_ms):
        gbytes = weight.nbytes / 1e9
        results.append(dict(shape=name, rows=count, xla_ms=xla_t, numpy_ms=numpy_t,
                            xla_gb_per_s=gbytes / xla_t * 1e3, numpy_gb_per_s=gbytes / numpy_t * 1e3))
    return results


def attention_padding(runner, widths=(16, 24, 32, 64, 128), context=256) -> list[dict]:
    """The reference decode attention of 30 layers over the same real context, padded wider."""
    k_cache, v_cache = runner.kv_cache
    block_size = k_cache.shape[2]
    own_blocks = context // block_size
    results = []
    for count in (8, 64):
        q = jnp.asarray(rng.standard_normal((count, runner.model_config.num_heads, runner.model_config.head_dim)),
                        jnp.float32)
        for width in widths:
            tables = np.zeros((count, width), np.int32)
            tables[:, :own_blocks] = np.arange(count * own_blocks).reshape(count, own_blocks)
            md = AttentionMetadata(
                slot_mapping=jnp.full(count, -1, jnp.int32), block_tables=jnp.asarray(tables),
                context_lens=jnp.full(count, context, jnp.int32), query_start=jnp.arange(count, dtype=jnp.int32),
                query_lens=jnp.ones(count, jnp.int32))
            ms = median_ms(lambda: jax.block_until_ready(_attention(q, k_cache, v_cache, md)))
            results.append(dict(sequences=count, context=context, block_table_width=width, ms_30_layers=ms))
    return results


def sampler_comparison(vocab: int) -> list[dict]:
    """All rows greedy (the `all_greedy` program) against one row, then every row, with temperature
    and top-p, and every row with top-k."""
    greedy, top_p = SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9)
    results = []
    for count in DECODE_BATCHES:
        logits = jnp.asarray(rng.standard_normal((count, vocab)), jnp.float32)
        for label, first, rest in (("all greedy", greedy, greedy),
                                   ("one row top_p=0.9, T=0.8", top_p, greedy),
                                   ("every row top_p=0.9, T=0.8", top_p, top_p),
                                   ("every row top_k=50, T=0.8", SamplingParams(temperature=0.8, top_k=50), None)):
            params = [first] + [rest or first] * (count - 1)
            arrays = jax.device_put(SamplingArrays.build(params, [1] * count, [0] * count, pad_to=count))
            all_greedy = all(p.is_greedy for p in params)
            ms = median_ms(lambda: jax.block_until_ready(_sampler(logits, arrays, all_greedy=all_greedy,
                                                                  num_logprobs=None)))
            results.append(dict(rows=count, case=label, ms=ms))
    return results


def machine() -> dict:
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    return dict(cpu=cpu.split(":", 1)[-1].strip(), cores=os.cpu_count(),
                python=platform.python_version(), jax=jax.__version__, numpy=np.__version__)


def print_matmul(results: list[dict]) -> None:
    print("\n| matmul | rows | XLA ms | numpy ms | XLA GB/s | numpy GB/s |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['shape']} | {r['rows']} | {r['xla_ms']:.2f} | {r['numpy_ms']:.2f} | "
              f"{r['xla_gb_per_s']:.1f} | {r['numpy_gb_per_s']:.1f} |")


def print_tables(result: dict) -> None:
    kinds = list(result["step_phases"])
    print("\n| ms per step | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    for name in PHASES:
        print(f"| {name} | " + " | ".join(f"{result['step_phases'][k]['phases_ms'][name]:.2f}" for k in kinds) + " |")
    print("| tokens/s | " + " | ".join(f"{result['step_phases'][k]['tokens_per_s']:.1f}" for k in kinds) + " |")
    print("| new compilations | " + " | ".join(str(result["step_phases"][k]["new_compilations"])
                                              for k in kinds) + " |")
    parts = sorted({p for k in kinds for p in result["device_split_ms"][k]},
                   key=lambda p: -sum(result["device_split_ms"][k].get(p, 0) for k in kinds))
    print("\n| device ms (thread-summed) | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    for name in parts:
        print(f"| {name} | " + " | ".join(f"{result['device_split_ms'][k].get(name, 0):.2f}" for k in kinds) + " |")
    if "matmul" not in result:
        return
    print_matmul(result["matmul"])
    widths = sorted({r["block_table_width"] for r in result["attention_padding"]})
    print("\n| attention, 30 layers | " + " | ".join(f"width {w}" for w in widths) + " |\n|---|" + "---|" * len(widths))
    for count in (8, 64):
        row = [r for r in result["attention_padding"] if r["sequences"] == count]
        print(f"| {count} seqs, context 256 (ms) | " + " | ".join(f"{r['ms_30_layers']:.2f}" for r in row) + " |")
    print("\n| sampler | rows | ms |\n|---|---|---|")
    for r in result["sampler"]:
        print(f"| {r['case']} | {r['rows']} | {r['ms']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/step_breakdown_cpu.json")
    parser.add_argument("--steps", type=positive_int, default=12, help="timed steps per step kind")
    parser.add_argument("--decode-batches", type=positive_int, nargs="+", default=list(DECODE_BATCHES),
                        help="rows of the decode steps")
    parser.add_argument("--steps-only", action="store_true", help="the engine's steps only, without the clues")
    parser.add_argument("--prompt-tokens", type=positive_int, default=272, help="prompt length of the decoding requests")
    parser.add_argument("--quantization", choices=("int8", "fp8", "gguf"), help="quantized weights (default: float32)")
    parser.add_argument("--matmul-only", action="store_true",
                        help="only XLA against numpy (to compare XLA_FLAGS settings)")
    args = parser.parse_args()
    started = time.time()
    llm = LLM(quantization=args.quantization)
    if args.matmul_only:
        result = dict(xla_flags=os.environ.get("XLA_FLAGS", ""), machine=machine(),
                      matmul=matmul_comparison(llm.engine.runner))
        print_matmul(result["matmul"])
        save_json(result, args.out)
        return
    phases, split = measure_engine(llm, args.steps, args.decode_batches, args.prompt_tokens)
    runner = llm.engine.runner
    result = dict(
        command="python scripts/bench_step_breakdown.py " + f"--steps {args.steps} --decode-batches "
                + " ".join(map(str, args.decode_batches)) + f" --prompt-tokens {args.prompt_tokens}",
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), machine=machine(),
        method="host phases: timers wrapped around LLMEngine.step's pieces; device split: XLA thunk events of a "
               "jax profiler trace of 3 steps, summed over threads, grouped by the HLO's op names and source frames",
        step_phases=phases, device_split_ms=split)
    if not args.steps_only:
        result.update(attention_padding=attention_padding(runner),
                      sampler=sampler_comparison(runner.model_config.vocab_size), matmul=matmul_comparison(runner))
    result["seconds"] = time.time() - started
    print_tables(result)
    save_json(result, args.out)


if __name__ == "__main__":
    main()
