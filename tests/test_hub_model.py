"""`LLM("org/name")`: a model named as on the HF hub, found in the local HF cache, offline.

The cache is laid out as `huggingface_hub` lays it out (`repo_folder_name`, a snapshot folder
named by commit, `refs/main`), and `huggingface_hub.scan_cache_dir` must see the model there
before jpaged is asked for it: no network is used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")


ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "jpaged-tests/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
RUN = """
import json, sys
from jpaged import LLM, SamplingParams
try:
    llm = LLM(sys.argv[1], num_blocks=16, max_num_seqs=2)
except FileNotFoundError as error:
    print(json.dumps({"error": str(error)}))
    raise SystemExit(0)
outs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8, 9]}], SamplingParams(temperature=0.0, max_tokens=8,
                    ignore_eos=True), use_tqdm=False)
print(json.dumps({"tokens": outs[0].outputs[0].token_ids, "name": llm.engine.model_name}))
"""


@pytest.fixture(scope="module")
def hf_home(tiny_llama_folder, tmp_path_factory):
    """An HF home whose hub cache holds the model as one snapshot of `main`."""
    from huggingface_hub.file_download import repo_folder_name

    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / repo_folder_name(repo_id=REPO_ID, repo_type="model")
    shutil.copytree(tiny_llama_folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    cached = huggingface_hub.scan_cache_dir(home / "hub")
    assert {r.repo_id for r in cached.repos} == {REPO_ID}
    assert "config.json" in {f.file_name for r in cached.repos for rev in r.revisions for f in rev.files}
    return home


def run(model: str, hf_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", RUN, model], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hub_id_loads_from_the_local_cache_offline(tiny_llama_folder, hf_home):
    from_hub = run(REPO_ID, hf_home)
    from_folder = run(str(tiny_llama_folder), hf_home)
    assert from_hub["tokens"] == from_folder["tokens"] and len(from_hub["tokens"]) == 8
    assert from_hub["name"] == REPO_ID  # the server's model id, as vLLM names a hub model


def test_missing_hub_id_is_a_clear_error(hf_home):
    error = run("jpaged-tests/no-such-model", hf_home)["error"]
    assert "'jpaged-tests/no-such-model'" in error
    assert str(hf_home / "hub") in error and "HF_HUB_OFFLINE" in error
