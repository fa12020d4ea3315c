"""``fastdiff.sample`` with a custom grid and no ``steps``: the number of steps is the grid's
length (diffusers' ``set_timesteps(timesteps=...)`` / ``set_timesteps(sigmas=...)`` take no
``num_inference_steps`` either); with ``steps`` given, a mismatch is still a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import FlowMatchEulerSampler, LCMSampler

SHAPE = (2, 3, 4, 4)


def _eps(x, t):
    return 0.3 * x + torch.cos(t.double() / 300).to(x.dtype).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_custom_timesteps_without_steps(sampler):
    ts = [999, 759, 499, 259, 80]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return _eps(x, t)

    got = fastdiff.sample(model, sampler=sampler, timesteps=ts, noise=z,
                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert seen == ts  # 5 steps, not LCM's default 4
    ref = fastdiff.sample(_eps, steps=5, sampler=sampler, timesteps=ts, noise=z,
                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match=r"steps: got 3 but 5 custom timesteps"):
        fastdiff.sample(_eps, steps=3, sampler=sampler, timesteps=ts, noise=z)


def test_custom_sigmas_without_steps_flow():
    sig = np.linspace(1.0, 1 / 7, 7)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    got = fastdiff.sample(_eps, sampler="flow_euler", sigmas=sig, noise=z)
    smp = FlowMatchEulerSampler(None, 7, sigmas=sig)
    x = z
    for i, t in enumerate(smp.timesteps):
        x = smp.step(_eps(x, t.expand(SHAPE[0])), i, x)
    assert torch.equal(got, x)
    assert LCMSampler(NoiseSchedule("linear"), timesteps=[999, 10]).steps == 2


# Align Your Steps' 10-step schedule for SD 1.5 (Sabour et al. 2024), as diffusers' docs pass it
AYS_SD15 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]


def _dpm_diffusers(kw, ts, z, seed):
    import diffusers

    sch = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kw
    )
    sch.set_timesteps(timesteps=ts)
    x, g = z.clone(), torch.Generator().manual_seed(seed)
    for t in sch.timesteps:
        x = sch.step(_eps(x, t.expand(z.shape[0])), t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_custom_timesteps_match_diffusers(order, final, algo):
    """``sampler="dpm++", timesteps=[...]`` (diffusers' ``set_timesteps(timesteps=...)``, the
    Align Your Steps recipe) equals diffusers' DPMSolverMultistepScheduler run for run."""
    pytest.importorskip("diffusers")
    kw = dict(solver_order=order, final_sigmas_type=final, algorithm_type=algo)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ref = _dpm_diffusers(kw, AYS_SD15, z, 3)
    got = fastdiff.sample(_eps, sampler="dpm++", schedule=NoiseSchedule("scaled_linear"),
                          timesteps=AYS_SD15, noise=z, generator=torch.Generator().manual_seed(3),
                          **kw)  # fmt: skip
    rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel <= 1e-5
    spaced = fastdiff.sample(_eps, 10, sampler="dpm++", schedule=NoiseSchedule("scaled_linear"),
                             noise=z, generator=torch.Generator().manual_seed(3), **kw)  # fmt: skip
    assert not torch.allclose(spaced, got, atol=1e-4)  # the custom grid is what ran


def test_dpm_custom_timesteps_refusals():
    from fastdiff.samplers import DPMSolverPPSampler

    sch = NoiseSchedule("linear")
    assert DPMSolverPPSampler(sch, None, timesteps=AYS_SD15).timesteps.tolist() == AYS_SD15
    with pytest.raises(ValueError, match=r"timesteps: .* use_karras_sigmas=True"):
        DPMSolverPPSampler(sch, None, timesteps=AYS_SD15, use_karras_sigmas=True)
    with pytest.raises(ValueError, match=r"use_lu_lambdas=True"):
        DPMSolverPPSampler(sch, None, timesteps=AYS_SD15, use_lu_lambdas=True)
    with pytest.raises(ValueError, match=r"steps: got 9 but 10 custom timesteps"):
        DPMSolverPPSampler(sch, 9, timesteps=AYS_SD15)
    with pytest.raises(ValueError, match=r"strictly descending"):
        DPMSolverPPSampler(sch, None, timesteps=[999, 999, 500])
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        DPMSolverPPSampler(sch, None, timesteps=[1000, 500])
    with pytest.raises(TypeError, match=r"steps: expected an int"):
        DPMSolverPPSampler(sch, None)
