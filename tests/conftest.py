import os
from pathlib import Path

import pytest

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = Path(os.environ.get("JPAGED_STORIES260K", SHARED_MODELS / "stories260K"))


@pytest.fixture(scope="session")
def stories_path() -> str:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    return str(STORIES)
