"""Tensor parallelism across two processes on localhost (jax.distributed, 2 CPU devices each)
produces the tokens of a single process on one device."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jpaged import LLM, SamplingParams

transformers = pytest.importorskip("transformers")
WORKER = Path(__file__).with_name("multiprocess_check.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(tmp_path, link_built_kernels):
    from hf_models import save_random_model

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    save_random_model(tmp_path, config, seed=4)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 96, n).tolist() for n in (21, 16, 5)]
    single = LLM(str(tmp_path), dtype="float32", num_blocks=32).generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        use_tqdm=False)

    # Twice over one cache folder: the second run finds whatever the first one kept.
    cache = tmp_path / "cache"
    link_built_kernels(cache)
    for _ in range(2):
        port = str(free_port())
        env = {**os.environ, "JPAGED_TEST_PROMPTS": json.dumps(prompts), "JPAGED_CACHE_DIR": str(cache)}
        workers = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", port, str(tmp_path)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        results = []
        for worker in workers:
            out, err = worker.communicate(timeout=600)
            assert worker.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        for result in results:
            assert (result["devices"], result["local_devices"]) == (4, 2)
            assert result["tokens"] == [o.outputs[0].token_ids for o in single]
    # each process's executable holds only its own devices: no step program is kept for another
    assert not (cache / "programs").exists()
