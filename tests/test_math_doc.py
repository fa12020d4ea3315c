"""docs/math.md is a contract: every Python block runs as written (CPU, offline) and asserts the
equation it shows against fastdiff, and the names, paths and papers it cites exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_readme import _resolve  # README's dotted-name resolver

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "math.md"
TEXT = DOC.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
CODE_SPANS = re.findall(r"`([^`\n]+)`", TEXT)

# the papers the guide walks through, by arXiv id
PAPERS = {
    "2006.11239": "DDPM",
    "2102.09672": "improved DDPM",
    "2202.00512": "v-prediction",
    "2010.02502": "DDIM",
    "2207.12598": "classifier-free guidance",
    "2211.01095": "DPM-Solver++",
    "2206.00927": "DPM-Solver (singlestep DPM-Solver-2 / -3)",
    "2206.00364": "EDM (Karras et al.)",
    "2302.04867": "UniPC",
    "2202.09778": "PNDM",
    "2303.01469": "consistency models",
    "2310.04378": "latent consistency models",
    "2402.19159": "TCD",
    "2209.03003": "rectified flow",
    "2210.02747": "flow matching",
    "2403.03206": "SD3 (rectified flow transformers, the timestep shift)",
    "2204.13902": "DEIS",
    "2305.08891": "zero terminal SNR, rescaled guidance",
    "2407.14358": "Stable Audio Open (cosine DPM-Solver++)",
    "2309.05019": "SA-Solver",
}


def test_math_doc_covers_every_paper_and_sampler():
    for arxiv, name in PAPERS.items():
        assert f"arXiv:{arxiv}" in TEXT, f"docs/math.md does not cite {name} (arXiv:{arxiv})"
    from fastdiff import samplers

    for cls in set(samplers.SAMPLERS.values()):
        assert cls.__name__ in TEXT, f"docs/math.md never mentions {cls.__name__}"
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_math_doc_block_runs_and_asserts(index):
    code = BLOCKS[index]
    # a block that checks nothing cannot fail when the math is wrong
    assert re.search(r"^\s*(assert\b|torch\.testing\.assert_close\()", code, re.M), (
        f"docs/math.md python block {index} asserts nothing"
    )
    torch.manual_seed(index)  # reproducible failures; each block draws its own inputs
    scope: dict = {"__name__": "math_doc_example"}
    exec(compile(code, f"docs/math.md python block {index}", "exec"), scope)


def test_math_doc_names_and_paths_exist():
    names, paths = set(), set()
    for span in CODE_SPANS:
        names |= set(re.findall(r"\bfastdiff(?:\.[A-Za-z_]\w*)+", span))
        paths |= {w for w in span.split() if re.match(r"^(fastdiff|tests|docs)/\S+\.\w+$", w)}
    assert len(names) >= 8 and paths
    for name in sorted(names):
        _resolve(name)  # raises on a stale name
    for p in sorted(paths):
        assert (ROOT / p).exists(), f"docs/math.md names {p}, which does not exist"
