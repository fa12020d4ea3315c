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
    assert rc == 2 and f"--steps must be <= {T}" in capsys.readouterr().err


@needs_weights
def test_sample_passes_eta_to_the_sampler(tmp_path, sample_calls):
    out = tmp_path / "s.png"
    args = ["sample", "--steps", "3", "--n", "2", "--out", str(out), "--quiet"]
    assert main([*args, "--eta", "0.7"]) == 0
    assert main(args) == 0
    assert sample_calls[0]["eta"] == 0.7 and "eta" not in sample_calls[1]


@needs_weights
def test_sample_out_suffix_is_case_insensitive(tmp_path, sample_calls):
    out = tmp_path / "GRID.PNG"
    assert main(["sample", "--steps", "2", "--n", "2", "--out", str(out), "--quiet"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("device", ["meta", "cpu:0:1", "xpu"])
def test_sample_rejects_devices_other_than_cpu_and_cuda(device, tmp_path, capsys, sample_calls):
    out = tmp_path / "s.png"
    rc = main(["sample", "--steps", "2", "--n", "2", "--out", str(out), "--device", device])
    err = capsys.readouterr().err
    assert rc == 2 and "device" in err and "use cpu or cuda" in err, err
    assert sample_calls == [] and not out.exists()


@pytest.fixture
def train_calls(monkeypatch):
    """Replaces fastdiff.train (and torch.set_num_threads) by recorders."""
    calls: dict[str, list] = {"train": [], "threads": []}
    monkeypatch.setattr(fastdiff, "train", lambda **kw: calls["train"].append(kw))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls["threads"].append(n))
    return calls


def test_train_options_reach_fastdiff_train(tmp_path, train_calls):
    out = tmp_path / "m.safetensors"
    assert main(["train", "--out", str(out), "--steps", "7", "--quiet"]) == 0
    args = ["train", "--out", str(out), "--steps", "7", "--quiet", "--fp16", "--no-resume",
            "--threads", "3", "--checkpoint", str(tmp_path / "run" / "c")]  # fmt: skip
    assert main(args) == 0
    plain, opts = train_calls["train"]
    assert plain["steps"] == opts["steps"] == 7
    assert plain["out_dtype"] is None and opts["out_dtype"] is torch.float16
    assert plain["resume"] is True and opts["resume"] is False
    assert plain["checkpoint"] == str(tmp_path / "m-ckpt")
    assert opts["checkpoint"] == str(tmp_path / "run" / "c")
    assert train_calls["threads"] == [3]


@needs_weights
def test_smallest_accepted_option_values(tmp_path, sample_calls, train_calls):
    out = tmp_path / "s.png"
    args = ["sample", "--steps", "1", "--n", "1", "--nrow", "1", "--scale", "1", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    assert sample_calls[0]["steps"] == 1 and sample_calls[0]["batch_size"] == 1
    m = tmp_path / "m.safetensors"
    assert main(["train", "--out", str(m), "--steps", "1", "--log-every", "0", "--quiet"]) == 0
    assert train_calls["train"][0]["log_every"] == 0


def test_show_forward_needs_two_frames(tmp_path, capsys):
    out = tmp_path / "f.png"
    assert main(["show", "forward", "--out", str(out), "--frames", "1"]) == 2
    assert "--frames must be >= 2" in capsys.readouterr().err and not out.exists()


def test_bench_speedup_is_eager_over_fused(monkeypatch, capsys):
    """Timings replaced (eager 4 ms, fused 1 ms): the table's speedup is eager / fused."""
    import json

    import fastdiff._cli_bench as bench

    times = iter([4.0, 1.0] * 16)
    monkeypatch.setattr(bench, "_median_ms", lambda fn, dev, reps, warmup=2: next(times))
    assert main(["bench", "--json", "--ops-only", "--device", "cpu", "--repeat", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows and all(r["speedup"] == 4.0 for r in rows), rows
    assert all(r["eager_ms"] == 4.0 and r["fused_ms"] == 1.0 for r in rows)


@needs_weights
def test_sample_guidance_scale_and_options(tmp_path, sample_calls):
    """--label alone guides at the default scale 2; --guidance 1 is plain conditional sampling
    (no CFG: one model call per step, not two); DDIM under guidance re-derives eps from x0."""
    out = tmp_path / "s.png"
    args = ["sample", "--steps", "2", "--n", "2", "--out", str(out), "--quiet", "--label", "3"]
    assert main(args) == 0
    assert main([*args, "--guidance", "1"]) == 0
    assert main([*args, "--guidance", "3.5", "--sampler", "euler"]) == 0
    default, one, euler = sample_calls
    assert default["guidance_scale"] == 2.0 and default["use_clipped_model_output"] is True
    assert one["guidance_scale"] is None and "use_clipped_model_output" not in one
    assert euler["guidance_scale"] == 3.5 and "use_clipped_model_output" not in euler
    assert default["cond"].tolist() == [3, 3]


def test_error_line_drops_the_dispatch_prefix(tmp_path, capsys, monkeypatch):
    """Dispatch errors start with "fastdiff: "; the line already names the command."""

    def fail(**kw):
        raise RuntimeError("fastdiff: backend 'triton' cannot run here")

    monkeypatch.setattr(fastdiff, "train", fail)
    assert main(["train", "--out", str(tmp_path / "m.safetensors"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "fastdiff train: error: backend 'triton' cannot run here", err
