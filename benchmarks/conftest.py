"""Benchmark fixtures and the closing summary; the timing helper is benchmarks/benchutil.py."""

import pytest
from benchutil import BENCH_DEVICE
from summarize import rows_from, table


@pytest.fixture
def device() -> str:
    return BENCH_DEVICE


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """After pytest-benchmark's tables: one line per case with its median time per call, its
    ratio to the "eager" variant of its group (measured in the same run), GB/s and TFLOP/s."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    try:
        rows = rows_from([b.as_dict(include_data=False) for b in session.benchmarks if b])
    except Exception as exc:  # another pytest-benchmark version: the JSON is written already
        terminalreporter.write_line(f"fastdiff summary unavailable: {type(exc).__name__}: {exc}")
        return
    if rows:
        terminalreporter.write_sep("-", f"fastdiff: each case vs eager on {BENCH_DEVICE}")
        terminalreporter.write_line(table(rows))
