"""The shipped digits model, judged by a separate classifier (benchmarks/digits_classifier.py).

A reduced count for CI (about 20 s on one CPU core); the full numbers come from
``python benchmarks/report_digits.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastdiff
from fastdiff.cli import sampler_options

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import digits_classifier  # noqa: E402

HAS_WEIGHTS = (Path(fastdiff.__file__).parent / "weights" / "digits.safetensors").is_file()
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="digits weights not shipped yet")


@pytest.fixture(scope="module")
def clf():
    return digits_classifier.fit()


@pytest.fixture(scope="module")
def model():
    from fastdiff.models import load_pretrained

    return load_pretrained("digits")


def test_classifier_is_accurate():
    """The judge itself: >= 97% on held-out real digits (fitted on the other 75%)."""
    assert digits_classifier.held_out_accuracy() >= 0.97


def test_classifier_is_not_fooled_by_noise(clf):
    """Noise is not read as one fixed digit (a constant classifier would pass the quality
    checks below)."""
    g = torch.Generator().manual_seed(0)
    pred = digits_classifier.predict(clf, torch.rand(200, 1, 16, 16, generator=g) * 2 - 1)
    x, y = digits_classifier.load_digits()
    assert (digits_classifier.predict(clf, x[:200]) == y[:200]).double().mean() > 0.97
    assert pred.bincount(minlength=10).max() < 200


def _accuracy(model, clf, sampler: str, steps: int, n: int, guidance: float | None,
              **options) -> float:  # fmt: skip
    labels = torch.arange(n) % 10
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = fastdiff.sample(model, steps=steps, sampler=sampler, batch_size=n, cond=labels,
                            guidance_scale=guidance, generator=g,
                            **sampler_options(sampler, guidance), **options)  # fmt: skip
    return (digits_classifier.predict(clf, x) == labels).double().mean().item()


@needs_weights
def test_class_conditional_ddim_50(model, clf):
    assert _accuracy(model, clf, "ddim", 50, 40, 2.0) >= 0.95


@needs_weights
def test_class_conditional_dpmpp_10(model, clf):
    assert _accuracy(model, clf, "dpm++", 10, 60, 2.0) >= 0.90


@needs_weights
def test_class_conditional_dpmpp_3m_10(model, clf):
    assert _accuracy(model, clf, "dpm++", 10, 60, 2.0, solver_order=3) >= 0.90


@needs_weights
def test_class_conditional_unipc_10_is_at_least_dpmpp_10(model, clf):
    unipc = _accuracy(model, clf, "unipc", 10, 60, 2.0)
    assert unipc >= 0.90 and unipc >= _accuracy(model, clf, "dpm++", 10, 60, 2.0)


@needs_weights
def test_unconditional_covers_all_classes(model, clf):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = fastdiff.sample(model, steps=10, sampler="dpm++", batch_size=100, generator=g)
    counts = digits_classifier.predict(clf, x).bincount(minlength=10)
    assert (counts > 0).all(), counts.tolist()
