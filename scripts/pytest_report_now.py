"""A pytest plugin for the GPU check's test part: each failing test's error, written the moment it
is known (under pytest-xdist too: the controller sees every worker's reports), so that a run
stopped by its time limit still says why its tests failed.

    pytest -p pytest_report_now ...   # with scripts/ on PYTHONPATH

Each failure is one line `FAILURE-DETAIL <node id> :: <its error>`, then the last
lines of its report, indented.
"""

from __future__ import annotations

import pytest

TAIL_LINES = 15

_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    terminal = _config and _config.pluginmanager.get_plugin("terminalreporter")
    if not report.failed or not terminal:
        return
    lines = str(report.longrepr).splitlines() or ["(no report)"]
    crash = getattr(report.longrepr, "reprcrash", None)
    message = (crash.message if crash else lines[-1]).replace("\n", " ")
    terminal.write_line(f"FAILURE-DETAIL {report.nodeid} :: {message[:300]}")
    for line in lines[-TAIL_LINES:]:
        terminal.write_line(f"    {line}")
