"""Custom grids for Euler, Heun and DDPM, as diffusers' ``set_timesteps(timesteps=...)`` /
``EulerDiscreteScheduler.set_timesteps(sigmas=...)`` take them (Align Your Steps, hand-tuned
few-step grids): whole runs equal diffusers' loops, ``steps`` defaults to the grid's length, and
diffusers' refusals are ValueErrors naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import DDPMSampler, EulerSampler, HeunSampler

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 4, 4)
SL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# Align Your Steps' 10-step SD 1.5 schedule (Sabour et al. 2024), as diffusers' docs pass it
AYS_SD15 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
HAND = [999, 800, 520, 260, 90, 0]  # a hand-made few-step grid, ending at t = 0
# AYS SD 1.5 sigmas (11 values for 10 steps, the last > 0) and a Karras (rho = 7) list ending at 0
AYS_SIGMAS = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
_r = np.linspace(0, 1, 8)
KARRAS = [*((14.6 ** (1 / 7) + _r * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7), 0.0]
PREDS = ["epsilon", "v_prediction", "sample"]


def _eps(x, t):
    return 0.3 * x + torch.cos(t.double() / 300).to(x.dtype).reshape(-1, 1, 1, 1)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _sigma_loop(sch, z):
    """diffusers' Euler / Heun pipeline loop from x_sigma = init_noise_sigma z (fastdiff's
    sample() starts there too); the model gets the rounded timestep, as fastdiff passes it to
    a plain callable. Returns (sample, rounded model timesteps)."""
    x = z * sch.init_noise_sigma
    seen = []
    for t in sch.timesteps:
        x_in = sch.scale_model_input(x, t)
        seen.append(int(t.round()))
        x = sch.step(_eps(x_in, t.round().expand(z.shape[0])), t, x).prev_sample
    return x, seen


def _run(sampler, z, **kw):
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return _eps(x, t)

    out = fastdiff.sample(model, sampler=sampler, schedule=NoiseSchedule("scaled_linear"),
                          noise=z, **kw)  # fmt: skip
    return out, seen


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("grid", [AYS_SD15, HAND])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_custom_timesteps_match_diffusers(name, grid, pred):
    cls = {"euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler}
    sch = cls[name](**SL, prediction_type=pred)
    sch.set_timesteps(timesteps=grid)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ref, their_ts = _sigma_loop(sch, z)
    got, seen = _run(name, z, timesteps=grid, prediction_type=pred)  # no steps: len(grid)
    assert seen == their_ts  # Heun: [t0, t1, t1, ...], 2N - 1 calls
    assert sorted(set(seen), reverse=True) == grid
    assert _rel(got, ref) <= 1e-5
    again, _ = _run(name, z, steps=len(grid), timesteps=grid, prediction_type=pred)
    assert torch.equal(again, got)


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("grid", [AYS_SIGMAS, KARRAS])
def test_euler_custom_sigmas_match_diffusers(grid, pred):
    sch = diffusers.EulerDiscreteScheduler(**SL, prediction_type=pred)
    sch.set_timesteps(sigmas=grid)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    ref, their_ts = _sigma_loop(sch, z)
    got, seen = _run("euler", z, sigmas=grid, prediction_type=pred)  # steps = len - 1
    assert seen == their_ts and len(seen) == len(grid) - 1
    assert _rel(got, ref) <= 1e-5
    smp = EulerSampler(NoiseSchedule("scaled_linear"), None, sigmas=grid)
    np.testing.assert_allclose(smp.sigmas(), sch.sigmas.double().numpy(), rtol=0, atol=0)


def test_euler_custom_sigmas_override_a_karras_scheduler_as_diffusers():
    """diffusers' sigmas= branch ignores use_karras_sigmas (and sigma_min / sigma_max)."""
    sch = diffusers.EulerDiscreteScheduler(**SL, use_karras_sigmas=True, sigma_min=0.5)
    sch.set_timesteps(sigmas=AYS_SIGMAS)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    ref, _ = _sigma_loop(sch, z)
    got = fastdiff.sample(_eps, sampler="euler", schedule=sch, sigmas=AYS_SIGMAS, noise=z)
    assert _rel(got, ref) <= 1e-5


def test_euler_final_sigma_above_zero_returns_diffusers_x_sigma():
    """With sigmas ending at 0.029 the last step lands on x_sigma = x0 + 0.029 eps (diffusers'
    output), not the VP sample a_N x_sigma (0.04% smaller)."""
    sch = NoiseSchedule("scaled_linear")
    smp = EulerSampler(sch, None, sigmas=[2.0, 0.5])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    s0 = float(smp.sigmas()[0])
    x_sig = x.double() * (1 + s0**2) ** 0.5
    want = x_sig + (0.5 - s0) * eps.double()
    assert _rel(smp.step(eps, 0, x), want) <= 1e-6
    assert smp.sigmas()[-1] == pytest.approx(0.5)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("grid", [AYS_SD15, HAND])
def test_ddpm_custom_timesteps_match_diffusers(grid, variance_type, pred, monkeypatch):
    """prev_t is the next custom entry (diffusers' previous_timestep); after the last one
    ab_prev = 1, and a last t > 0 (AYS: 24) still adds noise, as diffusers."""
    from diffusers.schedulers import scheduling_ddpm

    def randn32(shape, generator=None, device=None, dtype=None, **_):
        return torch.randn(shape, generator=generator).to(dtype)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", randn32)
    kw = dict(prediction_type=pred, variance_type=variance_type, clip_sample=False)
    sch = NoiseSchedule("scaled_linear")
    theirs = diffusers.DDPMScheduler(**SL, **kw)
    theirs.set_timesteps(timesteps=grid)
    twin = diffusers.DDPMScheduler(**SL, **kw)  # float64 constants
    twin.set_timesteps(timesteps=grid)
    twin.alphas_cumprod = sch.alphas_cumprod.clone()
    twin.one = torch.tensor(1.0, dtype=torch.float64)
    ours = DDPMSampler(sch, None, timesteps=grid, **kw)
    assert ours.timesteps.tolist() == grid and ours.steps == len(grid)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=g)
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    for i, t in enumerate(theirs.timesteps):
        mo = 0.6 * torch.randn(SHAPE, generator=g) + 0.4 * x.clamp(-3, 3)
        if variance_type == "learned_range":  # 2C channels: [prediction, v in [-1, 1]]
            mo = torch.cat([mo, torch.rand(SHAPE, generator=g) * 2 - 1], dim=1)
        noise = torch.randn(SHAPE, generator=gens[2]) if t > 0 else None
        ref = theirs.step(mo, t, x, generator=gens[0]).prev_sample
        ref64 = twin.step(mo.double(), t, x.double(), generator=gens[1]).prev_sample
        got = ours.step(mo, i, x, noise=noise)
        assert _rel(got, ref64) <= 1e-5, f"step {i} (t={int(t)})"
        assert _rel(got, ref) <= 1e-5 + _rel(ref, ref64), f"step {i} (t={int(t)})"
        x = ref
    assert t > 0 or grid[-1] == 0
    assert ours.needs_noise(len(grid) - 1) == (grid[-1] > 0)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("grid", [AYS_SD15, HAND])
def test_ddpm_custom_timesteps_whole_run_equals_diffusers(grid, variance_type):
    """sample(sampler="ddpm", schedule=<DDPMScheduler>, timesteps=...) with no steps lands where
    diffusers' loop does from the same x_T and generator (its noise drawn as diffusers draws)."""
    sch = diffusers.DDPMScheduler(**SL, variance_type=variance_type)
    sch.set_timesteps(timesteps=grid)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    x, g = z.clone(), torch.Generator().manual_seed(1)
    for t in sch.timesteps:
        x = sch.step(_eps(x, t.expand(SHAPE[0])), t, x, generator=g).prev_sample
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return _eps(x, t)

    got = fastdiff.sample(model, sampler="ddpm", schedule=sch, timesteps=grid, noise=z,
                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert seen == grid
    assert _rel(got, x) <= 1e-5


def test_refusals_as_diffusers():
    sch = NoiseSchedule("scaled_linear")
    for cls in (EulerSampler, HeunSampler):
        for grid in ("karras", "exponential", "beta"):
            with pytest.raises(ValueError, match=rf"timesteps: .*use_{grid}_sigmas=True"):
                cls(sch, None, timesteps=AYS_SD15, **{f"use_{grid}_sigmas": True})
        with pytest.raises(ValueError, match=r"steps: got 9 but 10 custom timesteps"):
            cls(sch, 9, timesteps=AYS_SD15)
        with pytest.raises(ValueError, match=r"timesteps: expected strictly descending"):
            cls(sch, None, timesteps=[999, 999, 500])
        with pytest.raises(ValueError, match=r"timesteps: expected values in \[0, 999\]"):
            cls(sch, None, timesteps=[1000, 500])
    with pytest.raises(ValueError, match=r"timesteps, sigmas: pass one of them"):
        EulerSampler(sch, None, timesteps=AYS_SD15, sigmas=AYS_SIGMAS)
    with pytest.raises(ValueError, match=r"steps: got 11 but 11 custom sigmas \(10 steps\)"):
        EulerSampler(sch, 11, sigmas=AYS_SIGMAS)
    with pytest.raises(ValueError, match=r"sigmas: expected steps \+ 1 >= 2"):
        EulerSampler(sch, None, sigmas=[1.0])
    with pytest.raises(ValueError, match=r"sigmas: expected strictly descending"):
        EulerSampler(sch, None, sigmas=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match=r"sigmas: expected finite values > 0"):
        EulerSampler(sch, None, sigmas=[1.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match=r"sigmas: expected finite values > 0"):
        EulerSampler(sch, None, sigmas=[1.0, 0.0, -0.5])
    with pytest.raises(TypeError, match=r"sigmas: expected a list of floats"):
        EulerSampler(sch, None, sigmas=["a", "b"])
    with pytest.raises(ValueError, match=r"steps: got 9 but 10 custom timesteps"):
        DDPMSampler(sch, 9, timesteps=AYS_SD15)
    with pytest.raises(ValueError, match=r"timesteps: expected strictly descending"):
        DDPMSampler(sch, None, timesteps=[10, 20])
    with pytest.raises(TypeError, match=r"steps: expected an int"):
        EulerSampler(sch, None)
    with pytest.raises(TypeError, match=r"sample: unknown option"):  # Heun has no sigmas=
        fastdiff.sample(_eps, sampler="heun", sigmas=AYS_SIGMAS, noise=torch.zeros(SHAPE))


def test_sample_refuses_timesteps_with_a_karras_scheduler():
    sch = diffusers.EulerDiscreteScheduler(**SL, use_karras_sigmas=True)
    with pytest.raises(ValueError):  # diffusers' set_timesteps refuses it too
        sch.set_timesteps(timesteps=AYS_SD15)
    with pytest.raises(ValueError, match=r"timesteps: .*use_karras_sigmas=True"):
        fastdiff.sample(_eps, sampler="euler", schedule=sch, timesteps=AYS_SD15,
                        noise=torch.zeros(SHAPE))  # fmt: skip
    with pytest.raises(ValueError, match=r"steps: got 4 but 10 custom timesteps"):
        fastdiff.sample(_eps, 4, sampler="euler", timesteps=AYS_SD15, noise=torch.zeros(SHAPE))


@pytest.mark.parametrize(
    "opts",
    [
        dict(sampler="euler", sigmas=AYS_SIGMAS),
        dict(sampler="euler", timesteps=AYS_SD15),
        dict(sampler="heun", timesteps=HAND),
        dict(sampler="ddpm", timesteps=AYS_SD15),
    ],
    ids=["euler-sigmas", "euler-timesteps", "heun", "ddpm"],
)
@torch.no_grad()
def test_graphed_loop_equals_eager_on_custom_grids(opts, fake_cuda_graphs, monkeypatch):
    """The CUDA-graph loop (fake graphs on CPU, see conftest) over a custom grid equals the
    eager loop, also when its capture is replayed for the sampler's spaced grid and back."""
    from fastdiff import api

    eager_loop = api._sample_eager
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    n = len(opts.get("timesteps", opts.get("sigmas", [0]))) - ("sigmas" in opts)
    runs = [opts, dict(sampler=opts["sampler"], steps=n), opts]
    for kw in runs:
        outs = []
        for loop in (eager_loop, api._sample_graphed):
            monkeypatch.setattr(api, "_sample_eager", loop)
            outs.append(fastdiff.sample(_eps, noise=z, generator=torch.Generator().manual_seed(2),
                                        schedule=NoiseSchedule("scaled_linear"), **kw))  # fmt: skip
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 1  # one capture, replayed for the other grids
