"""tests/conftest.py: a test that hits a sticky CUDA error (the context is lost) ends its
pytest-xdist worker, so the tests after it run in a fresh process instead of all erroring (the
H100 run of 2026-11-24 lost 763 tests to one illegal memory access). Checked on CPU with a fake
error message in a child pytest run that uses this conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _sticky_cuda_error

pytest.importorskip("xdist")

_TESTS = """
import os


def _log(name):
    with open(os.environ["STICKY_LOG"], "a") as f:
        f.write(f"{name} {os.getpid()}\\n")


def test_a_loses_the_context():
    _log("a")
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_b():
    _log("b")


def test_c():
    _log("c")
"""


def test_classifier():
    assert _sticky_cuda_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert _sticky_cuda_error(RuntimeError("CUDA error: unspecified launch failure"))
    assert not _sticky_cuda_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not _sticky_cuda_error(ValueError("x: expected a CUDA tensor, got cpu"))


def test_worker_with_a_lost_context_is_replaced(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_lost.py").write_text(_TESTS)
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "1", "test_lost.py"],
        cwd=tmp_path,
        env={**env, "STICKY_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = r.stdout + r.stderr
    assert "crashed while running 'test_lost.py::test_a_loses_the_context'" in out, out[-3000:]
    assert "2 passed" in out, out[-3000:]
    pids = dict(line.split() for line in log.read_text().splitlines())
    assert set(pids) == {"a", "b", "c"}
    assert pids["b"] == pids["c"] != pids["a"]  # b and c ran in the replacement worker
