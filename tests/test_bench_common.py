"""scripts/bench_common.py: benchmark results are saved as strict JSON, which any JSON reader takes."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench_common import save_json  # noqa: E402


def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def test_non_finite_numbers_are_saved_as_strict_json(tmp_path):
    result = {"rows": [{"rate": math.inf, "ttft_p50_ms": math.nan, "wall_s": 1.5}, {"rate": 2.0}],
              "range": (-math.inf, 3), "name": "inf"}
    path = save_json(result, tmp_path / "deep" / "result.json")
    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded == {"rows": [{"rate": "inf", "ttft_p50_ms": None, "wall_s": 1.5}, {"rate": 2.0}],
                      "range": ["-inf", 3], "name": "inf"}
