"""What the benchmark scripts share: saving a result as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def save_json(result: dict, path: str | Path) -> Path:
    """Write `result` to `path` (creating its folder) and say where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")
    return path
