"""Review 15c: the session-14 samplers (deis, dpm++_single, edm_euler, edm_dpm++) and the custom
grids (``timesteps=`` / ``sigmas=``) against diffusers 0.42, at the edges the per-sampler test
files leave out, plus the tests that kill the surviving mutants of the review's mutation round.

Every comparison gives both sides the same sample and model output (or the same x_T and noise)
and asks for a relative error (max |ours - theirs| / max |theirs|) <= 1e-5, or, in fp16 / bf16,
the FlashAttention rule against a float64 restatement."""

from __future__ import annotations

import pytest
import torch

from fastdiff import NoiseSchedule
from fastdiff.samplers import make_sampler

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 5, 7)
RTOL = 1e-5
SL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
AYS_SD15 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++_single": "DPMSolverSinglestepScheduler",
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _toy(x: torch.Tensor, t) -> torch.Tensor:
    tt = torch.as_tensor(t, dtype=torch.float32)
    return 0.6 * torch.tanh(0.8 * x + 0.1) + 0.5 * torch.sin(tt / 150.0) + 0.05 * x


# ---------------------------------------------------------------------- custom timesteps
@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize(
    "ts", [[999.5, 600.7, 300.2, 10.9], torch.tensor([999.0, 600.4, 300.0, 10.0])], ids=str
)
def test_fractional_custom_timesteps_refused_where_diffusers_interpolates(name, ts):
    """diffusers' Euler / Heun keep fractional custom timesteps (sigma interpolated at 600.4);
    truncating them to 600 stepped on other noise levels with no error (a wrong answer): they
    are refused. Whole-number floats and tensors are fine."""
    sch = NoiseSchedule.from_diffusers(SL)
    with pytest.raises(ValueError, match=r"timesteps: expected whole numbers.*600\.(4|7)"):
        make_sampler(name, sch, None, timesteps=ts)
    ok = make_sampler(name, sch, None, timesteps=torch.tensor([999.0, 600.0, 300.0, 10.0]))
    theirs = getattr(diffusers, SCHEDULERS[name])(**SL)
    theirs.set_timesteps(timesteps=[999, 600, 300, 10])
    assert ok.timesteps.tolist() == theirs.timesteps.long().tolist()


@pytest.mark.parametrize("name", ["ddpm", "dpm++", "dpm++_single"])
def test_fractional_custom_timesteps_truncate_as_diffusers(name):
    """DDPM / DPM-Solver(++) cast custom timesteps to int64 in diffusers too: same grid."""
    sch = NoiseSchedule.from_diffusers(SL)
    ours = make_sampler(name, sch, None, timesteps=[999.5, 600.7, 300.2, 10.9])
    theirs = getattr(diffusers, SCHEDULERS[name])(**SL)
    theirs.set_timesteps(timesteps=[999.5, 600.7, 300.2, 10.9])
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == [999, 600, 300, 10]
