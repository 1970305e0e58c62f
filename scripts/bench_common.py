"""What the benchmark scripts share: saving a result as JSON, plotting where matplotlib is
installed, and argument types that refuse values a run cannot use (argparse then names the flag
and the value)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def save_json(result: dict, path: str | Path) -> Path:
    """Write `result` to `path` (creating its folder) and say where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict(result), indent=2, allow_nan=False))
    print(f"saved {path}")
    return path


def _strict(value):
    """`value` as strict JSON can hold it: an infinite float as the string "inf" / "-inf" (a
    request rate of all at once), NaN (a latency with no samples) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def pyplot():
    """matplotlib's pyplot on its file-only backend, or None (saying how to install it) where
    matplotlib is missing: a benchmark then keeps its table and JSON and skips the plot."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, title: str, path: str | Path) -> Path:
    """Title `fig`, lay it out, write it to `path`, close it, and say where it went."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")
    return Path(path)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _at_least(text, 0)


def _at_least(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"{value} is below {lowest}")
    return value


def positive_rates(text: str) -> list[float]:
    """An argparse type: comma-separated numbers > 0 (`inf` allowed), e.g. `1,2,4,inf`."""
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number (rates are comma-separated, e.g. 1,2,inf)") from None
        if not rate > 0 or math.isnan(rate):
            raise argparse.ArgumentTypeError(f"rate {part!r} must be > 0 (inf: all at once)")
        rates.append(rate)
    return rates


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value
