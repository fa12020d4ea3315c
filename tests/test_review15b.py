"""Review 15b: LCM / TCD and flow Euler / Heun against diffusers 0.42, probes the per-sampler
tests did not make (and the mutants of lcm.py / flow.py they let through).

LCM / TCD: the settings their diffusers classes ignore, arriving in a config; custom timesteps
through ``sample``; extreme strengths; fp16 / bf16 steps (FlashAttention rule against a float64
twin) and whole runs (the generator's noise stream); TCD's noise draws at a tiny gamma. Flow:
fp16 / bf16 stochastic runs (diffusers draws z in float32), Flux / SD3 configs through ``sample``
(the default grid's unshifted ends, ``mu`` ignored without dynamic shifting, a falsy
``shift_terminal``), the Heun correction's x0, runs starting at call k > 0, reusing a sampler,
and bad inputs named in the errors.
"""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import numpy as np
import pytest
import torch
from _sampler_cases import rel as _rel
from helpers import PARITY_RTOL, PARITY_SHAPE

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import (
    FlowMatchEulerSampler,
    FlowMatchHeunSampler,
    LCMSampler,
    TCDSampler,
)
from fastdiff.samplers.flow import calculate_shift

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler  # noqa: E402
from test_lcm import KINDS, grid_matches_diffusers  # noqa: E402

SHAPE, RTOL = PARITY_SHAPE, PARITY_RTOL
#: 280 elements, not a multiple of 16: torch's CPU randn gives other values in fp16 / bf16 than
#: in fp32 only then (at 384 = PARITY_SHAPE's they coincide, and a wrong draw dtype passes)
ODD = (2, 4, 5, 7)
FLUX_DEV = {  # black-forest-labs/FLUX.1-dev scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


# Flux-dev runs: mu given, mu from image_seq_len, and the pipeline's own sigmas too
FLUX_RUNS = [
    {"mu": 0.9},
    {"image_seq_len": 1024},
    {"image_seq_len": 1024, "sigmas": np.linspace(1, 1 / 6, 6)},
]


def _toy(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic stand-in network of x and t (computed in fp32, returned in x's dtype)."""
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    xf = x.float()
    return (0.6 * torch.tanh(0.8 * xf + 0.1) + 0.5 * torch.sin(tt / 150.0) + 0.05 * xf).to(x.dtype)


def _velocity(x: torch.Tensor, t) -> torch.Tensor:
    s = (torch.as_tensor(t).float() / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
    xf = x.float()
    return (torch.tanh(0.7 * xf) * (0.5 + s) + 0.3 * torch.sin(3.0 * xf + s)).to(x.dtype)


def _distilled_loop(sch, steps, gen, shape=SHAPE, dtype=torch.float32, eta=None, **set_kw):
    """diffusers' LCM / TCD pipeline loop: x_T from ``gen``, then each step draws from it."""
    sch.set_timesteps(steps, **set_kw)
    x = torch.randn(shape, generator=gen).to(dtype)
    kw = {} if eta is None else {"eta": eta}
    for t in sch.timesteps:
        x = sch.step(_toy(x, t.expand(shape[0])), t, x, generator=gen, **kw).prev_sample
    return x


def _flow_loop(sch, x, gen=None, start=0):
    for t in sch.timesteps[start:]:
        x = sch.step(_velocity(x, t.expand(x.shape[0])), t, x, generator=gen).prev_sample
    return x


@contextlib.contextmanager
def _their_noise(z: torch.Tensor):
    """diffusers' LCM / TCD steps draw z = ``z`` (in the dtype they ask for)."""
    from diffusers.schedulers import scheduling_lcm, scheduling_tcd

    def draw(shape, generator=None, device=None, dtype=None):
        return z.to(dtype)

    with mock.patch.object(scheduling_lcm, "randn_tensor", draw), \
            mock.patch.object(scheduling_tcd, "randn_tensor", draw):  # fmt: skip
        yield


# ------------------------------------------------------------------------------ LCM / TCD
IGNORED = [
    {"timestep_spacing": "trailing"},
    {"steps_offset": 1},
    {"set_alpha_to_one": False},
    {"timestep_spacing": "linspace", "steps_offset": 1, "set_alpha_to_one": False},
]
TCD_IGNORED = [{"clip_sample": True, "clip_sample_range": 0.2}, {"thresholding": True},
               {"timestep_scaling": 1.0}]  # fmt: skip


@pytest.mark.parametrize("kind,extra,eta", [
    *[("lcm", e, None) for e in IGNORED],
    *[("tcd", e, eta) for e in IGNORED + TCD_IGNORED for eta in (None, 1.0)],
])  # fmt: skip
@pytest.mark.parametrize("saved", [False, True])
def test_settings_diffusers_ignores_change_nothing(kind, extra, eta, saved):
    """LCMScheduler ignores timestep_spacing / steps_offset / set_alpha_to_one, TCDScheduler
    also clip_sample / thresholding / timestep_scaling: in a schedule= config (an object or a
    saved config) they are neither refused nor applied, as diffusers' loop."""
    cls = getattr(diffusers, KINDS[kind][1])
    ref = _distilled_loop(cls(**extra), 4, torch.Generator().manual_seed(5), eta=eta)
    sch = cls(**extra)
    schedule = {**sch.config, "_class_name": cls.__name__} if saved else sch
    got = fastdiff.sample(_toy, 4, schedule=schedule, shape=SHAPE[1:], batch_size=SHAPE[0],
                          generator=torch.Generator().manual_seed(5), eta=eta)  # fmt: skip
    assert _rel(got, ref) <= RTOL


@pytest.mark.parametrize("kind", ["lcm", "tcd"])
@pytest.mark.parametrize("ts", [[999, 639, 399, 159], [999], [500, 20], [999, 998, 997, 0]])
def test_custom_timesteps_through_sample_is_diffusers_loop(kind, ts):
    """sample(schedule=..., timesteps=[...]) (steps from their number) runs diffusers'
    set_timesteps(timesteps=...) loop, also off the distillation grid and down to t = 0."""
    cls = getattr(diffusers, KINDS[kind][1])
    sch = cls()
    sch.set_timesteps(timesteps=ts)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=gen)
    for t in sch.timesteps:
        x = sch.step(_toy(x, t.expand(SHAPE[0])), t, x, generator=gen).prev_sample
    got = fastdiff.sample(_toy, schedule=cls(), shape=SHAPE[1:], batch_size=SHAPE[0],
                          generator=torch.Generator().manual_seed(5), timesteps=ts)  # fmt: skip
    assert _rel(got, x) <= RTOL


@pytest.mark.parametrize("kind", ["lcm", "tcd"])
@pytest.mark.parametrize("steps,strength,orig", [
    (1, 0.02, 50), (1, 1e-9, 50), (2, 0.04, 50), (1, 0.001, 1000), (1, 0.999, 50),
    (50, 1.0, 50), (51, 1.0, 50), (1, 1.0, 1), (2, 1.0, 1), (1000, 1.0, 1000), (3, 0.5, 7),
    (3, 0.07, 50),
])  # fmt: skip
def test_extreme_strength_and_original_steps_grids(kind, steps, strength, orig):
    """set_timesteps' grid at the edges (one grid entry, strength ~ 0, steps = n, steps > n,
    n = T): the same timesteps, or a ValueError naming steps where diffusers raises."""
    theirs = getattr(diffusers, KINDS[kind][1])(original_inference_steps=orig)
    grid_matches_diffusers(kind, theirs, steps, orig, strength)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,pred,opts", [
    ("lcm", "epsilon", {}),
    ("lcm", "v_prediction", {"clip_sample": True, "clip_sample_range": 0.5}),
    ("lcm", "sample", {"thresholding": True, "sample_max_value": 1.5}),
    ("tcd", "epsilon", {"eta": 0.3}), ("tcd", "v_prediction", {"eta": 1.0}),
    ("tcd", "sample", {"eta": 0.0}),
])  # fmt: skip
def test_half_precision_steps_flash_attention_rule(dtype, kind, pred, opts):
    """fp16 / bf16 samples and outputs: each step's error against diffusers' step run in
    float64 is at most 2x diffusers' own error in that dtype (+ 1 ulp), output in x's dtype.
    (Measured fp16 <= 2.9e-3 vs diffusers' 1.4e-2, bf16 <= 2.6e-2 vs 8.2e-2.)"""
    cls = getattr(diffusers, KINDS[kind][1])
    ckw = {k: v for k, v in opts.items() if k != "eta"}
    theirs, twin = cls(prediction_type=pred, **ckw), cls(prediction_type=pred, **ckw)
    for s in (theirs, twin):
        s.set_timesteps(4)
    ours = KINDS[kind][0](NoiseSchedule.from_diffusers(theirs), 4, prediction_type=pred, **opts)
    twin.alphas_cumprod = ours.schedule.alphas_cumprod.clone()
    ekw = {"eta": opts["eta"]} if "eta" in opts else {}
    g = torch.Generator().manual_seed(11)
    for i, t in enumerate(theirs.timesteps):
        x = torch.randn(SHAPE, generator=g).to(dtype)
        mo = (0.6 * torch.randn(SHAPE, generator=g) + 0.4 * x.float().clamp(-3, 3)).to(dtype)
        z = torch.randn(SHAPE, generator=g).to(dtype)
        with _their_noise(z):
            ref64 = twin.step(mo.double(), t, x.double(), **ekw).prev_sample
            ref = theirs.step(mo, t, x, **ekw).prev_sample
        got = ours.step(mo, i, x, noise=z if ours.needs_noise(i) else None)
        assert got.dtype == dtype == ref.dtype
        err, err_d = (
            (got.double() - ref64).abs().max(),
            (ref.double() - ref64).abs().max(),
        )
        ulp = torch.finfo(dtype).eps * ref64.abs().max()
        assert err <= 2 * err_d + ulp, (i, err.item(), err_d.item())


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("kind,eta", [("lcm", None), ("tcd", 0.3), ("tcd", 1.0)])
def test_half_precision_run_draws_diffusers_noise(dtype, tol, kind, eta):
    """A half-precision sample(generator=) run draws z as diffusers' LCM / TCD step does (in
    the sample's dtype): the runs agree to the dtype's rounding (another noise stream: ~1)."""
    cls = getattr(diffusers, KINDS[kind][1])
    ref = _distilled_loop(cls(), 4, torch.Generator().manual_seed(5), ODD, dtype, eta)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(ODD, generator=gen).to(dtype)
    got = fastdiff.sample(_toy, 4, schedule=cls(), noise=z, generator=gen, eta=eta)
    assert got.dtype == dtype and _rel(got, ref) <= tol


def test_tcd_draws_noise_where_diffusers_does_at_a_tiny_gamma():
    """eta > 0 so small that (1 - eta) is 1 in float32: s = t', the noise weight is 0, yet
    diffusers still draws z on every step but the last (a generator advances as there)."""
    smp = TCDSampler(NoiseSchedule("scaled_linear"), 4, eta=1e-8)
    assert smp.s_timesteps().tolist() == [*smp.timesteps.tolist()[1:], 0]
    assert [smp.needs_noise(i) for i in range(4)] == [True, True, True, False]
    assert all(smp.coef64[i, 5] == 0.0 for i in range(4))
    sch = diffusers.TCDScheduler()
    gen = torch.Generator().manual_seed(2)
    _distilled_loop(sch, 4, gen, eta=1e-8)
    gen2 = torch.Generator().manual_seed(2)
    fastdiff.sample(_toy, 4, schedule=diffusers.TCDScheduler(), shape=SHAPE[1:],
                    batch_size=SHAPE[0], generator=gen2, eta=1e-8)  # fmt: skip
    assert torch.equal(gen.get_state(), gen2.get_state())


@pytest.mark.parametrize("kind", ["lcm", "tcd"])
def test_reusing_a_distilled_sampler(kind):
    """A sampler object runs twice the same (it keeps no state between runs)."""
    smp = KINDS[kind][0](NoiseSchedule("scaled_linear"), 4)
    runs = [
        fastdiff.sample(
            _toy,
            sampler=smp,
            shape=SHAPE[1:],
            batch_size=SHAPE[0],
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("opts,err,match", [
    ({"timestep_scaling": "a"}, TypeError, "timestep_scaling"),
    ({"timestep_scaling": None}, TypeError, "timestep_scaling"),
    ({"timestep_scaling": True}, TypeError, "timestep_scaling"),
    ({"clip_sample_range": "a"}, TypeError, "clip_sample_range"),
    ({"clip_sample": True, "clip_sample_range": float("nan")}, ValueError, "clip_sample_range"),
    ({"thresholding": True, "dynamic_thresholding_ratio": "a"}, TypeError,
     "dynamic_thresholding_ratio"),
    ({"sample_max_value": None}, TypeError, "sample_max_value"),
])  # fmt: skip
def test_lcm_bad_option_types_are_named(opts, err, match):
    with pytest.raises(err, match=match):
        LCMSampler(NoiseSchedule("scaled_linear"), 4, **opts)


def test_lcm_clipped_step_of_an_infinite_output_is_finite_as_diffusers():
    """LCM's eps has coefficient 0 after clip_sample: the term is absent (the fused op forms no
    0 * inf = NaN), so the clipped x0 of an infinite output gives a finite step, as diffusers'."""
    theirs = diffusers.LCMScheduler(clip_sample=True)
    theirs.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x, mo, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    mo[1, 0, 0, 0] = float("inf")
    with _their_noise(z):
        ref = theirs.step(mo, theirs.timesteps[0], x).prev_sample
    got = LCMSampler(NoiseSchedule.from_diffusers(theirs), 4, clip_sample=True).step(
        mo, 0, x, noise=z
    )
    assert torch.isfinite(ref).all()
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))


# ---------------------------------------------------------------------------------- flow
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("graphed", [False, True])
def test_flow_half_precision_stochastic_run_draws_float32_noise(
    dtype, graphed, fake_cuda_graphs, monkeypatch
):
    """diffusers' stochastic flow step upcasts the sample and draws z in float32 (torch's
    fp16 / bf16 randn gives other values): a half-precision sample(generator=) run drew z in
    the sample's dtype, another noise stream (rel err 1.4 vs diffusers' loop), in the eager
    and the CUDA-graph loop. Now both runs are diffusers' to the dtype's rounding (< 1 ulp
    per step)."""
    from fastdiff import api

    if graphed:
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed)
    z = torch.randn(ODD, generator=torch.Generator().manual_seed(0)).to(dtype)
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    theirs.set_timesteps(5)
    ref = _flow_loop(theirs, z, gen=torch.Generator().manual_seed(7))
    got = fastdiff.sample(_velocity, 5, sampler="flow_euler", shift=3.0, stochastic_sampling=True,
                          noise=z, generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert got.dtype == ref.dtype == dtype
    ulp = torch.finfo(dtype).eps * ref.double().abs().max()
    assert (got.double() - ref.double()).abs().max() <= 2 * ulp


def test_flow_step_with_a_generator_draws_float32_noise():
    """step(generator=) draws as diffusers' step: the same z, values within 1 fp16 ulp."""
    theirs = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    theirs.set_timesteps(4)
    smp = FlowMatchEulerSampler(None, 4, stochastic_sampling=True)
    g = torch.Generator().manual_seed(1)
    x, v = (torch.randn(ODD, generator=g).half() for _ in range(2))
    ref = theirs.step(v, theirs.timesteps[0], x, generator=torch.Generator().manual_seed(4))
    got = smp.step(v, 0, x, generator=torch.Generator().manual_seed(4))
    ref = ref.prev_sample
    assert got.dtype == ref.dtype == torch.float16
    ulp = torch.finfo(torch.float16).eps * ref.double().abs().max()
    assert (got.double() - ref.double()).abs().max() <= ulp


@torch.no_grad()
@pytest.mark.parametrize("how", FLUX_RUNS)
def test_flux_dev_config_through_sample(how):
    """A Flux-dev config (use_dynamic_shifting with shift=3.0: the default grid's ends stay
    unshifted, only the time shift with mu applies) with mu, or with image_seq_len (mu from the
    config's base / max shift and sequence lengths), runs diffusers' loop."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    steps = None if "sigmas" in how else 6
    out = fastdiff.sample(_velocity, steps, schedule=dict(FLUX_DEV), noise=z, **how)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV)
    mu = how.get("mu", calculate_shift(how.get("image_seq_len", 0)))
    if "sigmas" in how:
        theirs.set_timesteps(sigmas=how["sigmas"], mu=mu)
    else:
        theirs.set_timesteps(6, mu=mu)
    assert _rel(out, _flow_loop(theirs, z)) <= RTOL


def test_flux_dev_config_without_mu_is_a_clear_error():
    calls = []

    def model(x, t):
        calls.append(t)
        return _velocity(x, t)

    for extra in ({}, {"mu": 0.9, "image_seq_len": 1024}):
        with pytest.raises(ValueError, match="mu"):
            fastdiff.sample(model, 6, schedule=dict(FLUX_DEV), noise=torch.randn(SHAPE), **extra)
    assert calls == []


@pytest.mark.parametrize("steps", [1, 4])
def test_flow_mu_without_dynamic_shifting_is_ignored_as_diffusers(steps):
    """Flux's pipeline passes mu to schnell's static-shift scheduler too: set_timesteps
    ignores it there, and so does the sampler."""
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(steps, mu=0.8)
    smp = FlowMatchEulerSampler(None, steps, shift=3.0, mu=0.8)
    torch.testing.assert_close(torch.from_numpy(smp.sigmas).float(), theirs.sigmas, rtol=0, atol=0)


@pytest.mark.parametrize("terminal", [0, 0.0])
def test_flow_falsy_shift_terminal_means_no_stretch(terminal):
    """diffusers tests ``if self.config.shift_terminal``: 0 is no stretching (not an error)."""
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=terminal)
    theirs.set_timesteps(4)
    smp = FlowMatchEulerSampler(None, 4, shift=3.0, shift_terminal=terminal)
    torch.testing.assert_close(torch.from_numpy(smp.sigmas).float(), theirs.sigmas, rtol=0, atol=0)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    out = fastdiff.sample(_velocity, 4, schedule=FlowMatchEulerDiscreteScheduler(
        shift=3.0, shift_terminal=terminal), noise=z)  # fmt: skip
    assert _rel(out, _flow_loop(theirs, z)) <= RTOL


@torch.no_grad()
def test_flow_heun_trajectory_x0_is_diffusers_denoised():
    """The x0 of each Heun call: x - sigma v at that call's sigma (the correction's: sigma_{i+1},
    diffusers' ``denoised`` there), in the trajectory sample() returns."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    smp = FlowMatchHeunSampler(None, 3, shift=3.0)
    out, traj = fastdiff.sample(_velocity, sampler=smp, noise=z, return_trajectory=True)
    for k in range(smp.steps):
        x, t = traj["x"][k], smp.timesteps[k]
        sigma = smp.sigmas[(k + 1) // 2]
        assert float(t) == pytest.approx(sigma * 1000, rel=1e-6)
        expect = x.double() - sigma * _velocity(x, t.expand(SHAPE[0])).double()
        torch.testing.assert_close(traj["x0"][k].double(), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps,k", [(3, 2), (3, 4), (5, 2), (5, 4)])
def test_flow_heun_run_from_an_even_call_is_diffusers_begin_index(steps, k):
    """A run from call k = 2 j (an img2img start) is diffusers' loop after set_begin_index(k);
    an odd start is a ValueError (the correction needs its Euler stage's input)."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))
    theirs = FlowMatchHeunDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(steps)
    theirs.set_begin_index(k)
    ref = _flow_loop(theirs, z, start=k)
    smp = FlowMatchHeunSampler(None, steps, shift=3.0)
    x = z
    for i in range(k, smp.steps):
        x = smp.step(_velocity(x, smp.timesteps[i].expand(SHAPE[0])), i, x)
    assert _rel(x, ref) <= RTOL
    with pytest.raises(ValueError, match=f"call {k - 1} is the Heun correction"):
        FlowMatchHeunSampler(None, steps, shift=3.0).step(_velocity(z, 0.5), k - 1, z)


@torch.no_grad()
def test_reusing_flow_samplers_and_a_heun_run_cut_short():
    """A flow sampler object runs twice the same (stochastic: same generator), also a Heun
    sampler whose previous use stopped after an Euler stage."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for smp in (FlowMatchHeunSampler(None, 4, shift=3.0),
                FlowMatchEulerSampler(None, 4, shift=3.0, stochastic_sampling=True)):  # fmt: skip
        a, b = (
            fastdiff.sample(
                _velocity,
                sampler=smp,
                noise=z,
                generator=torch.Generator().manual_seed(1),
            )
            for _ in range(2)
        )
        assert torch.equal(a, b)
    heun = FlowMatchHeunSampler(None, 4, shift=3.0)
    heun.step(_velocity(z, heun.timesteps[0]), 0, z.clone())
    a = fastdiff.sample(_velocity, sampler=heun, noise=z)
    fresh = FlowMatchHeunSampler(None, 4, shift=3.0)
    assert torch.equal(a, fastdiff.sample(_velocity, sampler=fresh, noise=z))


@pytest.mark.parametrize("opts,err,match", [
    ({"use_dynamic_shifting": True, "mu": 800.0}, ValueError, "mu"),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear", "mu": 800.0}, None, None),
    ({"use_dynamic_shifting": True, "image_seq_len": 1024, "base_shift": None}, TypeError,
     "base_shift"),
    ({"use_dynamic_shifting": True, "image_seq_len": 1024, "max_shift": "1.15"}, TypeError,
     "max_shift"),
    ({"use_dynamic_shifting": True, "image_seq_len": 1024, "base_image_seq_len": 256.0},
     TypeError, "base_image_seq_len"),
    ({"sigmas": "ab"}, TypeError, "sigmas"),
    ({"sigmas": [1.0, None, 0.5, 0.2]}, ValueError, "sigmas"),  # None: NaN in numpy
])  # fmt: skip
def test_flow_bad_options_are_named(opts, err, match):
    if err is None:  # mu / (mu + 1/s - 1): large mu is a valid (all ~1) grid, as diffusers'
        FlowMatchEulerSampler(None, 4, **opts)
        return
    with pytest.raises(err, match=match):
        FlowMatchEulerSampler(None, 4, **opts)


def test_flow_euler_config_routed_to_flow_heun_is_diffusers_from_config():
    """A FlowMatchEulerDiscreteScheduler config routed to 'flow_heun' keeps only what
    FlowMatchHeunDiscreteScheduler.from_config keeps (num_train_timesteps, shift): diffusers'
    own behaviour for another class's config; its Euler-only keys are dropped, not applied."""
    cfg = {**FLUX_DEV, "use_karras_sigmas": True, "stochastic_sampling": True}
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = fastdiff.sample(_velocity, 3, sampler="flow_heun", schedule=cfg, noise=z)
    theirs = FlowMatchHeunDiscreteScheduler.from_config(cfg)
    assert theirs.config.shift == 3.0
    theirs.set_timesteps(3)
    assert _rel(out, _flow_loop(theirs, z)) <= RTOL
    assert not math.isnan(out.sum().item())


@pytest.mark.parametrize("make", [
    lambda: LCMSampler(NoiseSchedule("scaled_linear"), 4),
    lambda: TCDSampler(NoiseSchedule("scaled_linear"), 4, eta=0.5),
    lambda: FlowMatchEulerSampler(None, 4, stochastic_sampling=True),
])  # fmt: skip
def test_integer_sample_is_a_type_error_naming_x(make):
    """An int x on a step that draws noise: torch's randn has no int kernel and raised
    NotImplementedError ('normal_kernel_cpu' not implemented for 'Long') before any check."""
    smp = make()
    x = torch.ones(ODD, dtype=torch.int64)
    with pytest.raises(TypeError, match="x: expected a float tensor"):
        smp.step(torch.randn(ODD), 0, x, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("steps,orig", [(9, 8), (8, 8), (51, 50), (2, 1)])
def test_tcd_all_grid_refuses_more_steps_than_original_as_diffusers(steps, orig):
    """set_timesteps(steps, original_inference_steps=n) draws from every training timestep,
    so only its steps > n check stops steps = n + 1 (the distillation grid's length check
    catches it first there)."""
    theirs = diffusers.TCDScheduler()
    sch = NoiseSchedule.from_diffusers(theirs)
    kw = dict(original_inference_steps=orig, origin_grid="all")
    if steps > orig:
        with pytest.raises(ValueError):
            theirs.set_timesteps(steps, original_inference_steps=orig)
        with pytest.raises(ValueError, match="original_inference_steps"):
            TCDSampler(sch, steps, **kw)
        return
    theirs.set_timesteps(steps, original_inference_steps=orig)
    assert TCDSampler(sch, steps, **kw).timesteps.tolist() == theirs.timesteps.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("steps", [2, 6])
def test_flow_heun_half_precision_calls_flash_attention_rule(dtype, steps):
    """fp16 / bf16 x and velocities, call by call: the Euler stage x + h v1 and the correction
    x + h (v1 + v2) / 2 (float64 restatements) within 2x diffusers' own error in that dtype
    (no floor: the correction adds the kept x_i last, 1.00x measured); the result in x's dtype,
    as diffusers' (the model output's) dtype."""
    theirs = FlowMatchHeunDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(steps)
    smp = FlowMatchHeunSampler(None, steps, shift=3.0)
    g = torch.Generator().manual_seed(steps)
    for k in range(0, smp.steps - 1, 2):
        s, s_next = smp.sigmas[k // 2], smp.sigmas[k // 2 + 1]
        x, v1, v2 = (torch.randn(ODD, generator=g).mul(3).to(dtype) for _ in range(3))
        their1 = theirs.step(v1, theirs.timesteps[k], x).prev_sample
        ours1 = smp.step(v1, k, x)
        their2 = theirs.step(v2, theirs.timesteps[k + 1], their1).prev_sample
        ours2 = smp.step(v2, k + 1, their1)
        h = s_next - s
        x64, w1, w2 = x.double(), v1.double(), v2.double()
        for ours, ref_d, ref in ((ours1, their1, x64 + h * w1),
                                 (ours2, their2, x64 + h / 2 * (w1 + w2))):  # fmt: skip
            assert ours.dtype == ref_d.dtype == dtype
            err, err_d = (ours.double() - ref).abs().max(), (ref_d.double() - ref).abs().max()
            assert err_d > 0 and err <= 2 * err_d, (k, err.item(), err_d.item())


def test_flow_heun_refused_correction_leaves_the_run_alone():
    """A correction refused for its model output (float64, wrong shape, int) writes nothing
    and keeps the Euler stage's input: the next valid correction is the uninterrupted one."""
    g = torch.Generator().manual_seed(6)
    x, v1, v2 = (torch.randn(ODD, generator=g) for _ in range(3))
    ref = FlowMatchHeunSampler(None, 3, shift=3.0)
    expect = ref.step(v2, 1, ref.step(v1, 0, x))
    smp = FlowMatchHeunSampler(None, 3, shift=3.0)
    x1 = smp.step(v1, 0, x)
    before = x1.clone()
    for bad in (v2.double(), v2[:1], v2.int()):
        with pytest.raises((TypeError, ValueError), match="model_output"):
            smp.step(bad, 1, x1)
    assert torch.equal(x1, before)
    assert torch.equal(smp.step(v2, 1, x1), expect)
