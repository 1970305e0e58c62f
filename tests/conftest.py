import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="also run the tests marked `full`: the rest of each kernel's shape matrix, the Triton "
                          "compiles of every engine configuration, the GPU check's CPU mode")


def pytest_collection_modifyitems(config, items):
    """Leave out the tests marked `full` unless `--full` is given (pytest reports them deselected)."""
    if config.getoption("--full"):
        return
    full = [item for item in items if item.get_closest_marker("full")]
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = Path(os.environ.get("JPAGED_STORIES260K", SHARED_MODELS / "stories260K"))


@pytest.fixture(scope="session")
def stories_path() -> str:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    return str(STORIES)


@pytest.fixture(scope="session")
def model_path():
    """The default model's GGUF (downloaded once into the cache)."""
    from jpaged.loader.default_model import DownloadError, default_model_path

    try:
        return default_model_path()
    except DownloadError as exc:
        pytest.skip(f"default model not downloadable here: {exc}")


@pytest.fixture(scope="session")
def hf_gguf_model(model_path):
    """HF transformers' own load of the default model's GGUF (float32, torch CPU): an oracle."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def run_device_check(tmp_path_factory):
    """Run a `tests/*_check.py` script in its own process (it sets up emulated devices before jax
    starts) with a fresh folder, and return the JSON report it prints last."""

    def run(script: str) -> dict:
        folder = tmp_path_factory.mktemp(Path(script).stem)
        result = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), str(folder)],
                                capture_output=True, text=True, timeout=1500)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory):
    """A one-layer random-weight Llama saved as an HF folder (vocabulary of 64 word tokens)."""
    transformers = pytest.importorskip("transformers")
    from hf_models import save_random_model

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_random_model(folder, config, seed=5)
    return folder


@pytest.fixture
def fail_step(monkeypatch):
    """`fail_step(engine, at)`: the engine's `at`-th `step()` from now raises RuntimeError("the step
    failed"); `monkeypatch.undo()` restores it."""

    def patch(engine, at: int) -> None:
        real_step, calls = engine.step, []

        def step():
            calls.append(1)
            if len(calls) == at:
                raise RuntimeError("the step failed")
            return real_step()

        monkeypatch.setattr(engine, "step", step)

    return patch


@pytest.fixture(scope="session")
def cpu_kernels_built():
    """jpaged's C++ CPU kernels, both libraries built and registered (skips where no C++ compiler is found)."""
    from jpaged.cache_dir import cache_dir
    from pallas_kernels import cpu_kernels

    if cpu_kernels.compiler() is None:
        pytest.skip("no C++ compiler")
    for library in cpu_kernels.LIBRARIES:
        cpu_kernels.start_build(cache_dir() / "kernels", library)
    for library in cpu_kernels.LIBRARIES:
        reason = cpu_kernels.wait(library)
        assert reason is None, reason


@pytest.fixture
def link_built_kernels():
    """`link_built_kernels(cache)`: a fresh jpaged cache directory shares the default one's C++ CPU
    kernels (a link to its `kernels` folder), so a process started on it loads them where it would
    otherwise spend about 20 s building them again."""
    from jpaged.cache_dir import cache_dir

    def link(cache: Path) -> None:
        built = cache_dir() / "kernels"
        built.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "kernels").symlink_to(built, target_is_directory=True)

    return link


@pytest.fixture
def exact_float32_matmuls():
    """On a GPU, float32 products at full precision inside the test (XLA's and Triton's default
    there is TF32, inputs rounded to 10-bit mantissas): the jnp references the kernels are held
    to become exact float32 oracles. Nothing changes on a CPU."""
    import jax

    if jax.default_backend() == "cpu":
        yield
        return
    with jax.default_matmul_precision("highest"):
        yield
