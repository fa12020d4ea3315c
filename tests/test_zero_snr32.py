"""The float32 training alpha_bar the sigma-grid samplers rebuild equals diffusers' bit for bit,
also for zero-terminal-SNR schedules (diffusers rescales its float32 betas in float32; a float64
rescale cast to float32 differed in 921-999 of 1000 values, up to 8e-6 relative, and moved
``lambda_min_clipped`` cuts and grid ends at ties)."""

from __future__ import annotations

import pytest
import torch

from fastdiff.samplers.sigmas import clipped_end, train_alphas_cumprod32, train_sigmas32
from fastdiff.schedules import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

CLASSES = ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler",
           "LMSDiscreteScheduler", "KDPM2DiscreteScheduler"]  # fmt: skip


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("cls", CLASSES)
def test_train_alphas_cumprod32_is_diffusers(cls, beta_schedule, zero_snr):
    kw = dict(beta_schedule=beta_schedule)
    if zero_snr:
        if cls not in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
            pytest.skip(f"diffusers' {cls} has no rescale_betas_zero_snr")
        kw["rescale_betas_zero_snr"] = True
    theirs = getattr(diffusers, cls)(**kw)
    want = theirs.alphas_cumprod.clone()
    if zero_snr:
        want[-1] = 2.0**-24  # the Euler family sets it in __init__; DPM++ when building sigmas
    got = train_alphas_cumprod32(NoiseSchedule.from_diffusers(theirs))
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    sig = train_sigmas32(NoiseSchedule.from_diffusers(theirs))
    assert torch.equal(torch.from_numpy(sig), ((1 - want) / want) ** 0.5)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_zero_snr_lambda_min_clipped_cut_is_diffusers(beta_schedule):
    """diffusers' cut: the number of float32 lambda_t >= lambda_min_clipped (at its own values,
    where a float64-derived alpha_bar fell on the other side of a tie)."""
    sch = diffusers.DPMSolverMultistepScheduler(beta_schedule=beta_schedule,
                                                rescale_betas_zero_snr=True)  # fmt: skip
    ours = NoiseSchedule.from_diffusers(sch)
    lam = torch.log(sch.alpha_t) - torch.log(sch.sigma_t)  # diffusers' float32 lambda_t
    for v in lam[[5, 100, 500, 900, 998]].tolist():
        for clip in (v, float(torch.nextafter(torch.tensor(v), torch.tensor(-1e9)))):
            want = int((lam >= torch.tensor(clip, dtype=lam.dtype)).sum())
            assert clipped_end(ours, clip) == want, clip
