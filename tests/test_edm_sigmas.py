"""``edm_euler``'s ``sigmas=``: diffusers' ``EDMEulerScheduler.set_timesteps(sigmas=...)`` takes
ramp positions r (not noise levels), one per step, and maps them with the Karras formula in
float64 (the default grid is r = linspace(0, 1, steps)). Grid, timesteps and whole runs vs
diffusers 0.42 (float64 / float32 ramps, final_sigmas_type, v-prediction, churn, img2img), and
the refusals (exponential grid, noise levels given as a ramp, a wrong length).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_edm import SHAPE, _model, _rel, _their_loop

import fastdiff
from fastdiff.samplers import EDMEulerSampler

diffusers = pytest.importorskip("diffusers")
from diffusers import EDMEulerScheduler  # noqa: E402

RTOL = 1e-5
RAMPS = [
    torch.tensor([0.0, 0.1, 0.35, 0.6, 0.9, 1.0], dtype=torch.float64),
    torch.tensor([0.05, 0.33, 0.7], dtype=torch.float32),  # diffusers converts the float32 values
    torch.tensor([0.2], dtype=torch.float64),  # one step
]
CFGS = [
    {},
    {"final_sigmas_type": "sigma_min"},
    {"sigma_data": 1.0, "sigma_max": 120.0, "prediction_type": "v_prediction", "rho": 5.0},
]


def _theirs(ramp, **cfg):
    theirs = EDMEulerScheduler(**cfg)
    theirs.set_timesteps(sigmas=ramp)
    return theirs


@pytest.mark.parametrize("cfg", CFGS, ids=str)
@pytest.mark.parametrize("ramp", RAMPS, ids=lambda r: f"{len(r)}-{r.dtype}")
def test_grid_and_timesteps_are_diffusers(ramp, cfg):
    theirs = _theirs(ramp, **cfg)
    ours = EDMEulerSampler(None, len(ramp), sigmas=ramp, **cfg)
    assert torch.equal(torch.from_numpy(ours.sigmas).float(), theirs.sigmas)  # bit for bit
    assert torch.equal(ours.timesteps, theirs.timesteps)
    # the Karras formula (Karras et al. 2022 eq. 5) on the ramp, float64
    c = EDMEulerScheduler(**cfg).config
    hi, lo = c.sigma_max ** (1 / c.rho), c.sigma_min ** (1 / c.rho)
    want = (hi + ramp.double().numpy() * (lo - hi)) ** c.rho
    np.testing.assert_allclose(ours.sigmas[:-1], want, rtol=1e-7)
    # list, tuple and numpy forms of the same float64 values give the same grid
    for form in (ramp.tolist(), tuple(ramp.tolist()), ramp.double().numpy()):
        again = EDMEulerSampler(None, len(ramp), sigmas=form, **cfg)
        if ramp.dtype == torch.float64:
            assert np.array_equal(again.sigmas, ours.sigmas)
        else:  # the float32 tensor's values as float64: the same up to the ramp's rounding
            np.testing.assert_allclose(again.sigmas, ours.sigmas, rtol=1e-6)


def test_the_default_ramp_is_linspace():
    """sigmas = linspace(0, 1, steps) is the default grid exactly (diffusers' own default)."""
    a = EDMEulerSampler(None, 7)
    b = EDMEulerSampler(None, 7, sigmas=torch.linspace(0, 1, 7, dtype=torch.float64))
    assert np.array_equal(a.sigmas, b.sigmas) and torch.equal(a.timesteps, b.timesteps)
    assert a.ramp is None and b.ramp is not None


@torch.no_grad()
@pytest.mark.parametrize("cfg", CFGS, ids=str)
@pytest.mark.parametrize("gs", [None, 2.5])
def test_sample_with_a_ramp_is_diffusers_loop(cfg, gs):
    ramp = RAMPS[0]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    want = _their_loop(_theirs(ramp, **cfg), z, gs)
    guide = {} if gs is None else dict(cond=torch.zeros(2), uncond=torch.ones(2), guidance_scale=gs)
    got = fastdiff.sample(_model, len(ramp), sampler="edm_euler", noise=z, sigmas=ramp, **cfg,
                          **guide)  # fmt: skip
    assert _rel(got, want) <= RTOL
    # the same through the scheduler object (its config) plus the option
    got2 = fastdiff.sample(_model, len(ramp), schedule=EDMEulerScheduler(**cfg), noise=z,
                           sigmas=ramp, **guide)  # fmt: skip
    torch.testing.assert_close(got2, got, rtol=0, atol=0)
    # and the ramp changes the run (not ignored): the default 6-step grid differs
    default = fastdiff.sample(_model, len(ramp), sampler="edm_euler", noise=z, **cfg, **guide)
    assert _rel(default, got) > 1e-3


@torch.no_grad()
def test_churn_run_with_a_ramp_is_diffusers():
    ramp, churn = RAMPS[0], dict(s_churn=4.0, s_tmin=0.05, s_tmax=50.0)
    theirs = _theirs(ramp)
    g = torch.Generator().manual_seed(8)
    X = torch.randn(SHAPE, generator=g) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        out = _model(theirs.scale_model_input(X, t), t.expand(2))
        X = theirs.step(out, t, X, generator=g, **churn).prev_sample
    got = fastdiff.sample(_model, len(ramp), sampler="edm_euler", shape=SHAPE[1:], batch_size=2,
                          sigmas=ramp, generator=torch.Generator().manual_seed(8),
                          **churn)  # fmt: skip
    assert _rel(got, X) <= RTOL


@torch.no_grad()
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_img2img_with_a_ramp_is_diffusers(strength):
    """The img2img pipeline's start on the custom grid: get_timesteps, set_begin_index,
    add_noise at the first kept sigma, then the loop."""
    ramp = RAMPS[0]
    n = len(ramp)
    image = torch.rand(SHAPE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    theirs = _theirs(ramp)
    s = n - min(int(n * strength), n)
    timesteps = theirs.timesteps[s:]
    theirs.set_begin_index(s)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    X = theirs.add_noise(image, noise, timesteps[:1].repeat(2))
    for t in timesteps:
        X = theirs.step(_model(theirs.scale_model_input(X, t), t.expand(2)), t, X).prev_sample
    got = fastdiff.sample(_model, n, sampler="edm_euler", sigmas=ramp, image=image,
                          strength=strength, noise=noise)  # fmt: skip
    assert _rel(got, X) <= RTOL


@pytest.mark.parametrize(
    "opts, err, match",
    [
        ({"sigmas": [0.0, 0.5, 1.0], "sigma_schedule": "exponential"}, ValueError,
         "sigma_schedule='karras'.*only len"),
        ({"sigmas": [80.0, 10.0, 0.5]}, ValueError, "not noise levels"),  # noise levels, not r
        ({"sigmas": [0.0, 0.6, 0.4]}, ValueError, "strictly increasing"),
        ({"sigmas": [0.0, 0.5, 0.5]}, ValueError, "strictly increasing"),
        ({"sigmas": [-0.1, 0.5, 1.0]}, ValueError, r"in \[0, 1\]"),
        ({"sigmas": [0.0, 0.5, 1.1]}, ValueError, r"in \[0, 1\]"),
        ({"sigmas": [0.0, math.nan, 1.0]}, ValueError, "finite"),
        ({"sigmas": [0.0, 0.5]}, ValueError, "pass steps=2"),
        ({"sigmas": [0.0, 0.5, 0.7, 1.0]}, ValueError, "pass steps=4"),
        ({"sigmas": 0.5}, TypeError, "1-D sequence"),
        ({"sigmas": "0.5"}, TypeError, "1-D sequence"),
        ({"sigmas": [0.0, "0.5", 1.0]}, TypeError, "str"),
        ({"sigmas": [0.0, True, 1.0]}, TypeError, "bool"),
        ({"sigmas": torch.tensor([True, False, True])}, TypeError, "dtype torch.bool"),
        ({"sigmas": torch.zeros(3, 1)}, ValueError, "1-D"),
    ],
)  # fmt: skip
def test_bad_ramps_are_refused(opts, err, match):
    with pytest.raises(err, match=f"^sigmas: .*{match}"):
        EDMEulerSampler(None, 3, **opts)
    calls = []

    def model(x, t):
        calls.append(t)
        return _model(x, t)

    with pytest.raises(err, match="^sigmas: "):
        fastdiff.sample(model, 3, sampler="edm_euler", shape=SHAPE[1:], **opts)
    assert calls == []


def test_edm_dpm_takes_no_ramp():
    """diffusers' EDMDPMSolverMultistepScheduler.set_timesteps has no sigmas=: neither has
    edm_dpm++ (an unknown option)."""
    with pytest.raises(TypeError, match="unknown option"):
        fastdiff.sample(_model, 3, sampler="edm_dpm++", shape=SHAPE[1:], sigmas=[0.0, 0.5, 1.0])


def test_steps_default_to_the_ramp_length():
    ramp = RAMPS[0]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    got = fastdiff.sample(_model, sampler="edm_euler", noise=z, sigmas=ramp)
    want = fastdiff.sample(_model, len(ramp), sampler="edm_euler", noise=z, sigmas=ramp)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
