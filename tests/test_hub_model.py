"""`LLM("org/name")`: a model named as on the HF hub, found in the local HF cache, offline; and
`LLM(model, tokenizer=...)`, a tokenizer from another folder or hub id.

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
COMMIT_V2 = "89abcdef0123456789abcdef0123456789abcdef"  # a second version, tagged v2, other weights
RUN = """
import json, sys
from jpaged import LLM, SamplingParams
for spec in json.loads(sys.argv[1]):  # [model, revision or None] pairs, one result line each
    try:
        llm = LLM(spec[0], num_blocks=16, max_num_seqs=2, revision=spec[1])
    except FileNotFoundError as error:
        print("RESULT", json.dumps({"error": str(error)}))
        continue
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8, 9]}], SamplingParams(temperature=0.0, max_tokens=8,
                        ignore_eos=True), use_tqdm=False)
    print("RESULT", json.dumps({"tokens": outs[0].outputs[0].token_ids, "name": llm.engine.model_name}))
"""


@pytest.fixture(scope="module")
def second_version(tiny_llama_folder, tmp_path_factory) -> Path:
    """The tiny Llama's shapes with other random weights."""
    import transformers
    from hf_models import save_random_model

    folder = tmp_path_factory.mktemp("tiny_llama_v2")
    save_random_model(folder, transformers.LlamaConfig.from_pretrained(tiny_llama_folder), seed=6)
    return folder


@pytest.fixture(scope="module")
def hf_home(tiny_llama_folder, second_version, tmp_path_factory):
    """An HF home whose hub cache holds the model as a snapshot of `main` and one tagged `v2`."""
    from huggingface_hub.file_download import repo_folder_name

    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / repo_folder_name(repo_id=REPO_ID, repo_type="model")
    shutil.copytree(tiny_llama_folder, repo / "snapshots" / COMMIT)
    shutil.copytree(second_version, repo / "snapshots" / COMMIT_V2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v2").write_text(COMMIT_V2)
    cached = huggingface_hub.scan_cache_dir(home / "hub")
    assert {r.repo_id for r in cached.repos} == {REPO_ID}
    assert {ref for r in cached.repos for rev in r.revisions for ref in rev.refs} == {"main", "v2"}
    assert "config.json" in {f.file_name for r in cached.repos for rev in r.revisions for f in rev.files}
    return home


def run(hf_home: Path, *specs: tuple[str, str | None]) -> list[dict]:
    """Load each (model, revision) in turn in one fresh offline process; their tokens or errors."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", RUN, json.dumps(specs)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = [json.loads(line.removeprefix("RESULT ")) for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(specs), result.stdout[-3000:]
    return results


def test_hub_id_loads_from_the_local_cache_offline(tiny_llama_folder, hf_home):
    from_hub, from_folder = run(hf_home, (REPO_ID, None), (str(tiny_llama_folder), None))
    assert from_hub["tokens"] == from_folder["tokens"] and len(from_hub["tokens"]) == 8
    assert from_hub["name"] == REPO_ID  # the server's model id, as vLLM names a hub model


def test_revision_picks_the_hub_models_version(tiny_llama_folder, second_version, hf_home):
    """`revision` as a tag or a commit loads that snapshot (here other weights: other tokens), and
    a revision the cache lacks is a clear error."""
    main, tagged, by_commit, folder, missing = run(
        hf_home, (REPO_ID, None), (REPO_ID, "v2"), (REPO_ID, COMMIT_V2), (str(second_version), None), (REPO_ID, "v3"))
    assert tagged["tokens"] == by_commit["tokens"] == folder["tokens"] != main["tokens"]
    assert "'jpaged-tests/tiny-llama' at revision 'v3'" in missing["error"] and "HF_HUB_OFFLINE" in missing["error"]


def test_revision_of_a_local_model_is_refused(tiny_llama_folder):
    from jpaged import LLM

    with pytest.raises(ValueError, match="revision='v2' picks a version of an HF hub model; .* is not a hub id"):
        LLM(str(tiny_llama_folder), revision="v2")
    with pytest.raises(ValueError, match="is the built-in model"):
        LLM(revision="v2")


def test_missing_hub_id_is_a_clear_error(hf_home):
    (result,) = run(hf_home, ("jpaged-tests/no-such-model", None))
    error = result["error"]
    assert "'jpaged-tests/no-such-model'" in error
    assert str(hf_home / "hub") in error and "HF_HUB_OFFLINE" in error


NAME_ERRORS = """
import json
from jpaged.loader.source import open_model
for model, tokenizer in [("jpaged-tests/tiny-llama", "jpaged-tests/no-such-tokenizer"), ("", None)]:
    try:
        open_model(model, tokenizer=tokenizer)
    except FileNotFoundError as error:
        print("RESULT", json.dumps(str(error)))
"""


def test_missing_tokenizer_id_and_empty_model_name_are_named(hf_home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", NAME_ERRORS], capture_output=True, text=True, env=env, timeout=300)
    tokenizer, empty = [json.loads(line.removeprefix("RESULT ")) for line in result.stdout.splitlines()
                        if line.startswith("RESULT ")]
    assert tokenizer.startswith("tokenizer 'jpaged-tests/no-such-tokenizer' is neither a local folder nor in the HF cache")
    assert empty.startswith("model is an empty name")


TOKENIZER_RUN = """
import json, sys
from jpaged import LLM, SamplingParams
llm = LLM(sys.argv[1], tokenizer=sys.argv[2], num_blocks=16, max_num_seqs=2)
out = llm.generate(sys.argv[3], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
print(json.dumps({"prompt": out.prompt_token_ids, "tokens": out.outputs[0].token_ids, "text": out.outputs[0].text}))
"""


@pytest.fixture(scope="module")
def model_without_tokenizer(tiny_llama_folder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("no_tokenizer")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_llama_folder / name, folder / name)
    return folder


def test_tokenizer_from_another_folder(model_without_tokenizer, tmp_path):
    """The prompt is encoded and the output decoded by the tokenizer named (here one whose words
    are `w<id>`), as its own encode and decode do; the model's tokens are unchanged."""
    from hf_models import save_word_level_tokenizer
    from transformers import AutoTokenizer

    from jpaged import LLM, SamplingParams

    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        LLM(str(model_without_tokenizer))
    with pytest.raises(FileNotFoundError, match="tokenizer 'nowhere' is neither a folder nor an HF hub id"):
        LLM(str(model_without_tokenizer), tokenizer="nowhere")
    with pytest.raises(TypeError, match="tokenizer must be a path, an HF hub id, got int 7"):
        LLM(str(model_without_tokenizer), tokenizer=7)
    with pytest.raises(TypeError, match=r"model must be a path, an HF hub id or None \(the built-in model\), got list"):
        LLM([str(model_without_tokenizer)])
    save_word_level_tokenizer(tmp_path, 64)
    words = json.loads((tmp_path / "tokenizer.json").read_text())
    words["model"]["vocab"] = {(f"w{i}" if token.startswith("t") else token): i for token, i in words["model"]["vocab"].items()}
    (tmp_path / "tokenizer.json").write_text(json.dumps(words))
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    llm = LLM(str(model_without_tokenizer), tokenizer=str(tmp_path), num_blocks=16, max_num_seqs=2)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = llm.generate("w9 w17 w40 w3", params, use_tqdm=False)[0]
    assert out.prompt_token_ids == reference("w9 w17 w40 w3").input_ids == [9, 17, 40, 3]
    text = reference.decode(out.prompt_token_ids + list(out.outputs[0].token_ids))
    assert text == "w9 w17 w40 w3" + out.outputs[0].text and out.outputs[0].text.startswith(" w")
    by_ids = llm.generate({"prompt_token_ids": [9, 17, 40, 3]}, params, use_tqdm=False)[0]
    assert by_ids.outputs[0].token_ids == out.outputs[0].token_ids


def test_a_tokenizer_larger_than_the_vocabulary_is_named_at_load(model_without_tokenizer, tmp_path, caplog):
    from hf_models import save_word_level_tokenizer

    from jpaged import LLM, SamplingParams

    save_word_level_tokenizer(tmp_path, 100)
    with caplog.at_level("WARNING", logger="jpaged"):
        llm = LLM(str(model_without_tokenizer), tokenizer=str(tmp_path), num_blocks=16, max_num_seqs=2)
    assert "the tokenizer has 100 tokens, more than the model's vocabulary of 64" in caplog.text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate("t3 t80", SamplingParams(max_tokens=2), use_tqdm=False)


def test_tokenizer_from_the_hub_cache(model_without_tokenizer, hf_home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", TOKENIZER_RUN, str(model_without_tokenizer), REPO_ID, "t9 t17 t40"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["prompt"] == [9, 17, 40] and len(out["tokens"]) == 6
    assert out["text"].split() == [f"t{token}" for token in out["tokens"]]
