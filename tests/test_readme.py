"""The README's Python examples run as written (CPU, offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if "diffusers" in code:
        pytest.importorskip("diffusers")
    scope: dict = {"__name__": "readme_example"}
    exec(compile(code, f"README.md python block {index}", "exec"), scope)
    if "images" in scope:  # the sampling examples end in uint8 images
        assert scope["images"].dtype == torch.uint8 and scope["images"].ndim == 4
