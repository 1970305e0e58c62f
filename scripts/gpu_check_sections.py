"""The parts of the GPU check (`scripts/gpu_check.py`), each run in a process of its own.

`python scripts/gpu_check_sections.py NAME WORK_DIR [--cpu]` runs one part and writes its result
to `WORK_DIR/NAME.json`; `gpu_check.py` runs them in order under a time limit and builds the
summary. A part measures, it never asserts: what it finds goes into the summary.

- `env`: device, driver, library versions, measured device-to-device copy bandwidth;
- `tests`: the kernel and engine-backend tests (compiled kernels on a GPU, interpreted on CPU);
- `greedy`: greedy tokens of jpaged (reference and Pallas attention) against HF transformers on
  the same device, float32 and bfloat16, for stories260K and a random Llama of realistic shape;
- `kernels`: `bench_kernels.py` at a size that fits (its interpret-mode check on CPU), then
  `quantized_matmul`;
- `quantized_matmul`: the Pallas weight-only quantized matmul against the jnp reference on random
  data, timed against XLA's matmul on the dequantized weight at decode sizes (interpret mode and
  correctness only on CPU); part of `kernels` in the check, runnable on its own;
- `throughput_model`: builds a 0.67B random Llama (a tiny one on CPU) in bfloat16;
- `throughput_jpaged`, `throughput_hf`, `throughput_hf_batch`: the same random requests on it
  through jpaged, HF `generate` and HF continuous batching.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import inspect
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

ASSETS = ROOT / ".gpu_assets"  # ignored by git; travels to the GPU machine when named in `carry`
STORIES_PLACES = (ASSETS / "stories260K", ROOT.parent / "shared" / "models" / "stories260K")
KERNEL_TESTS = ["tests/test_compile_cache.py", "tests/test_pallas_kernels.py", "tests/test_engine_pallas.py",
                "tests/test_attention_backend.py", "tests/test_mosaic_gpu.py", "tests/test_kv_quantization.py",
                "tests/test_pallas_quantized_matmul.py", "tests/test_attention_variants.py::test_kernels_with_images"]
VERSIONED = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "triton", "torch", "transformers",
             "numpy")


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the GPU sizes fit about 9 minutes on one H200; the CPU sizes keep
    the check's own test in the suite to about a minute."""

    copy_elements: int
    tests: list[str]
    test_workers: int  # pytest-xdist processes (Triton compiles on the host's cores; 0: one process)
    greedy_llama: dict  # LlamaConfig fields of the realistic-shape model (head_dim 128, GQA 4:1)
    greedy_prompt_lens: tuple[int, ...]
    greedy_tokens: int
    greedy_dtypes: tuple[str, ...]
    stories_prompts: tuple[str, ...]
    kernel_batches: list[int] = field(default_factory=list)
    kernel_contexts: list[int] = field(default_factory=list)
    throughput_llama: dict = field(default_factory=dict)
    quantized_shapes: dict = field(default_factory=dict)  # name -> (K, N) of `[M, K] @ [N, K]^T`
    quantized_rows: tuple[int, ...] = ()  # M of the int8 cases
    quantized_fp8_rows: tuple[int, ...] = ()  # M of the fp8 cases
    offload_batches: tuple[int, ...] = (1,)  # decode batch sizes of the weight-streaming part
    num_requests: int = 256
    prompt_lens: tuple[int, int] = (32, 512)
    output_lens: tuple[int, int] = (32, 256)
    hf_batch_size: int = 64
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096


GPU_SIZES = Sizes(
    copy_elements=2**30,
    tests=KERNEL_TESTS,
    test_workers=12,
    greedy_llama=dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
    greedy_prompt_lens=(5, 16, 17, 100),
    greedy_tokens=32,
    greedy_dtypes=("float32", "bfloat16"),
    stories_prompts=("", "Once upon a time, there was a dog named"),
    kernel_batches=[8, 64],  # two cases: each compiles about 15 kernels (Triton, jax's sweep, Mosaic)
    kernel_contexts=[4096],
    quantized_shapes={"Llama-3-8B o_proj": (4096, 4096), "Llama-3-8B up_proj": (4096, 14336),
                      "awkward": (1000, 1000)},
    quantized_rows=(1, 8, 16, 64),
    quantized_fp8_rows=(1, 16),
    offload_batches=(1, 16, 64, 256),
    # about 0.67B parameters: 12 layers of width 2048, 16 heads of 128 over 4 KV heads
    throughput_llama=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                          num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048),
    # lengths in a band, so that the cold pass compiles few step shapes and a warm pass fits the budget
    prompt_lens=(96, 224),
    output_lens=(96, 160),
)
CPU_SIZES = Sizes(
    copy_elements=2**25,
    tests=["tests/test_kv_cache_ops.py"],  # the part runs; the suite itself runs the kernel tests on CPU
    test_workers=0,
    greedy_llama=dict(vocab_size=256, hidden_size=512, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256),
    greedy_prompt_lens=(17,),
    greedy_tokens=6,
    greedy_dtypes=("float32",),
    stories_prompts=("Once upon a time, there was a dog named",),
    quantized_shapes={"awkward": (200, 100), "grouped scales": (96, 40)},
    quantized_rows=(1, 33),
    quantized_fp8_rows=(3,),
    throughput_llama=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256),
    num_requests=4,
    prompt_lens=(8, 12),
    output_lens=(4, 8),
    hf_batch_size=4,
    max_num_seqs=4,
    max_num_batched_tokens=64,
)


def die_with_parent() -> None:
    """In a child process before it runs: be killed when the process that started it dies
    (Linux `PR_SET_PDEATHSIG`), so a killed check leaves no part running on the device."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the check's own timeouts still apply
        pass


def sizes_for(cpu: bool) -> Sizes:
    return CPU_SIZES if cpu else GPU_SIZES


def find_stories() -> Path | None:
    """stories260K: copied into `.gpu_assets/` by `gpu_check.py --prepare`, or beside the checkout."""
    return next((p for p in STORIES_PLACES if (p / "model.safetensors").is_file()), None)


# --- env -----------------------------------------------------------------------------------------

def section_env(sizes: Sizes, work: Path) -> dict:
    import jax
    from bench_kernels import copy_bandwidth

    device = jax.devices()[0]
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "platform": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "compute_capability": getattr(device, "compute_capability", None),
        "driver": _nvidia_smi("driver_version"),
        "gpu_memory": _nvidia_smi("memory.total"),
        "python": sys.version.split()[0],
        "versions": versions,
        "copy_bytes_per_s": copy_bandwidth(reps=5, trials=3, num_elements=sizes.copy_elements),
        "copy_bytes": 2 * 2 * sizes.copy_elements,
    }


def _nvidia_smi(query: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


# --- tests ---------------------------------------------------------------------------------------

OUTCOMES = "PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS"
# `pytest -v` writes "name OUTCOME"; under xdist, "[gw0] [ 12%] OUTCOME name"
TEST_RESULT = re.compile(rf"^(?:(?P<name>\S+::\S+) (?P<outcome>{OUTCOMES})"
                         rf"|\[gw\d+\] \[\s*\d+%\] (?P<xdist_outcome>{OUTCOMES}) (?P<xdist_name>\S+::\S+))")
FAILURE_DETAIL = re.compile(r"^FAILURE-DETAIL (?P<name>\S+) :: (?P<error>.*)$")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def section_tests(sizes: Sizes, work: Path) -> dict:
    """pytest on the kernel tests, verbose, its lines tallied as they come: a part stopped by its
    time limit still reports the tests that finished (`partial`)."""
    files = [f for f in sizes.tests if (ROOT / f).is_file()]
    workers = ["-n", str(sizes.test_workers)] if sizes.test_workers and _has_module("xdist") else []
    command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-v", "-rfE", "-p", "no:cacheprovider",
               "-p", "pytest_report_now", "--full", *workers, *files]  # every kernel shape, compiled
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "scripts"),
                                                                     os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    counts: dict[str, int] = {}
    failures: list[str] = []
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=die_with_parent)
    details: dict[str, str] = {}  # node id -> its last error line (`pytest_report_now`)
    last = ""
    for line in process.stdout:
        print(line, end="", flush=True)
        last = line.strip() or last
        found, detail = TEST_RESULT.match(line), FAILURE_DETAIL.match(line)
        if found:
            name = found["name"] or found["xdist_name"]
            outcome = found["outcome"] or found["xdist_outcome"]
            counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
            if outcome in ("FAILED", "ERROR"):
                failures.append(f"{outcome} {name}")
        elif detail:
            details[detail["name"]] = detail["error"]
        if found or detail:
            write_partial(work, "tests", {"files": files, "counts": counts, "failures": failures, "details": details})
    return {"files": files, "returncode": process.wait(), "counts": counts, "failures": failures,
            "details": details, "summary_line": last.strip("= "), "seconds": time.perf_counter() - started}


def write_partial(work: Path, part: str, result: dict) -> None:
    """What a part has found so far, for the summary if the part is stopped before it ends."""
    path = work / f"{part}.partial.json"
    path.with_suffix(".tmp").write_text(json.dumps(result, default=_jsonable))
    path.with_suffix(".tmp").replace(path)


# --- greedy tokens against HF --------------------------------------------------------------------

def section_greedy(sizes: Sizes, work: Path) -> dict:
    import numpy as np
    import transformers
    from hf_models import save_random_model

    from pallas_kernels.mosaic_decode_attention import runs_here
    from pallas_kernels.ragged_paged_attention import unsupported_reason

    models = []
    stories = find_stories()
    if stories is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(stories))
        prompts = [tokenizer(text)["input_ids"] if text else [tokenizer.bos_token_id] for text in sizes.stories_prompts]
        models.append(("stories260K", stories, prompts, 24))
    llama = work / "greedy_llama"
    config = transformers.LlamaConfig(**sizes.greedy_llama, bos_token_id=1, eos_token_id=2)
    save_random_model(llama, config, seed=11, std=0.05)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in sizes.greedy_prompt_lens]
    models.append(("llama-hd128-gqa4", llama, prompts, sizes.greedy_tokens))

    rows = []
    for name, folder, prompts, max_tokens in models:
        for dtype in sizes.greedy_dtypes:
            hf_tokens = _hf_greedy(folder, prompts, max_tokens, dtype)
            row = {"model": name, "dtype": dtype, "prompts": len(prompts), "max_tokens": max_tokens,
                   "hf_tokens": hf_tokens, "backends": {}}
            run = functools.partial(_jpaged_greedy, folder, prompts, max_tokens, dtype, hf_tokens=hf_tokens)
            row["backends"]["reference"] = reference = run("reference")
            fallback = unsupported_reason(config_of(folder)["head_dim"])
            row["backends"]["pallas"] = {**reference, "fell_back_to_reference": fallback} if fallback else run("pallas")
            if not fallback and runs_here() and mosaic_supports(folder, dtype):
                row["backends"]["pallas (mosaic decode)"] = run("pallas", decode_kernel="mosaic")
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "hf_tokens"}), flush=True)
            write_partial(work, "greedy", {"rows": rows})
    return {"stories260K_found": stories is not None, "rows": rows}


def config_of(folder: Path) -> dict:
    """The fields of a model folder's config.json that the checks need."""
    config = json.loads((folder / "config.json").read_text())
    heads = config["num_attention_heads"]
    return {"heads": heads, "kv_heads": config.get("num_key_value_heads", heads),
            "head_dim": config.get("head_dim") or config["hidden_size"] // heads}


def mosaic_supports(folder: Path, dtype: str) -> bool:
    from pallas_kernels.mosaic_decode_attention import mosaic_unsupported_reason

    c = config_of(folder)
    return mosaic_unsupported_reason(c["heads"], c["kv_heads"], c["head_dim"], 16, dtype) is None


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _hf_greedy(folder, prompts, max_tokens: int, dtype: str) -> list[list[int]]:
    import torch
    from hf_models import torch_single_thread
    from transformers import AutoModelForCausalLM

    torch.set_float32_matmul_precision("highest")  # no TF32: the float32 oracle must be float32
    device = _torch_device()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype)).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    tokens = []
    with torch.no_grad(), torch_single_thread():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False)
            tokens.append(out[0, len(prompt):].tolist())
    del model
    _free_torch_memory()
    return tokens


def _free_torch_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _jpaged_greedy(folder, prompts, max_tokens: int, dtype: str, backend: str, hf_tokens,
                   decode_kernel: str | None = None) -> dict:
    """jpaged's greedy tokens on `backend` against HF's; an error is recorded, not raised, so
    that one failing backend leaves the others' results standing."""
    import jax

    from jpaged import LLM, SamplingParams
    from pallas_kernels.backend import DECODE_KERNEL_ENV

    cpu = jax.default_backend() == "cpu"
    if decode_kernel:
        os.environ[DECODE_KERNEL_ENV] = decode_kernel
    try:
        llm = LLM(str(folder), dtype=dtype, attention_backend=backend,
                  attention_interpret=cpu and backend == "pallas", num_blocks=64, block_size=16,
                  max_num_batched_tokens=128)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    except Exception as error:  # noqa: BLE001 - a kernel that fails here is a finding, not the end of the part
        return {"error": f"{type(error).__name__}: {error}"[:500]}
    finally:
        os.environ.pop(DECODE_KERNEL_ENV, None)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    gc.collect()
    return {
        "identical_sequences": sum(a == b for a, b in zip(tokens, hf_tokens)),
        "tokens_agreeing": sum(_common_prefix(a, b) for a, b in zip(tokens, hf_tokens)),
        "tokens": sum(len(b) for b in hf_tokens),
        "first_text": outs[0].outputs[0].text,
        "token_ids": tokens,
    }


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --- kernel benchmark ----------------------------------------------------------------------------

def section_kernels(sizes: Sizes, work: Path) -> dict:
    import bench_kernels
    import jax

    if jax.default_backend() == "cpu":
        report = {"cpu_check": bench_kernels.run_cpu_check()}
    else:
        args = argparse.Namespace(batches=sizes.kernel_batches, contexts=sizes.kernel_contexts, groups=[4],
                                  reps=10, trials=3, tune=False)
        report = bench_kernels.run_gpu(args, on_result=lambda report: write_partial(work, "kernels", report))
    # after the attention kernels, so that a part stopped by its time limit keeps their results
    report["quantized_matmul"] = section_quantized_matmul(
        sizes, work, on_result=lambda quantized: write_partial(work, "kernels", {**report, "quantized_matmul": quantized}))
    return report


# --- quantized matmul kernel ---------------------------------------------------------------------

# bfloat16: the reference rounds each scale and scaled weight (up to 2^-8 of each term, summing at random to
# about 2^-8 of the RMS) and its product; the kernel rounds once. rtol, atol as a share of the RMS
QUANTIZED_TOLERANCE = (2e-2, 2e-2)


def section_quantized_matmul(sizes: Sizes, work: Path, on_result=None) -> dict:
    """`pallas_quantized_matmul` (bfloat16 activations, int8 and fp8 weights) against the jnp reference
    on random data; on a GPU also timed, with its default tiling, without split-K (where the default
    splits), and against the reference jitted (XLA's matmul on the dequantized weight). Case by case,
    so that a part stopped early reports the cases that finished."""
    import jax

    from pallas_kernels.pallas_quantized_matmul import MAX_ROWS

    cpu = jax.default_backend() == "cpu"
    result = {"device": jax.devices()[0].device_kind, "interpret": cpu, "max_kernel_rows": MAX_ROWS,
              "tolerance": QUANTIZED_TOLERANCE, "reps": None if cpu else 50, "trials": None if cpu else 3, "cases": []}
    for shape, (k, n) in sizes.quantized_shapes.items():
        for weight, rows in (("int8", sizes.quantized_rows), ("fp8", sizes.quantized_fp8_rows)):
            operands = _quantized_weight(k, n, weight)
            for m in rows:
                case = {"shape": shape, "k": k, "n": n, "rows": m, "weight": weight,
                        **_quantized_case(m, *operands, interpret=cpu, reps=result["reps"], trials=result["trials"])}
                result["cases"].append(case)
                print(json.dumps(case), flush=True)
                if on_result:
                    on_result(result)
    result["ok"] = all(case["ok"] for case in result["cases"])
    return result


def _quantized_weight(k: int, n: int, weight: str):
    """Random `w [n, k]` (int8 over its range, or fp8 of a normal spread) and grouped `scale [n, G]`
    (`num_groups(k)`), |w * scale| ~ 1."""
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.quantized_matmul import num_groups

    rng = np.random.default_rng(k + n)
    if weight == "int8":
        w, largest = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8)), 127.0
    else:
        w = jnp.asarray(np.clip(rng.standard_normal((n, k), np.float32) * 64, -448, 448)).astype(jnp.float8_e4m3fn)
        largest = 448.0
    return w, jnp.asarray(rng.uniform(0.5, 1.5, (n, num_groups(k))) / largest, jnp.float32)


def _quantized_case(m: int, w, scale, *, interpret: bool, reps: int | None, trials: int | None) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.pallas_quantized_matmul import choose_tiling, pallas_quantized_matmul
    from pallas_kernels.quantized_matmul import quantized_matmul

    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, w.shape[1])), jnp.bfloat16)
    tiling = choose_tiling(x.shape, w.shape, x.dtype, w.dtype)
    variants = {"kernel": functools.partial(pallas_quantized_matmul, interpret=interpret),
                "xla_dequantized": quantized_matmul}
    if tiling.splits > 1 and reps:
        variants["kernel_no_split"] = functools.partial(pallas_quantized_matmul, split_k=1)
    seconds, outputs = {}, {}
    for name, fn in variants.items():
        seconds[name], outputs[name] = _timed_output(fn, x, w, scale, reps, trials)
    want = np.asarray(outputs["xla_dequantized"], np.float32)
    rms = float(np.sqrt(np.mean(want**2)))
    rtol, atol = QUANTIZED_TOLERANCE
    case = {"tiling": asdict(tiling), "reference_rms": rms, "ok": True, "max_abs_error": {}}
    for name in ("kernel", "kernel_no_split"):
        if name in outputs:
            error = np.abs(np.asarray(outputs[name], np.float32) - want)
            case["max_abs_error"][name] = float(error.max())
            case["ok"] &= bool(np.all(error <= rtol * np.abs(want) + atol * rms))
    if reps:
        weight_bytes = w.size * w.dtype.itemsize
        case["seconds"] = seconds
        case["weight_gb_per_s"] = {name: weight_bytes / s / 1e9 for name, s in seconds.items()}
        case["xla_over_kernel"] = seconds["xla_dequantized"] / seconds["kernel"]
    return case


def _timed_output(fn, x, w, scale, reps: int | None, trials: int | None):
    """`fn(x, w, scale)` and, where `reps` is given, its median seconds a call: `reps` chained calls
    in one jitted loop per trial (each call's input depends on the previous output)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    @jax.jit
    def repeated(x, w, scale):
        def body(_, carry):
            out = fn(x + carry[0], w, scale)
            return (out.reshape(-1)[0] * 0).astype(x.dtype), out
        first = fn(x, w, scale)
        return lax.fori_loop(0, reps or 0, body, (jnp.zeros((), x.dtype), first))[1]

    out = repeated(x, w, scale).block_until_ready()
    if not reps:
        return None, out
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        repeated(x, w, scale).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / (reps + 1), out


# --- end-to-end throughput -----------------------------------------------------------------------

@dataclass(frozen=True)
class Requests:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def throughput_requests(sizes: Sizes, vocab_size: int) -> Requests:
    """The same random requests in every throughput part (fixed seed)."""
    import numpy as np

    rng = np.random.default_rng(3)
    prompt_lens = rng.integers(sizes.prompt_lens[0], sizes.prompt_lens[1] + 1, sizes.num_requests)
    max_tokens = rng.integers(sizes.output_lens[0], sizes.output_lens[1] + 1, sizes.num_requests)
    prompts = [rng.integers(3, vocab_size, n).tolist() for n in prompt_lens]
    return Requests(prompts, [int(n) for n in max_tokens])


def section_throughput_model(sizes: Sizes, work: Path) -> dict:
    """The random Llama the throughput parts share, saved in bfloat16 (built in a staging folder
    and renamed, so a part stopped while saving leaves no half-written model)."""
    import torch
    import transformers
    from hf_models import randomize_weights, save_word_level_tokenizer

    started = time.perf_counter()
    config = transformers.LlamaConfig(**sizes.throughput_llama, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_weights(model, seed=3, std=0.02)
    staging = work / "throughput_llama.staging"
    model.to(torch.bfloat16).save_pretrained(str(staging), safe_serialization=True)
    save_word_level_tokenizer(staging, config.vocab_size)
    staging.rename(work / "throughput_llama")
    requests = throughput_requests(sizes, config.vocab_size)
    return {"parameters": sum(p.numel() for p in model.parameters()), "config": sizes.throughput_llama,
            "seconds": time.perf_counter() - started, "requests": len(requests.prompts),
            "prompt_lens": list(sizes.prompt_lens), "output_lens": list(sizes.output_lens),
            "output_tokens": requests.output_tokens}


def throughput_model(sizes: Sizes, work: Path) -> tuple[Path, Requests]:
    """The folder `throughput_model` built, and the requests."""
    folder = work / "throughput_llama"
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    return folder, throughput_requests(sizes, vocab_size)


def section_throughput_jpaged(sizes: Sizes, work: Path) -> dict:
    from jpaged import LLM, SamplingParams

    folder, requests = throughput_model(sizes, work)
    started = time.perf_counter()
    llm = LLM(str(folder), dtype="bfloat16", num_blocks=_num_blocks(requests), block_size=16, max_num_seqs=sizes.max_num_seqs,
              max_num_batched_tokens=sizes.max_num_batched_tokens, enable_prefix_caching=False)
    stats = llm.engine.stats()
    result = {"requests": len(requests.prompts), "load_seconds": time.perf_counter() - started,
              "max_num_seqs": sizes.max_num_seqs, "max_num_batched_tokens": sizes.max_num_batched_tokens,
              "weight_bytes": stats.weight_bytes, "kv_cache_bytes": stats.kv_cache_bytes, "passes": []}
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in requests.max_tokens]
    for label in ("cold", "warm"):  # cold compiles each new shape
        tokens = _stream_pass(llm.engine, requests, params, label, result, work)
        result["peak_bytes_in_use"] = _peak_device_bytes()
        write_partial(work, "throughput_jpaged", result)
    (work / "jpaged_tokens.json").write_text(json.dumps(tokens))
    return result


def section_default_memory(sizes: Sizes, work: Path) -> dict:
    """The throughput model with its KV cache sized as a user gets it by default (most of the
    device's memory, `gpu_memory_utilization`), eight short requests: whether the steps fit beside
    such a cache, and the peak bytes they needed beyond the weights and the cache. (On a CPU the
    cache is `cpu_kv_cache_gib`, here a quarter GiB.) XLA dumps the step and sampler programs'
    buffer assignments; their large allocations other than parameters go into the result, also
    when a step fails, so an allocation the size of the cache names the program and values
    holding it."""
    dump = work / "xla_dump"
    shutil.rmtree(dump, ignore_errors=True)
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), f"--xla_dump_to={dump}",
                                                     "--xla_dump_hlo_module_re=.*(_sample|_step_fn).*"]))
    import jax

    from jpaged import LLM, SamplingParams

    folder, requests = throughput_model(sizes, work)
    on_cpu = jax.default_backend() == "cpu"
    llm = LLM(str(folder), dtype="bfloat16", **({"cpu_kv_cache_gib": 0.25} if on_cpu else {}))
    stats = llm.engine.stats()
    result = {"num_blocks": stats.num_blocks, "weight_bytes": stats.weight_bytes,
              "kv_cache_bytes": stats.kv_cache_bytes, "peak_bytes_in_use": _peak_device_bytes()}
    write_partial(work, "default_memory", result)
    prompts = requests.prompts[:8]
    try:
        outs = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts],
                            SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    finally:
        result.update(step_temp_bytes=llm.engine.stats().step_temp_bytes,
                      large_allocations=large_allocations(dump, min_bytes=2**16 if on_cpu else 2**28))
        write_partial(work, "default_memory", result)
    result.update(requests=len(prompts), output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
                  peak_bytes_in_use=_peak_device_bytes())
    return result


def large_allocations(dump: Path, min_bytes: int) -> list[str]:
    """From XLA's buffer-assignment dumps in `dump`: each allocation of at least `min_bytes` that
    is not a parameter, as "<program>: <allocation line> | <first value it holds>"."""
    found = []
    for path in sorted(dump.glob("*after_optimizations-buffer-assignment.txt")):
        program = path.name.split(".")[1]
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            size = re.match(r"allocation \d+: size (\d+)", line)
            if size and int(size.group(1)) >= min_bytes and "parameter" not in line:
                first = lines[i + 1].strip() if i + 1 < len(lines) else ""
                found.append(f"{program}: {line.strip()} | {first[:300]}")
    return found


def _peak_device_bytes() -> int | None:
    """The first device's peak allocated bytes so far (None where jax does not say): beyond the
    weights and the KV cache, what the steps needed at most (a step that copied its KV cache
    would need one more K or V array)."""
    import jax

    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def section_throughput_offload(sizes: Sizes, work: Path) -> dict:
    """Weight streaming on the throughput model: decode step time with every layer resident (one
    program) and with every decoder layer streamed from pinned host memory, per batch size, and
    the platform's own copy bandwidth from pinned host memory (`scripts/bench_offload.py` on CPU)."""
    import jax
    import numpy as np

    from jpaged import LLM, SamplingParams

    folder, _ = throughput_model(sizes, work)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(5)
    result = {"batches": list(sizes.offload_batches), "runs": {}}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for label, offload in (("resident", {}), ("host, every layer", dict(offload_weights="host"))):
        # A cache for the batches' 64 tokens each: one sized by gpu_memory_utilization (about 100 GB
        # here) ran out of memory in its first step on an H200 (an allocation the size of one of its
        # K / V arrays), which the throughput part, with its cache sized likewise, does not meet.
        llm = LLM(str(folder), dtype="bfloat16", max_num_seqs=max(sizes.offload_batches), max_model_len=64,
                  num_blocks=max(sizes.offload_batches) * 64 // 16 + 16,
                  max_num_batched_tokens=max(sizes.offload_batches) * 16, **offload)
        stats = llm.engine.stats()
        run = result["runs"][label] = {"streamed_bytes_per_step": stats.streamed_bytes_per_step, "step_ms": {}}
        for batch in sizes.offload_batches:
            prompts = [{"prompt_token_ids": rng.integers(3, vocab_size, 16).tolist()} for _ in range(batch)]
            times = {}
            for n in (1, 9):
                params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                llm.generate(prompts, params, use_tqdm=False)
                started = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                times[n] = time.perf_counter() - started
            run["step_ms"][batch] = 1e3 * (times[9] - times[1]) / 8
            write_partial(work, "throughput_offload", result)
        if offload:
            layer_bytes = stats.streamed_bytes_per_step // max(stats.num_streamed_layers, 1)
            host = jax.device_put(np.ones(layer_bytes // 2, np.float16), device.with_memory_kind("pinned_host"))
            jax.block_until_ready(jax.device_put(host, device))
            started = time.perf_counter()
            for _ in range(10):
                jax.block_until_ready(jax.device_put(host, device))
            result["copy_gb_s"] = 10 * layer_bytes / (time.perf_counter() - started) / 1e9
        del llm
    return result


def _stream_pass(engine, requests: Requests, params, label: str, result: dict, work: Path,
                 report_every_s: float = 2.0) -> list[list[int]]:
    """All requests through the engine's step loop; progress (tokens, seconds, compilations) is
    written as a partial result every few seconds, so a pass stopped by the time limit still says
    how far it got."""
    for i, (prompt, sampling) in enumerate(zip(requests.prompts, params)):
        engine.add_request(f"{label}-{i}", {"prompt_token_ids": prompt}, sampling)
    progress = {"pass": label, "seconds": 0.0, "output_tokens": 0, "tokens_per_s": 0.0, "finished": False}
    result["passes"].append(progress)
    tokens: dict[str, list[int]] = {}
    started = last_report = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        now = time.perf_counter()
        if now - last_report > report_every_s or not engine.has_unfinished_requests():
            produced = engine.stats().num_generated_tokens - sum(p["output_tokens"] for p in result["passes"][:-1])
            progress.update(seconds=now - started, output_tokens=produced, tokens_per_s=produced / (now - started),
                            compilations_so_far=engine.stats().num_compilations)
            write_partial(work, "throughput_jpaged", result)
            last_report = now
    progress["finished"] = True
    print(json.dumps(progress), flush=True)
    return [tokens[f"{label}-{i}"] for i in range(len(requests.prompts))]


def _hf_model(folder):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # bfloat16 matmuls crawl on CPU
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
    model = model.to(_torch_device()).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _hf_result(requests: Requests, tokens: list[list[int]], seconds: float, model, work: Path, **extra) -> dict:
    produced = sum(min(len(t), n) for t, n in zip(tokens, requests.max_tokens))
    return {"requests": len(requests.prompts), **extra, "seconds": seconds, "output_tokens": produced,
            "tokens_per_s": produced / seconds, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "incomplete": sum(len(t) < n for t, n in zip(tokens, requests.max_tokens)),
            "identical_to_jpaged": _identical_to_jpaged(work, tokens)}


def section_throughput_hf(sizes: Sizes, work: Path) -> dict:
    """HF `generate` in static batches of `hf_batch_size`, left-padded, each batch run to its longest
    request; only each request's own `max_tokens` count as output."""
    folder, requests = throughput_model(sizes, work)
    model = _hf_model(folder)
    device = _torch_device()
    if device == "cuda":
        _hf_generate(model, requests.prompts[:2], 4, device)  # warm-up
    started = time.perf_counter()
    tokens = []
    for first in range(0, len(requests.prompts), sizes.hf_batch_size):
        batch = slice(first, first + sizes.hf_batch_size)
        rows = _hf_generate(model, requests.prompts[batch], max(requests.max_tokens[batch]), device)
        tokens += [row[:n] for row, n in zip(rows, requests.max_tokens[batch])]
    return _hf_result(requests, tokens, time.perf_counter() - started, model, work, batch_size=sizes.hf_batch_size)


def _hf_generate(model, prompts, max_new_tokens: int, device) -> list[list[int]]:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens)
    return out[:, width:].tolist()


def section_throughput_hf_batch(sizes: Sizes, work: Path) -> dict:
    """HF continuous batching: every request added to one manager (which warms itself up first)
    with its own `max_new_tokens`, timed from the first request added to the last one finished."""
    from transformers import GenerationConfig

    folder, requests = throughput_model(sizes, work)
    model = _hf_model(folder)
    config = GenerationConfig(do_sample=False, max_new_tokens=max(requests.max_tokens), eos_token_id=None,
                              pad_token_id=0)
    tokens, seconds = _hf_continuous(model, requests.prompts, requests.max_tokens, config,
                                     _cb_settings(model, _num_blocks(requests), sizes))
    return _hf_result(requests, tokens, seconds, model, work)


def _num_blocks(requests) -> int:
    """KV blocks of 16 tokens for every request at once, and 64 to spare (jpaged's and HF's caches)."""
    return sum(-(-(len(p) + n) // 16) for p, n in zip(requests.prompts, requests.max_tokens)) + 64


def _cb_settings(model, num_blocks: int, sizes: Sizes) -> dict:
    """HF's continuous-batching cache sized as jpaged's (its default takes most free memory, whose
    pages the CPU then spends seconds zeroing), where this transformers takes such settings."""
    try:
        from transformers.generation import ContinuousBatchingConfig
    except ImportError:
        return {}
    if "continuous_batching_config" not in inspect.signature(model.continuous_batching_context_manager).parameters:
        return {}
    accepted = inspect.signature(ContinuousBatchingConfig).parameters
    block_key = "page_size" if "page_size" in accepted else "block_size"  # the name changed in transformers 5.2x
    wanted = {block_key: 16, "num_blocks": num_blocks, "max_batch_tokens": sizes.max_num_batched_tokens,
              "max_requests_per_batch": sizes.max_num_seqs}
    return {"continuous_batching_config": ContinuousBatchingConfig(
        **{key: value for key, value in wanted.items() if key in accepted})}


def _hf_continuous(model, prompts, max_tokens, config, settings: dict | None = None,
                   timeout_s: float = 600) -> tuple[list[list[int]], float]:
    results = {}
    with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=5,
                                                   **(settings or {})) as manager:
        started = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
        deadline = time.monotonic() + timeout_s
        while len(results) < len(prompts) and time.monotonic() < deadline:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = list(result.generated_tokens)
        seconds = time.perf_counter() - started
    return [results.get(f"r{i}", []) for i in range(len(prompts))], seconds


def _identical_to_jpaged(work: Path, tokens: list[list[int]]) -> int | None:
    path = work / "jpaged_tokens.json"
    if not path.is_file():
        return None
    return sum(a == b for a, b in zip(json.loads(path.read_text()), tokens))


SECTIONS = {
    "env": section_env,
    "tests": section_tests,
    "greedy": section_greedy,
    "kernels": section_kernels,
    "quantized_matmul": section_quantized_matmul,
    "throughput_model": section_throughput_model,
    "throughput_jpaged": section_throughput_jpaged,
    "throughput_hf": section_throughput_hf,
    "throughput_hf_batch": section_throughput_hf_batch,
    "throughput_offload": section_throughput_offload,
    "default_memory": section_default_memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=list(SECTIONS))
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--cpu", action="store_true", help="the small CPU sizes")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    result = SECTIONS[args.section](sizes_for(args.cpu), args.work_dir)
    (args.work_dir / f"{args.section}.json").write_text(json.dumps(result, indent=2, default=_jsonable))


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


if __name__ == "__main__":
    main()
