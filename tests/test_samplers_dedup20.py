"""Direct tests of the helpers the multistep samplers share since session 20's de-duplication:
the run bookkeeping of :mod:`fastdiff.samplers._history` (which kept operands a unipc_step row
reads), the DPM-Solver family's :mod:`fastdiff.samplers._solver_common` (spaced and sigma-grid
timesteps checked against diffusers' schedulers, the thresholding pass against diffusers'
``_threshold_sample``, option checks) and the exponential / beta grid ends of LMS / DPM++ SDE.
The samplers' own tests cover them through every sampler that calls them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff import NoiseSchedule
from fastdiff.samplers._history import read_operands
from fastdiff.samplers._solver_common import (
    check_lambda_min_clipped,
    custom_steps,
    sigma_grid_timesteps,
    spaced_over_steps_plus_one,
    threshold_config,
    thresholded_x0,
)
from fastdiff.samplers.base import cached
from fastdiff.samplers.lms import exp_beta_ends
from fastdiff.samplers.sigmas import train_sigmas32

diffusers = pytest.importorskip("diffusers")


def _row(**cols: float) -> np.ndarray:
    r = np.zeros(12)
    for k, v in cols.items():
        r[int(k[1:])] = v
    return r


@pytest.mark.parametrize(
    ("cols", "expect", "expect3"),
    [
        ({}, "----", "---"),
        ({"c3": 0.5}, "L---", "L--"),  # last alone: it has no chain to the m
        ({"c5": 1.0}, "-1--", "-1-"),
        ({"c9": -2.0}, "-1--", "-1-"),  # p_m1 reads m_{i-1} too
        ({"c11": 1.0}, "-12-", "-12"),  # m_{i-2} needs m_{i-1}
        ({"c6": 1.0, "c3": 1.0}, "L12-", "L12"),
        ({"c10": 3.0}, "-123", "---"),  # m_{i-3} needs both newer ones (none kept: not read)
    ],
)
def test_read_operands_passes_what_the_row_reads(cols, expect, expect3):
    hist = ["L", "1", "2", "3"]
    got = "".join(t or "-" for t in read_operands(_row(**cols), hist))
    assert got == expect
    # fewer kept operands (DEIS keeps two m, singlestep DPM-Solver last + two m): the weights
    # of the operands not kept are not looked at
    assert "".join(t or "-" for t in read_operands(_row(**cols), hist[:3])) == expect3


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 25])
def test_spaced_grid_is_diffusers(spacing, steps):
    for cls in (diffusers.DPMSolverMultistepScheduler, diffusers.DEISMultistepScheduler):
        ref = cls(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        ref.set_timesteps(steps)
        got = spaced_over_steps_plus_one(1000, steps, spacing, ref.config.steps_offset, 1000)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ref.timesteps.numpy())


def test_spaced_trailing_grid_is_short_below_a_clipped_end():
    assert len(spaced_over_steps_plus_one(1000, 10, "trailing", 0, 700)) == 7


@pytest.mark.parametrize("grid", ["karras", "exponential", "beta"])
def test_sigma_grid_timesteps_is_diffusers(grid):
    pytest.importorskip("scipy")
    sched = NoiseSchedule("scaled_linear")
    ref = diffusers.DPMSolverSinglestepScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        **{f"use_{grid}_sigmas": True},
    )
    ref.set_timesteps(9)
    sig, ts = sigma_grid_timesteps(grid, train_sigmas32(sched), 9, rounded=grid == "karras")
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    np.testing.assert_allclose(sig, ref.sigmas[:-1].numpy(), rtol=1e-6)
    # an inversion's grid: the same levels, ascending
    up, ts_up = sigma_grid_timesteps(grid, train_sigmas32(sched), 9, rounded=grid == "karras",
                                     ascending=True)  # fmt: skip
    np.testing.assert_allclose(up, sig[::-1], rtol=1e-9)
    assert np.all(np.diff(ts_up) >= 0)


def test_sigma_grid_exponential_is_even_in_log_sigma_and_rounding_is_optional():
    train = train_sigmas32(NoiseSchedule("linear"))
    sig, ts = sigma_grid_timesteps("exponential", train, 12, rounded=True)
    np.testing.assert_allclose(np.diff(np.log(sig)), np.diff(np.log(sig))[0], rtol=1e-9)
    assert sig[0] == pytest.approx(float(train[-1])) and sig[-1] == pytest.approx(float(train[0]))
    _, cut = sigma_grid_timesteps("exponential", train, 12, rounded=False)
    assert np.all((ts - cut >= 0) & (ts - cut <= 1)) and np.any(ts != cut)  # round vs truncate


def test_thresholded_x0_is_diffusers_threshold_sample():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 6, 6, generator=g), 3 * torch.randn(4, 4, 6, 6, generator=g)
    smp = type("S", (), {"dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5})()
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    got = thresholded_x0(smp, x, eps, 2.0, a, s, "epsilon")
    u, c = eps.chunk(2)
    x0 = (x - s * (u + 2.0 * (c - u))) / a
    ref = diffusers.DPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=0.9,
                                                sample_max_value=1.5)  # fmt: skip
    torch.testing.assert_close(got, ref._threshold_sample(x0), rtol=1e-6, atol=1e-6)
    half = thresholded_x0(smp, x.half(), eps.half(), 2.0, a, s, "epsilon", in_x_dtype=True)
    assert half.dtype == torch.float16
    with pytest.raises(TypeError, match="model_output: must be float32, float16 or bfloat16"):
        thresholded_x0(smp, x, eps.double(), 2.0, a, s, "epsilon", in_x_dtype=True)
    on = threshold_config(type("S", (), {**smp.__class__.__dict__, "thresholding": True})())
    assert on == {"thresholding": True, "threshold_ratio": 0.9, "sample_max_value": 1.5}
    off = threshold_config(type("S", (), {**smp.__class__.__dict__, "thresholding": False})())
    assert off == {"thresholding": False, "threshold_ratio": None, "sample_max_value": None}


def test_option_checks():
    assert check_lambda_min_clipped(-5) == -5.0 and check_lambda_min_clipped(-math.inf) == -math.inf
    with pytest.raises(TypeError, match="lambda_min_clipped: expected a float, got bool"):
        check_lambda_min_clipped(True)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="lambda_min_clipped: expected a float < inf"):
            check_lambda_min_clipped(bad)
    ts, n = custom_steps([900, 500, 100], 1000, None)
    assert n == 3 and ts.tolist() == [900, 500, 100]
    with pytest.raises(ValueError, match="steps: got 4 but 3 custom timesteps"):
        custom_steps([900, 500, 100], 1000, 4)
    assert exp_beta_ends(0.1, 10.0, True, False) == (0.1, 10.0)
    assert exp_beta_ends(0.1, 10.0, False, False) == (None, None)  # ignored, as diffusers
    with pytest.raises(ValueError, match="sigma_min: expected None or a finite float > 0"):
        exp_beta_ends(-1.0, None, False, False)  # checked even where ignored


def test_cached_makes_once():
    calls, cache = [], {}
    for _ in range(3):
        out = cached(cache, "k", lambda: calls.append(1) or torch.ones(2))
    assert len(calls) == 1 and cache["k"] is out
