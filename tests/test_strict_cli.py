"""Strict checks of the ``fastdiff`` command from mutation testing round 3 (session 9): option
boundaries and what each option hands to ``fastdiff.sample`` / ``fastdiff.train``.

``fastdiff.sample`` / ``fastdiff.train`` are replaced by recorders (the command's plumbing is
under test here, not the sampling; tests/test_cli.py runs it end to end)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fastdiff
from fastdiff.cli import main

HAS_WEIGHTS = (Path(fastdiff.__file__).parent / "weights" / "digits.safetensors").is_file()
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="digits weights not shipped yet")


@pytest.fixture
def sample_calls(monkeypatch):
    """Replaces fastdiff.sample by a recorder returning images in [-1, 1]."""
    calls: list[dict] = []

    def fake_sample(model, **kw):
        calls.append(kw)
        g = torch.Generator().manual_seed(0)
        return torch.rand((kw["batch_size"], 1, 16, 16), generator=g) * 2 - 1

    monkeypatch.setattr(fastdiff, "sample", fake_sample)
    return calls


@needs_weights
def test_sample_steps_may_equal_the_training_timesteps(tmp_path, capsys, sample_calls):
    from fastdiff.models.pretrained import load_pretrained

    T = load_pretrained("digits").schedule.num_train_timesteps
    out = tmp_path / "s.png"
    assert main(["sample", "--steps", str(T), "--n", "2", "--out", str(out), "--quiet"]) == 0
    assert [c["steps"] for c in sample_calls] == [T] and out.is_file()
    rc = main(["sample", "--steps", str(T + 1), "--n", "2", "--out", str(out), "--quiet"])
    assert rc == 1 and f"--steps must be <= {T}" in capsys.readouterr().err


@needs_weights
def test_sample_passes_eta_to_the_sampler(tmp_path, sample_calls):
    out = tmp_path / "s.png"
    args = ["sample", "--steps", "3", "--n", "2", "--out", str(out), "--quiet"]
    assert main([*args, "--eta", "0.7"]) == 0
    assert main(args) == 0
    assert sample_calls[0]["eta"] == 0.7 and "eta" not in sample_calls[1]
