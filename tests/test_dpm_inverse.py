"""DPM-Solver++ inversion: ``DPMSolverPPInverseSampler`` ("dpm++_inverse") and
``fastdiff.invert(sampler="dpm++_inverse")``.

* grids: timesteps and float32 sigmas equal diffusers' ``DPMSolverMultistepInverseScheduler``'s
  (spacings, steps_offset, lambda_min_clipped, Karras / exponential / beta grids);
* whole runs over its config variants (orders 1 - 3, midpoint / heun, prediction types,
  thresholding, euler_at_final, lower_order_final off, guidance): relative error (max |ours -
  ref| / max |ref|) within 2x diffusers' own fp32 error (+ 1 fp32 ulp) against a float64
  restatement of diffusers' step on its own sigmas, and against the stock fp32 scheduler <= 1e-5
  + its own fp32 error; every step fed diffusers' own sample and model output, against diffusers'
  step in float64 (float64 sigmas and history: a float64 step on its float32 ``sigmas`` computes
  its coefficients in fp32 and shares their rounding, which the first step from sigma/alpha 0.01
  multiplies by ~100); the first step's eps form (the x0 term as (c_x + c_x0 / a) x - (c_x0 s /
  a) eps) within a few ulp where the x0 form loses ~30;
* the identity last step (trailing / sigma grids: h = 0) where diffusers' heun / 3M give NaN;
* exactness: a Gaussian's probability-flow ODE (x_T in closed form) converges at second order;
  invert -> sample("dpm++") round trips with errors falling with the steps;
* every CPU backend of dpm_solver_2m_step (fp32 run; fp16 / bf16 FlashAttention rule per step),
  the fake CUDA-graph loop, no host sync, registration, refusals.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from _dpm_step_ref import dtypes, reference
from helpers import assert_fa_rule, assert_no_host_sync, backend_cases, case_id
from test_cuda_emu import emu, emu_module  # noqa: F401  (fixtures: the emulated CUDA kernels)
from test_inversion import _guided, _image, _model, _rel, _their_loop  # the DDIM inversion's

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff._sampler_setup import infer_sampler, resolve_sampler
from fastdiff.samplers import SAMPLERS, DPMSolverPPInverseSampler, DPMSolverPPSampler, make_sampler

diffusers = pytest.importorskip("diffusers")
Inverse = diffusers.DPMSolverMultistepInverseScheduler

SHAPE = (2, 3, 5, 7)  # odd sizes
RTOL = 1e-5
LABELS = torch.tensor([0.0, 0.0, 1.0, -1.0])  # [uncond, cond] for a batch of 2
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
COSINE = dict(beta_schedule="squaredcos_cap_v2")


def _ref_loop(sched, steps, x, gs=None, labels=None):
    """diffusers' inverse step restated in float64 on its own (float32) sigmas: the orders it
    picks (lower_order_nums, lower_order_final, lower_order_second), the data prediction, the
    first / second / third-order dpmsolver++ updates."""
    cfg = sched.config
    sched.set_timesteps(steps)
    sig = sched.sigmas.double().tolist()
    ts = sched.timesteps
    n = len(ts)
    few = cfg.lower_order_final and n < 15
    x = x.double()

    def lam(r):
        a = 1.0 / math.sqrt(r * r + 1.0)
        return a, r * a, math.log(a) - math.log(r * a)

    ms: list[torch.Tensor] = []
    for i, t in enumerate(ts):
        out = _guided(x, t, gs, labels).double()
        a_s, s_s, l_s = lam(sig[i])
        if cfg.prediction_type == "epsilon":
            m = (x - s_s * out) / a_s
        elif cfg.prediction_type == "v_prediction":
            m = a_s * x - s_s * out
        else:
            m = out
        if cfg.thresholding:
            m = sched._threshold_sample(m)
        ms = [m, *ms][:3]
        a_t, s_t, l_t = lam(sig[i + 1])
        h = l_t - l_s
        order = min(cfg.solver_order, i + 1)
        if i == n - 1 and (cfg.euler_at_final or few):
            order = 1
        elif i == n - 2 and few:
            order = min(order, 2)
        em1 = math.expm1(-h)
        x_new = (s_t / s_s) * x - a_t * em1 * m
        if order >= 2 and h == 0.0:  # the repeated last level: D1 = 0 / 0 * (m0 - m1) = 0
            midpoint = order == 2 and cfg.solver_type == "midpoint"
            x_new = x if midpoint else x * math.nan  # heun, 3M: (e^{-h} - 1) / h = 0 / 0
        elif order >= 2:
            h0 = l_s - lam(sig[i - 1])[2]
            r0 = h0 / h
            d1 = (m - ms[1]) / r0
            if order == 3:
                r1 = (lam(sig[i - 1])[2] - lam(sig[i - 2])[2]) / h
                d1_1 = (ms[1] - ms[2]) / r1
                d2 = (d1 - d1_1) / (r0 + r1)
                d1 = d1 + r0 * d2
                x_new = x_new - a_t * ((em1 + h) / h**2 - 0.5) * d2
            if order == 2 and cfg.solver_type == "midpoint":
                x_new = x_new - 0.5 * a_t * em1 * d1
            else:
                x_new = x_new + a_t * (em1 / h + 1.0) * d1
        x = x_new
    return x


def _ours(sched, steps, x, gs=None, **kw):
    if gs is None:
        return fastdiff.invert(_model, x, steps, sampler="dpm++_inverse", schedule=sched, **kw)
    return fastdiff.invert(_model, x, steps, sampler="dpm++_inverse", schedule=sched,
                           cond=LABELS[2:], uncond=LABELS[:2], guidance_scale=gs, **kw)  # fmt: skip


CONFIGS = {
    "default": {},
    "order1": dict(solver_order=1),
    "order3": dict(solver_order=3),
    "heun": dict(solver_type="heun"),
    "order3_sd_no_lof": dict(solver_order=3, lower_order_final=False, **SD),
    "leading_offset": dict(timestep_spacing="leading", steps_offset=1, **SD),
    "trailing_v": dict(timestep_spacing="trailing", prediction_type="v_prediction"),
    "karras": dict(use_karras_sigmas=True, **SD),
    "exponential_heun": dict(use_exponential_sigmas=True, solver_type="heun"),
    "beta_order3": dict(use_beta_sigmas=True, solver_order=3),
    "sample_threshold": dict(prediction_type="sample", thresholding=True, sample_max_value=1.2),
    "cosine_clipped": dict(lambda_min_clipped=-5.1, **COSINE),
    "euler_at_final": dict(euler_at_final=True, solver_order=3),
}


def _built(sched, steps: int) -> DPMSolverPPInverseSampler:
    """The sampler ``sample`` / ``invert`` build from the scheduler passed as ``schedule``."""
    smp = resolve_sampler(None, "dpm++_inverse", steps, sched, None, None, {})
    assert type(smp) is DPMSolverPPInverseSampler
    return smp


# ------------------------------------------------------------------------ the grid
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 25, 50, 100])
def test_timesteps_and_sigmas_are_diffusers(name, steps):
    sched = Inverse(**CONFIGS[name])
    sched.set_timesteps(steps)
    smp = _built(sched, steps)
    if len(sched.timesteps) != steps:  # diffusers dropped repeated timesteps (not its sigmas)
        assert len(set(smp.timesteps.tolist())) < steps
        return
    assert smp.timesteps.tolist() == sched.timesteps.tolist()
    assert smp._ratios() == sched.sigmas.double().tolist()
    assert steps == 1 or (smp.timesteps.diff() >= 0).all()  # ascending: x_0 -> x_T


# ------------------------------------------------------------------------ whole runs
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 5, 12, 25])
@pytest.mark.parametrize("gs", [None, 3.0], ids=["plain", "cfg"])
@torch.no_grad()
def test_whole_run_matches_diffusers(name, steps, gs):
    sched = Inverse(**CONFIGS[name])
    sched.set_timesteps(steps)
    if len(sched.timesteps) != steps:
        pytest.skip("diffusers drops repeated timesteps (test_timesteps_and_sigmas_are_diffusers)")
    x = _image(steps)
    exact = _ref_loop(sched, steps, x, gs, LABELS)
    theirs = _their_loop(sched, steps, x, gs, LABELS)
    if not torch.isfinite(exact).all():  # heun / 3M over trailing's or a grid's h = 0 last step
        pytest.skip("diffusers' step is NaN here (test_identity_last_step)")
    ours = _ours(sched, steps, x, gs)
    err, their_err = _rel(ours, exact), _rel(theirs, exact)
    print(f"{name} {steps} {gs}: ours {err:.1e} diffusers {their_err:.1e}")
    # the FlashAttention rule with a 1-ulp floor (measured <= 1.8x: sample_threshold at 25 steps
    # with guidance, x0 form; the eps / v configs' worst 1.2x)
    assert err <= 2 * their_err + 2.0**-23
    assert _rel(ours, theirs) <= RTOL + their_err


@pytest.mark.parametrize("name", ["default", "order3", "heun", "karras", "leading_offset"])
@torch.no_grad()
def test_every_step_fed_diffusers_sample(name):
    """Each step from diffusers' own x_i and model output (our history from those calls) gives
    diffusers' x_{i+1}: relative to its size, within 1e-5 + diffusers' own fp32 error of the
    step, and within 2x that error + 1 ulp of the float64 step from the same inputs (diffusers'
    step on float64 sigmas, its history the float64 x0 of the same calls)."""
    steps = 12
    sched, exact64 = Inverse(**CONFIGS[name]), Inverse(**CONFIGS[name])
    sched.set_timesteps(steps)
    exact64.set_timesteps(steps)
    exact64.sigmas = exact64.sigmas.double()  # else its coefficients are fp32 products
    smp = _built(sched, steps)
    x = _image(7)
    for i, t in enumerate(sched.timesteps):
        out = _guided(x, t, 2.0, LABELS)
        got = smp.step(out, i, x)
        want = sched.step(out, t, x).prev_sample
        exact = exact64.step(out.double(), t, x.double()).prev_sample
        own = _rel(want, exact)
        assert _rel(got, want) <= RTOL + own, (name, i)
        assert _rel(got, exact) <= 2 * own + 2.0**-23, (name, i, _rel(got, exact), own)
        x = want


@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@torch.no_grad()
def test_first_step_eps_form_has_no_cancellation(case, pred, monkeypatch):
    """The first step from t = 0 (sigma/alpha 0.01 on linear betas) multiplies x by sigma_t /
    sigma_s = 344 (2 steps) in the x0 form c_x x + c_x0 x0 and cancels it: the rows carry the
    x0 term as (c_x + c_x0 / a) x - (c_x0 s / a) eps, here DDIM's first-order step. fp32 on each
    backend within 4 ulp of the result's size of the float64 step (measured <= 0.9); the x0-form
    rows (the forward sampler's) lose 28 - 41 ulp here, diffusers' fp32 step 93 / 133."""
    dev, backend = case
    g = torch.Generator().manual_seed(11)
    x, out = torch.rand(SHAPE, generator=g) * 2.6 - 1.3, torch.randn(SHAPE, generator=g)
    exact64 = Inverse(prediction_type=pred)
    exact64.set_timesteps(2)
    exact64.sigmas = exact64.sigmas.double()
    t = exact64.timesteps[0]
    exact = exact64.step(out.double(), t, x.double()).prev_sample

    def first_step_ulps():
        smp = make_sampler("dpm++_inverse", NoiseSchedule("linear"), 2, prediction_type=pred)
        with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
            got = smp.step(out.to(dev), 0, x.to(dev)).cpu()
        return _rel(got, exact) / 2.0**-23

    assert first_step_ulps() <= 4.0
    monkeypatch.setattr(DPMSolverPPInverseSampler, "coefficients", DPMSolverPPSampler.coefficients)
    assert first_step_ulps() > 20.0


@pytest.mark.parametrize("kw", [dict(timestep_spacing="trailing", solver_type="heun"),
                                dict(use_karras_sigmas=True, solver_order=3)], ids=str)  # fmt: skip
@torch.no_grad()
def test_identity_last_step(kw):
    """Trailing's last timestep is already noisiest and a sigma grid repeats its top level: the
    last step has h = 0. diffusers' heun / 3M give NaN there (0 / 0); ours leaves x unchanged,
    as the first-order step (euler_at_final) and diffusers' midpoint form do."""
    steps, x = 20, _image(3)
    sched = Inverse(**kw)
    assert torch.isnan(_their_loop(sched, steps, x)).all()
    ours = _ours(sched, steps, x)
    assert torch.isfinite(ours).all()
    euler = Inverse(**kw, euler_at_final=True)
    assert _rel(ours, _ref_loop(euler, steps, x)) <= RTOL
    _, traj = _ours(sched, steps, x, return_trajectory=True)
    assert torch.equal(traj["x"][-1], traj["x"][-2])  # the last step: x unchanged


# ------------------------------------------------------------------------ exactness
def _gaussian_eps(sch: NoiseSchedule, mu: torch.Tensor, tau: float):
    """Exact eps of data N(mu, tau^2 I): s (x - a mu) / (a^2 tau^2 + s^2)."""
    ab_all = sch.alphas_cumprod

    def eps(x, t):
        ab = ab_all[t].view(-1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        return (s * (x.double() - a * mu) / (a * a * tau**2 + s * s)).to(x.dtype)

    return eps


MU, TAU = torch.tensor([0.3, -0.4], dtype=torch.float64), 0.5
STEPS = (10, 20, 50, 100)


def _gaussian_points(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (MU + TAU * torch.randn(500, 2, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("order", [1, 2, 3])
@torch.no_grad()
def test_converges_to_the_probability_flow_ode_of_a_gaussian(schedule, order):
    """Data N(mu, tau^2 I): the probability-flow ODE keeps z = (x - a mu) / sqrt(a^2 tau^2 +
    s^2) constant, so x_T at noisiest (999; cosine with lambda_min_clipped -5.1: 995) is known
    in closed form from the image (taken as x at t = 0). Max errors measured at 10, 20, 50, 100
    steps (linspace): linear order 1: 9.3e-1, 4.9e-1, 2.0e-1, 1.0e-1; order 2: 7.0e-1,
    2.8e-1, 7.4e-2, 2.5e-2; order 3: 7.1e-1, 2.8e-1, 6.6e-2, 2.0e-2; cosine order 1: 5.3e-1,
    2.7e-1, 1.1e-1, 5.6e-2; order 2: 2.8e-1, 9.1e-2, 2.3e-2, 7.9e-3; order 3: 2.8e-1,
    9.7e-2, 2.1e-2, 6.3e-3 (orders 2 - 3 fall ~ as 1 / steps^1.5 - 2 on linspace grids, whose
    first steps are long in lambda)."""
    sch = NoiseSchedule(schedule)
    kw = dict(solver_order=order)
    if schedule == "cosine":
        kw["lambda_min_clipped"] = -5.1
    x0, model = _gaussian_points(), _gaussian_eps(sch, MU, TAU)
    errs = []
    for steps in STEPS:
        smp = make_sampler("dpm++_inverse", sch, steps, **kw)
        xT = fastdiff.invert(model, x0, sampler=smp)
        ab = sch.alphas_cumprod[smp._noisiest()]
        exact = ab.sqrt() * MU + (ab * TAU**2 + 1 - ab).sqrt() * (x0.double() - MU) / TAU
        errs.append((xT.double() - exact).abs().max().item())
    print("gaussian dpm++ inversion max errors", schedule, order, [f"{e:.1e}" for e in errs])
    assert all(b < 0.7 * a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[0] / errs[-1] > (8 if order == 1 else 25), errs
    assert errs[-1] < (0.12 if order == 1 else 0.03), errs


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("order", [2, 3])
@torch.no_grad()
def test_round_trip_reconstructs_the_image(schedule, order):
    """invert("dpm++_inverse") -> sample("dpm++") with the same settings gives x_0 back, the
    error falling with the steps. Measured RMS at 10, 20, 50, 100 steps: linear order 2:
    1.7e-1, 5.9e-2, 1.0e-2, 3.0e-3; order 3: 1.7e-1, 5.7e-2, 1.5e-2, 5.2e-3; cosine (with
    lambda_min_clipped -5.1) order 2: 6.1e-2, 1.4e-2, 2.6e-3, 9.8e-4; order 3: 5.7e-2, 2.1e-2,
    5.1e-3, 1.7e-3 (DDIM's round trip at 100 steps: 1.7e-2, tests/test_inversion.py)."""
    sch = NoiseSchedule(schedule)
    kw = dict(schedule=sch, solver_order=order)
    if schedule == "cosine":
        kw["lambda_min_clipped"] = -5.1
    x0, model = _gaussian_points(2), _gaussian_eps(sch, MU, TAU)
    rms = []
    for steps in STEPS:
        xT = fastdiff.invert(model, x0, steps, sampler="dpm++_inverse", **kw)
        assert 0.5 < xT.std().item() < 1.5  # noise-like, not the image
        back = fastdiff.sample(model, steps, sampler="dpm++", noise=xT, **kw)
        rms.append((back - x0).pow(2).mean().sqrt().item())
    print("dpm++ round-trip RMS", schedule, order, [f"{e:.1e}" for e in rms])
    assert all(b < 0.6 * a for a, b in zip(rms, rms[1:], strict=False)), rms
    assert rms[0] / rms[-1] > 25 and rms[-1] < 6e-3, rms


# ------------------------------------------------------------------------ backends, dtypes
@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
@torch.no_grad()
def test_every_backend_gives_the_same_inversion(case):
    """A guided order-3 run through fastdiff.invert on each backend (the second history operand
    read): fp32 within 1e-6 of the float64 restatement (measured 2.7e-7), also channels_last
    (kept)."""
    dev, backend = case
    sched = Inverse(solver_order=3, prediction_type="v_prediction", **SD)
    x = _image(5)
    exact = _ref_loop(sched, 8, x, 2.0, LABELS)
    for cl in (False, True):
        xi = x.to(dev)
        if cl:
            xi = xi.contiguous(memory_format=torch.channels_last)
        with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
            got = fastdiff.invert(_model, xi, 8, schedule=sched, cond=LABELS[2:].to(dev),
                                  uncond=LABELS[:2].to(dev), guidance_scale=2.0)  # fmt: skip
        fmt = torch.channels_last if cl else torch.contiguous_format
        assert got.is_contiguous(memory_format=fmt) and torch.isfinite(got).all()
        assert _rel(got.cpu(), exact) <= 1e-6, (backend, cl)


@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
@torch.no_grad()
def test_every_backend_step_fa_rule(case):
    """Each step of a 10-step order-3 run (orders 1, 2, 3, 3, ..., 1; the first multiplies x by
    ~100) in fp16 / bf16 with inputs from the fp32 run plus fresh non-smooth model outputs:
    error vs the float64 op math <= 2x the eager same-dtype restatement's + one ulp; NaN /
    inf masks equal."""
    dev, backend = case
    smp = make_sampler("dpm++_inverse", NoiseSchedule("scaled_linear"), 10, solver_order=3)
    g = torch.Generator().manual_seed(4)
    for dtype in dtypes(case):
        x, hist = _image(8), []
        ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        for i, t in enumerate(smp.timesteps):
            mo = _guided(torch.cat([x, x]), t, None, None) + 0.01 * torch.randn(
                (4, *SHAPE[1:]), generator=g)  # fmt: skip
            need = int(smp.coef64[i, 4] != 0) + int(smp.coef64[i, 6] != 0)  # history read
            p1, p2 = (hist + [None, None])[:2] if need else (None, None)
            p2 = p2 if need == 2 else None
            args = (x, mo, p1, p2, None, "epsilon")
            ref, _ = reference(*[a.double() if torch.is_tensor(a) else a for a in args],
                               torch.float64, g=2.0, row=smp.coef64[i])  # fmt: skip
            half = [a.to(dtype) if torch.is_tensor(a) else a for a in args]
            eager, _ = reference(*half, dtype, g=2.0, row=smp.coef64[i])
            with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
                got, m = smp.step(mo.to(dev, dtype), i, x.to(dev, dtype), guidance_scale=2.0,
                                  x0_prev=None if p1 is None else p1.to(dev, dtype),
                                  x0_prev2=None if p2 is None else p2.to(dev, dtype),
                                  return_x0=True)  # fmt: skip
            assert got.dtype == dtype
            assert_fa_rule(got.cpu(), ref, eager, k=2.0, atol=ulp * ref.abs().max().item(),
                           name=f"{backend} {dtype} step {i}")  # fmt: skip
            _, m32 = reference(x, mo, None, None, None, "epsilon", torch.float32, g=2.0,
                               row=smp.coef64[i])  # fmt: skip
            hist = [m32, *hist][:2]
            x = ref.float()


@torch.no_grad()
def test_cuda_graph_loop_equals_eager(fake_cuda_graphs, monkeypatch):
    """sample(cuda_graph=True)'s loop on CPU with a fake graph: order 3 (both history buffers
    static), the eager loop's result and trajectory, one capture for two images."""
    from fastdiff import api

    eager_loop = api._sample_eager
    sched = Inverse(solver_order=3, **SD)

    def run(graphed, seed):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        return _ours(sched, 9, _image(seed), 2.0, return_trajectory=True)

    for seed in (1, 2):
        eager, etraj = run(False, seed)
        out, traj = run(True, seed)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        for k in ("x", "x0"):
            torch.testing.assert_close(traj[k], etraj[k], rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 1


@torch.no_grad()
def test_no_host_sync_in_the_loop():
    assert_no_host_sync(
        lambda m: fastdiff.invert(m, _image(9), 7, sampler="dpm++_inverse", solver_order=3),
        _model,
    )


@pytest.mark.usefixtures("emu")
@torch.no_grad()
def test_emulated_cuda_kernel_matches_diffusers():
    """csrc/cuda's dpm_solver_2m_step kernel through its real entry point, on tests/cuda_emu."""
    sched = Inverse(solver_order=3, solver_type="heun", **SD)
    x = _image(4)
    exact = _ref_loop(sched, 6, x, 2.0, LABELS)
    with fastdiff.use_backend("cuda", op="dpm_solver_2m_step"):
        got = _ours(sched, 6, x, 2.0)
    assert _rel(got, exact) <= RTOL


# ------------------------------------------------------------------------ API
@torch.no_grad()
def test_registered_inferred_and_scheduler_settings_applied():
    assert SAMPLERS["dpm++_inverse"] is DPMSolverPPInverseSampler
    assert DPMSolverPPInverseSampler.inverts and DPMSolverPPInverseSampler.is_multistep
    sched = Inverse(solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction", **SD)
    assert infer_sampler(sched) == "dpm++_inverse"
    assert infer_sampler({**sched.config, "_class_name": type(sched).__name__}) == "dpm++_inverse"
    x = _image(12)
    exact = _ref_loop(sched, 9, x)
    # invert() picks the sampler from the scheduler; sample() too (noise = the image)
    assert _rel(fastdiff.invert(_model, x, 9, schedule=sched), exact) <= RTOL
    assert _rel(fastdiff.sample(_model, 9, schedule=sched, noise=x), exact) <= RTOL
    saved = json.loads(sched.to_json_string())  # a saved config, _class_name included
    assert _rel(fastdiff.invert(_model, x, 9, schedule=saved), exact) <= RTOL
    # a Sampler object carries its own settings
    smp = _built(sched, 9)
    assert smp.solver_order == 3 and smp.sigma_grid == "karras"
    assert _rel(fastdiff.invert(_model, x, sampler=smp), exact) <= RTOL
    # DiffEdit: DPMSolverMultistepInverseScheduler.from_config(pipe.scheduler.config)
    fwd = diffusers.DPMSolverMultistepScheduler(
        solver_order=3, final_sigmas_type="zero", timestep_spacing="leading", steps_offset=1, **SD
    )
    want = _ref_loop(Inverse.from_config(fwd.config), 9, x)
    got = fastdiff.invert(_model, x, 9, sampler="dpm++_inverse", schedule=fwd)
    assert _rel(got, want) <= RTOL
    # other schedulers keep DDIM inversion as invert()'s default
    ddim = fastdiff.invert(_model, x, 9, schedule=diffusers.DDIMInverseScheduler())
    assert _rel(ddim, fastdiff.invert(_model, x, 9, sampler="ddim_inverse")) == 0.0


@torch.no_grad()
def test_image_untouched_trajectory_ascends():
    x = _image(13)
    keep = x.clone()
    out, traj = fastdiff.invert(_model, x, 6, sampler="dpm++_inverse", return_trajectory=True)
    assert torch.equal(x, keep)
    assert torch.equal(traj["x"][0], x) and torch.equal(traj["x"][-1], out)
    assert (traj["timesteps"].diff() > 0).all() and traj["timesteps"][0] == 0
    again = fastdiff.invert(_model, x, 6, sampler="dpm++_inverse")
    assert torch.equal(out, again)  # deterministic, history reset between runs


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(algorithm_type="sde-dpmsolver++"), ValueError, r"algorithm_type: .*NaN"),
        (dict(algorithm_type="dpmsolver"), ValueError, r"algorithm_type: .*'dpmsolver'"),
        (dict(clip_sample=True), TypeError, r"unknown option.*clip_sample"),
        (dict(use_lu_lambdas=True), TypeError, r"unknown option.*use_lu_lambdas"),
        (dict(final_sigmas_type="zero"), TypeError, r"unknown option.*final_sigmas_type"),
        (dict(solver_order=4), ValueError, r"solver_order"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), ValueError, r"at most one"),
        (
            dict(timestep_spacing="trailing", lambda_min_clipped=-3.0),
            ValueError,
            r"lambda_min_clipped: .*trailing",
        ),
        (dict(steps=1000), ValueError, r"repeat timesteps"),
        (dict(prediction_type="flow_prediction"), ValueError, r"use_flow_sigmas"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_options_name_themselves(kwargs, exc, match):
    kw = {"steps": 10, **kwargs}
    with pytest.raises(exc, match=match):
        fastdiff.invert(_model, _image(), sampler="dpm++_inverse", **kw)


FLOW_CFGS = [
    dict(use_flow_sigmas=True, prediction_type="flow_prediction"),
    dict(use_flow_sigmas=True),
]


@pytest.mark.parametrize("cfg", FLOW_CFGS, ids=["flow_pred", "flow_sigmas"])
def test_flow_grid_scheduler_is_refused(cfg):
    """diffusers' inverse scheduler builds its flow grid descending (it samples, not inverts)."""
    with pytest.raises(ValueError, match=r"schedule: .*use_flow_sigmas=True"):
        fastdiff.invert(_model, _image(), 5, schedule=Inverse(**cfg))


def test_leftover_sigma_bounds_are_refused():
    cfg = {**Inverse(use_karras_sigmas=True).config, "sigma_min": 0.1,
           "_class_name": "DPMSolverMultistepInverseScheduler"}  # fmt: skip
    with pytest.raises(ValueError, match=r"schedule: .*sigma_min=0.1"):
        fastdiff.invert(_model, _image(), 5, schedule=cfg)


def test_img2img_and_inpainting_are_refused():
    x = _image(14)
    with pytest.raises(ValueError, match=r"image: DPMSolverPPInverseSampler runs x_0 -> x_T"):
        fastdiff.sample(_model, 5, sampler="dpm++_inverse", image=x, noise=x)
    with pytest.raises(ValueError, match=r"mask: DPMSolverPPInverseSampler runs x_0 -> x_T"):
        fastdiff.sample(_model, 5, sampler="dpm++_inverse", image=x, noise=x,
                        mask=torch.ones_like(x[:, :1]))  # fmt: skip
    with pytest.raises(ValueError, match=r"noise: DPMSolverPPInverseSampler runs the ODE"):
        fastdiff.sample(_model, 5, sampler="dpm++_inverse", shape=SHAPE[1:], batch_size=2)


@torch.no_grad()
def test_diffusers_unet_with_learned_variance():
    """A diffusers UNet2DModel with 2C output channels under variance_type="learned_range":
    the first C channels are eps (diffusers' ``model_output[:, :3]``); against the float64 loop
    (network included) within 2x diffusers' own fp32 error + 1e-5."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=6,
                                 layers_per_block=1, block_out_channels=(8, 16),
                                 norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()  # fmt: skip
    sched = Inverse(variance_type="learned_range", solver_order=3)
    x = _image(15, (2, 3, 8, 8))

    def loop(net, x):
        sched.set_timesteps(6)
        if x.dtype == torch.float64:  # float64 coefficients too (its sigmas are float32)
            sched.sigmas = sched.sigmas.double()
        for t in sched.timesteps:
            x = sched.step(net(x, t).sample, t, x).prev_sample
        return x

    theirs = loop(unet, x)
    exact = loop(copy.deepcopy(unet).double(), x.double())  # float64 network and steps
    ours = fastdiff.invert(unet, x, 6, schedule=sched)
    print(f"ours {_rel(ours, exact):.1e} diffusers {_rel(theirs, exact):.1e}")
    # measured 3.5e-6 vs diffusers' 1.8e-5 (the first step's x1 = 50.4 x - 49.5 x0 cancels in
    # diffusers' fp32 step; fastdiff's eps-form row has no large terms). Against a float64 loop
    # on the float32 sigmas (fp32 coefficients, diffusers' rounding shared) it read as 2.6x
    assert _rel(ours, exact) <= 2 * _rel(theirs, exact)
