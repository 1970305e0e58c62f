"""The suite's two tiers: `python -m pytest` runs a sample of each long matrix (kernel shapes,
dtypes, GPU targets), `python -m pytest --full` the whole of it (tests marked `full`)."""

import pytest

FULL = pytest.mark.full


def sampled(cases, keep, ids=None, unpack=False) -> list:
    """`cases` as `pytest.param`s for `parametrize`: those whose index is in `keep` run in the
    suite, the others with `--full` only. `ids(case)` names a case (default: pytest's own);
    `unpack` spreads each case over several argument names."""
    return [pytest.param(*(case if unpack else (case,)), id=None if ids is None else ids(case),
                         marks=() if i in keep else FULL) for i, case in enumerate(cases)]
