"""llama.cpp's side of scripts/bench_throughput.py: runs where llama-cpp-python is installed.

It imports only llama-cpp-python, numpy and the standard library, so it needs neither jax nor
jpaged. Set up once (a build from source of about 20 minutes on 2 cores):

    python3 -m venv /work/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /work/llama-venv/bin/pip install llama-cpp-python==0.3.36

bench_throughput.py starts it as `<venv python> bench_llama_cpp_worker.py JOB.json RESULT.json`.
JOB.json holds the default model's GGUF file, where to keep an all-float32 copy of it, the
requests as token ids with their `max_tokens`, and the single-request prompt. The worker writes
the float32 copy once with llama.cpp's own quantizer (`LLAMA_FTYPE_ALL_F32`, requantizing
allowed), so that llama.cpp computes with the float32 weights jpaged dequantizes the file to;
its KV cache is float32 too.

Requests are decoded together in one context whose KV cache the sequences share: every prompt is
prefilled into a sequence of its own, `n_batch` tokens at a time, then each `llama_decode` takes
one token of every unfinished sequence; greedy (the argmax of each row of logits), EOS ignored,
each request exactly its `max_tokens`. A small pass first warms up (excluded); the cache is
cleared before each timed pass. The single request is timed after a warm-up run of itself, its
seconds the median of the job's `rounds` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import llama_cpp as llama
except ModuleNotFoundError:  # --help still answers; main() says what is missing
    llama = None

GGML_TYPE_F32 = 0


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp's C-level log (a line per tensor and per setting, and its progress dots) goes to
    /dev/null meanwhile; Python's own errors are raised after it is restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def float32_copy(source: str, target: str) -> str:
    """`target`, written from the GGUF `source` with every tensor in float32 unless it exists."""
    if not Path(target).exists():
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        params = llama.llama_model_quantize_default_params()
        params.ftype = llama.LLAMA_FTYPE_ALL_F32
        params.allow_requantize = True
        params.nthread = os.cpu_count() or 1
        partial = target + ".partial"
        if llama.llama_model_quantize(source.encode(), partial.encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize could not write {partial} from {source}")
        os.replace(partial, target)
    return target


class Engine:
    """One llama.cpp model and context with room for `num_seqs` sequences of `n_ctx` tokens in all."""

    def __init__(self, path: str, n_ctx: int, num_seqs: int, n_batch: int):
        llama.llama_backend_init()
        self.model = llama.llama_model_load_from_file(path.encode(), llama.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, n_batch, n_batch, num_seqs
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        params.type_k = params.type_v = GGML_TYPE_F32
        params.kv_unified = True
        self.ctx = llama.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create its context")
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = llama.llama_batch_init(n_batch, 0, 1)
        self.settings = {"n_ctx": n_ctx, "n_seq_max": num_seqs, "n_batch": n_batch, "n_threads": params.n_threads,
                         "kv_cache": "float32", "kv_unified": True}

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode of (token, position, sequence, wants logits) entries; the greedy next
        token of each entry that wants logits, in order."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for i, (token, position, seq, wants) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, wants
            batch.seq_id[i][0] = seq
        if llama.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())
                for i, entry in enumerate(entries) if entry[3]]

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> tuple[float, list[list[int]]]:
        """Seconds and each request's output token ids, all requests decoded together."""
        llama.llama_memory_clear(llama.llama_get_memory(self.ctx), True)
        started = time.perf_counter()
        outputs: list[list[int]] = [[] for _ in prompts]
        pending = [(token, position, seq, position == len(prompt) - 1)
                   for seq, prompt in enumerate(prompts) for position, token in enumerate(prompt)]
        wanting = [entry[2] for entry in pending if entry[3]]
        for start in range(0, len(pending), self.n_batch):
            chunk = pending[start : start + self.n_batch]
            for token in self._decode(chunk):
                outputs[wanting.pop(0)].append(token)
        while True:
            live = [seq for seq, out in enumerate(outputs) if len(out) < max_tokens[seq]]
            if not live:
                break
            entries = [(outputs[seq][-1], len(prompts[seq]) + len(outputs[seq]) - 1, seq, True) for seq in live]
            for seq, token in zip(live, self._decode(entries)):
                outputs[seq].append(token)
        return time.perf_counter() - started, outputs


def run(job: dict) -> dict:
    """Start, warm up, time the workload and the single request; the result as a dict."""
    prompts = [r["prompt_token_ids"] for r in job["requests"]]
    max_tokens = [r["max_tokens"] for r in job["requests"]]
    single = job["single"]
    n_ctx = sum(len(p) + n for p, n in zip(prompts, max_tokens)) + 256
    started = time.perf_counter()
    with quiet_stderr():
        path = float32_copy(job["gguf"], job["float32_gguf"])
        engine = Engine(path, n_ctx, max(len(prompts), 1), job["n_batch"])
    startup = time.perf_counter() - started
    warmup, _ = engine.generate(prompts[:2], [8] * len(prompts[:2]))
    seconds, token_ids = engine.generate(prompts, max_tokens)
    engine.generate([single["prompt_token_ids"]], [single["max_tokens"]])
    rounds = [engine.generate([single["prompt_token_ids"]], [single["max_tokens"]])
              for _ in range(single.get("rounds", 1))]
    single_seconds, single_ids = statistics.median(r[0] for r in rounds), rounds[-1][1]
    return {"seconds": seconds, "token_ids": token_ids, "startup_seconds": startup, "warmup_seconds": warmup,
            "single_seconds": single_seconds, "single_tokens": len(single_ids[0]), "settings": engine.settings,
            "versions": {"llama_cpp_python": llama.__version__, "python": platform.python_version()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="JOB.json written by bench_throughput.py")
    parser.add_argument("result", help="where RESULT.json goes")
    args = parser.parse_args()
    job_path, result_path = args.job, args.result
    if llama is None:
        sys.exit(f"llama-cpp-python is not installed for {sys.executable}; see this script's --help")
    with open(job_path) as f:
        job = json.load(f)
    with open(result_path, "w") as f:
        json.dump(run(job), f)


if __name__ == "__main__":
    main()
