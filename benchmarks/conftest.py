"""Benchmark fixtures; the timing helper is benchmarks/benchutil.py."""

import pytest
from benchutil import BENCH_DEVICE


@pytest.fixture
def device() -> str:
    return BENCH_DEVICE
