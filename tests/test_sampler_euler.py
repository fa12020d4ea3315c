"""EulerSampler: per-step parity with diffusers' EulerDiscreteScheduler, mixture exactness, API.

diffusers keeps its Euler sample in sigma space (x_sigma = x0 + sigma eps); fastdiff keeps the VP
sample x = a x0 + s eps with a = 1 / sqrt(1 + sigma^2). At every step both sides get the same
state (diffusers' previous output; ours is x = a_i x_sigma, i.e. diffusers' scale_model_input)
and the same model output; ours, mapped back by x_sigma_next = x_next / a_{i+1}, must agree to a
relative error <= 1e-5 (max |ours - theirs| / max |theirs|) against diffusers' scheduler built on
float64 alpha_bar, and <= 1e-5 plus diffusers' own fp32-alpha_bar error against the stock one.
Not checked against cosine: at t = 999 its sigma ~ 2e4 and diffusers' fp32 sigma-space update
x + (sigma' - sigma) d cancels ~sigma / sigma' digits (~1e-4 relative), the VP form does not.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _sampler_cases import rel as _rel
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, PARITY_SHAPE
from test_gmm_exact import GMMEps, _assert_mixture, _run

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, EulerSampler, make_sampler

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL, SCHEDULES = PARITY_SHAPE, PARITY_RTOL, DIFFUSERS_BETAS


def _pair(sched: str, steps: int, zero_snr: bool = False, **opts):
    cfg = dict(SCHEDULES[sched], rescale_betas_zero_snr=zero_snr)
    ours = EulerSampler(NoiseSchedule.from_diffusers(cfg), steps, **opts)
    theirs = diffusers.EulerDiscreteScheduler(**cfg, **opts)
    theirs.set_timesteps(steps)
    # diffusers derives sigma from fp32 alpha_bar: 1 - ab cancels near t = 0 (up to ~1e-4
    # relative in sigma_0). Its twin with float64 alpha_bar rounds sigma once, to fp32.
    twin = diffusers.EulerDiscreteScheduler(**cfg, **opts)
    twin.alphas_cumprod = ours.schedule.alphas_cumprod.clone()
    if zero_snr:
        twin.alphas_cumprod[-1] = 2.0**-24
    twin.set_timesteps(steps)
    s64 = torch.from_numpy(ours.sigmas())
    torch.testing.assert_close(s64, twin.sigmas.double(), rtol=1e-7, atol=0)
    torch.testing.assert_close(s64, theirs.sigmas.double(), rtol=2e-4, atol=0)
    return ours, theirs, twin


CASES = [
    *itertools.product(
        ["linear", "scaled_linear"], ["epsilon", "v_prediction"], ["linspace", "leading"], [30]
    ),
    ("linear", "epsilon", "leading", 50),
    ("scaled_linear", "sample", "linspace", 50),
    ("linear", "v_prediction", "trailing", 40),
]


@pytest.mark.parametrize("sched,pred,spacing,steps", CASES)
def test_per_step_parity_with_diffusers(sched, pred, spacing, steps):
    offset = 1 if spacing == "leading" else 0
    ours, theirs, twin = _pair(
        sched, steps, prediction_type=pred, timestep_spacing=spacing, steps_offset=offset
    )
    sig = ours.sigmas()
    assert torch.equal(ours.timesteps, theirs.timesteps.round().to(torch.int64))
    g = torch.Generator().manual_seed(0)
    x_sig = torch.randn(SHAPE, generator=g) * theirs.init_noise_sigma  # diffusers' x_T
    worst = 0.0
    for i, t in enumerate(theirs.timesteps):
        theirs.scale_model_input(x_sig, t)  # (diffusers warns unless it is called)
        x = twin.scale_model_input(x_sig, t)  # VP sample a_i x_sigma = what the model sees
        mo = 0.6 * torch.randn(SHAPE, generator=g) + 0.4 * x.clamp(-3, 3)
        ref64 = twin.step(mo, t, x_sig).prev_sample
        ref = theirs.step(mo, t, x_sig).prev_sample
        got = ours.step(mo, i, x)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        got_sig = got.double() * math.sqrt(1.0 + sig[i + 1] ** 2)  # back to sigma space
        err64, err = _rel(got_sig, ref64), _rel(got_sig, ref)
        assert err64 <= RTOL, f"step {i} (t={float(t)}): rel err vs float64-ab twin {err64:.2e}"
        bound = RTOL + _rel(ref, ref64)  # plus diffusers' own fp32-alpha_bar error
        assert err <= bound, f"step {i} (t={float(t)}): rel err {err:.2e} > {bound:.2e}"
        worst = max(worst, err64)
        x_sig = ref64
    assert worst > 0.0 or pred == "sample"  # a real comparison ran


def test_zero_snr_sigma_and_coefficients():
    ours, _, _ = _pair("scaled_linear", 30, zero_snr=True, timestep_spacing="trailing")
    assert ours.sigmas()[0] == pytest.approx(4096.0, rel=1e-6)  # sqrt((1 - 2^-24) / 2^-24)
    coef = ours.coef64
    assert (coef[:, [2, 5, 6, 7]] == 0).all() and not any(ours.needs_noise(i) for i in range(30))
    assert coef[-1, 4] == pytest.approx(1.0 / coef[-1, 0])  # last step returns x0 (a_next = 1)


def test_euler_eps_is_ddim_eta0_on_the_same_grid():
    """Euler in sigma space equals DDIM (eta = 0) on the same grid (Karras et al. 2022, sec. 4)."""
    sch = NoiseSchedule("linear")
    eu = EulerSampler(sch, 20, timestep_spacing="leading")
    dd = fastdiff.samplers.DDIMSampler(sch, 20, clip_sample=False, set_alpha_to_one=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g)
    for i in range(19):  # DDIM's last step lands on ab = 1 too, but from t = 0 via prev_t < 0
        eps = torch.randn(SHAPE, generator=g)
        torch.testing.assert_close(eu.step(eps, i, x), dd.step(eps, i, x), rtol=2e-5, atol=2e-5)
        x = eu.step(eps, i, x)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_recovers_gaussian_mixture(spacing):
    sched = NoiseSchedule("linear")
    _assert_mixture(_run(EulerSampler(sched, 50, timestep_spacing=spacing), GMMEps(sched)))


def test_wrong_schedule_fails_mixture_check():
    x = _run(EulerSampler(NoiseSchedule("cosine"), 50), GMMEps(NoiseSchedule("linear")))
    with pytest.raises(AssertionError):
        _assert_mixture(x)


def test_sample_api_euler_v_prediction():
    sched = NoiseSchedule("cosine")
    model = GMMEps(sched, "v_prediction")
    x = fastdiff.sample(
        model,
        steps=40,
        sampler="euler",
        schedule=sched,
        shape=(2,),
        batch_size=3000,
        generator=torch.Generator().manual_seed(1),
        prediction_type="v_prediction",
    )
    assert model.calls == 40
    _assert_mixture(x)


def test_registry_and_errors():
    assert SAMPLERS["euler"] is EulerSampler
    assert isinstance(make_sampler("Euler", NoiseSchedule("linear"), 10), EulerSampler)
    with pytest.raises(ValueError, match="euler"):
        make_sampler("dpm_fast", NoiseSchedule("linear"), 10)
    with pytest.raises(ValueError, match="'euler'"):
        fastdiff.sample(lambda x, t: x, sampler="dpm_fast", shape=(2,))
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(lambda x, t: x, sampler="euler", eta=0.5, shape=(2,))
    with pytest.raises(ValueError, match="prediction_type"):
        EulerSampler(NoiseSchedule("linear"), 10, prediction_type="x0")
