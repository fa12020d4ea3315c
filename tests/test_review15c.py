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


# ---------------------------------------------------------------------- bad inputs
def _steps(smp, n: int, bad_at: int | None = None, bad=None) -> torch.Tensor:
    """``n`` steps on fixed outputs; at ``bad_at`` first a call with ``bad(model_output)`` that
    must raise and leave x and the run (history, anchor) as they were."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    for i in range(n):
        mo = 0.6 * torch.randn(SHAPE, generator=g) + 0.4 * x
        if i == bad_at:
            before = x.clone()
            with pytest.raises(TypeError, match="model_output.*float32, float16 or bfloat16"):
                smp.step(bad(mo), i, x)
            assert torch.equal(x, before)
        x = smp.step(mo, i, x)
    return x


@pytest.mark.parametrize("name", ["deis", "dpm++_single"])
@pytest.mark.parametrize("thresholding", [False, True])
def test_float64_model_output_refused_with_thresholding_too(name, thresholding):
    """A float64 model output is a TypeError naming it (the op's check); with thresholding the
    torch pass in front of the op cast it to x's dtype and ran the step. The refused call leaves
    the run alone: the next call continues it."""
    sch = NoiseSchedule.from_diffusers(SL)
    opts = dict(solver_order=3, thresholding=thresholding)
    ref = _steps(make_sampler(name, sch, 6, **opts), 6)
    got = _steps(make_sampler(name, sch, 6, **opts), 6, bad_at=3, bad=lambda mo: mo.double())
    assert torch.equal(got, ref)
