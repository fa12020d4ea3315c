"""Review 15c: the session-14 samplers (deis, dpm++_single, edm_euler, edm_dpm++) and the custom
grids (``timesteps=`` / ``sigmas=``) against diffusers 0.42, at the edges the per-sampler test
files leave out, plus the tests that kill the surviving mutants of the review's mutation round.

Every comparison gives both sides the same sample and model output (or the same x_T and noise)
and asks for a relative error (max |ours - theirs| / max |theirs|) <= 1e-5, or, in fp16 / bf16,
the FlashAttention rule against a float64 restatement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _sampler_cases import rel as _rel

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


@pytest.mark.parametrize("name", [*SCHEDULERS, "lcm"])
@pytest.mark.parametrize("ts", [[500, -1], [999, 500, -20], [1000, 10]], ids=str)
def test_custom_timesteps_outside_the_training_range_are_refused(name, ts):
    """A timestep below 0 or at T: diffusers (except DDPM at T) runs it, indexing alpha_bar from
    the end (t = -1 steps at the noise level of t = 999); fastdiff refuses it."""
    sch = NoiseSchedule.from_diffusers(SL)
    with pytest.raises(ValueError, match=r"timesteps: expected values in \[0, 999\]"):
        make_sampler(name, sch, None, timesteps=ts)


@pytest.mark.parametrize(
    "sigmas",
    [[14.6, 5.0, 5.0, 0.0], [14.6, 5.0, 6.0, 0.0], [14.6, 5.0, 1.0, 1.0], [5.0, float("nan"), 0.0]],
    ids=str,
)
def test_euler_custom_sigmas_must_strictly_descend(sigmas):
    """A repeated or rising custom sigma is refused (diffusers steps through it: a zero-length
    or backward Euler step), naming the argument; nothing is built."""
    sch = NoiseSchedule.from_diffusers(SL)
    with pytest.raises(ValueError, match="sigmas: expected (strictly descending|finite)"):
        make_sampler("euler", sch, None, sigmas=sigmas)


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


# ---------------------------------------------------------------------- order schedules
def _spy_orders(theirs) -> list[int]:
    """The update diffusers' DEIS runs at each step, recorded as its order."""
    seen: list[int] = []
    for order, attr in ((1, "deis_first_order_update"), (2, "multistep_deis_second_order_update"),
                        (3, "multistep_deis_third_order_update")):  # fmt: skip
        fn = getattr(theirs, attr)

        def wrapped(*a, _fn=fn, _order=order, **k):
            seen.append(_order)
            return _fn(*a, **k)

        setattr(theirs, attr, wrapped)
    return seen


@pytest.mark.parametrize("steps", [13, 14, 15, 16])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("lof", [True, False])
def test_deis_step_orders_are_diffusers_around_15_steps(steps, order, lof):
    """diffusers lowers DEIS's last two orders only below 15 steps (``len(timesteps) < 15``):
    the orders our rows are built with equal the updates diffusers runs, step for step."""
    theirs = diffusers.DEISMultistepScheduler(**SL, solver_order=order, lower_order_final=lof)
    theirs.set_timesteps(steps)
    seen = _spy_orders(theirs)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in theirs.timesteps:
        x = theirs.step(_toy(x, t), t, x).prev_sample
    ours = make_sampler("deis", NoiseSchedule.from_diffusers(SL), steps, solver_order=order,
                        lower_order_final=lof)  # fmt: skip
    assert list(ours.step_orders) == seen


# ---------------------------------------------------------------------- EDM churn window
def _diffusers_churns(kw: dict, steps: int, i: int) -> bool:
    """Whether EDMEulerScheduler.step(**kw) at step ``i`` adds churn noise (its result then
    depends on the generator's seed)."""
    outs = []
    for seed in (0, 1):
        theirs = diffusers.EDMEulerScheduler()
        theirs.set_timesteps(steps)
        theirs.set_begin_index(i)
        x = torch.ones(1, 3, 4, 4)
        gen = torch.Generator().manual_seed(seed)
        outs.append(theirs.step(0.3 * x, theirs.timesteps[i], x, generator=gen, **kw).prev_sample)
    return not torch.equal(*outs)


def test_edm_euler_churn_window_compares_in_float32_as_diffusers():
    """diffusers tests s_tmin <= sigma <= s_tmax on its float32 sigma tensor, so the bounds are
    rounded to float32: a bound equal to a grid sigma, or a float64 a hair beside one that
    rounds to it, keeps that step inside the window."""
    steps, i = 10, 3
    theirs = diffusers.EDMEulerScheduler()
    theirs.set_timesteps(steps)
    s = theirs.sigmas[i].item()
    cases = [dict(s_tmax=s), dict(s_tmin=s), dict(s_tmax=float(np.nextafter(s, 0.0))),
             dict(s_tmin=float(np.nextafter(s, 100.0))), dict(s_tmin=s, s_tmax=s),
             dict(s_tmax=0.002), dict(s_tmax=float(np.nextafter(s, 0.0)) * (1 - 1e-6))]  # fmt: skip
    for kw in cases:
        kw = dict(s_churn=5.0, **kw)
        smp = make_sampler("edm_euler", None, steps, **kw)
        want = [_diffusers_churns(kw, steps, j) for j in range(steps)]
        assert [smp.needs_noise(j) for j in range(steps)] == want, kw
    assert want[-1] and not want[i]  # the last case: s_tmax below sigma_3


# ---------------------------------------------------------------------- mixed dtypes
@pytest.mark.parametrize("x_dtype,mo_dtype", [(torch.float32, torch.float16),
                                              (torch.float32, torch.bfloat16),
                                              (torch.float16, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("clipped", [False, True])
def test_ddim_thresholding_returns_x_dtype(x_dtype, mo_dtype, clipped):
    """A half model output on a float32 sample (or the reverse): DDIM's thresholding path
    returned the model output's dtype (the op's x there is eps), every other sampler and DDIM
    without thresholding x's. The values stay those of the float32 step."""
    sch = NoiseSchedule.from_diffusers(SL)
    smp = make_sampler("ddim", sch, 4, thresholding=True, use_clipped_model_output=clipped)
    g = torch.Generator().manual_seed(0)
    x, mo = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    x, mo = x.to(x_dtype), mo.to(mo_dtype)
    got = smp.step(mo, 1, x)
    assert got.dtype == x_dtype
    want = smp.step(mo.float(), 1, x.float())
    tol = 2e-3 if torch.float16 in (x_dtype, mo_dtype) else 1e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_edm_euler_churn_return_x0_is_the_denoiser_at_sigma_hat(pred):
    """With churn, return_x0's D is D(X_hat; sigma_hat) without the churn noise term (the class
    docstring): diffusers' pred_original_sample is it plus c_skip(sigma_hat) s_noise
    sqrt(sigma_hat^2 - sigma^2) z for the same z. (The step itself does not read the (a, s)
    slots for an epsilon-form op, so only D sees a slot built at sigma instead of sigma_hat.)"""
    steps, churn = 6, dict(s_churn=3.0, s_noise=1.01)
    theirs = diffusers.EDMEulerScheduler(prediction_type=pred)
    theirs.set_timesteps(steps)
    smp = make_sampler("edm_euler", None, steps, prediction_type=pred, **churn)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(SHAPE, generator=g) * theirs.init_noise_sigma
    for i, t in enumerate(theirs.timesteps):
        out = _toy(theirs.scale_model_input(X, t), t)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(20 + i))
        res = theirs.step(out, t, X, generator=torch.Generator().manual_seed(20 + i), **churn)
        s = float(smp.sigmas[i])
        s_hat = s * (1 + min(churn["s_churn"] / steps, 2**0.5 - 1))
        c_skip = smp.sigma_data**2 / (s_hat**2 + smp.sigma_data**2)
        noise = c_skip * churn["s_noise"] * math.sqrt(s_hat**2 - s**2) * z.double()
        u = (X.double() * smp.c_in(s)).float()
        u_next, D = smp.step(out, i, u, noise=z, return_x0=True)
        assert _rel(D.double() + noise, res.pred_original_sample) <= RTOL, i
        X = res.prev_sample


# ---------------------------------------------------------------------- dpm++_single extras
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_dpm_single_dpmsolver_return_x0_is_the_data_prediction(pred):
    """algorithm_type="dpmsolver" integrates eps; return_x0 (trajectories) must still give the
    data prediction x0 at the call's x, the float64 conversion of the model output."""
    sch = NoiseSchedule.from_diffusers(SL)
    smp = make_sampler("dpm++_single", sch, 6, algorithm_type="dpmsolver", solver_order=3,
                       final_sigmas_type="sigma_min", prediction_type=pred)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=g)
    for i in range(6):
        mo = 0.6 * torch.randn(SHAPE, generator=g) + 0.4 * x
        rho = float(smp.sigmas()[i])
        a = 1.0 / math.sqrt(1.0 + rho * rho)
        s = rho * a
        x64, mo64 = x.double(), mo.double()
        want = {"epsilon": (x64 - s * mo64) / a, "v_prediction": a * x64 - s * mo64,
                "sample": mo64}[pred]  # fmt: skip
        x, x0 = smp.step(mo, i, x, return_x0=True)
        assert _rel(x0, want) <= RTOL, i


def test_dpm_single_order3_heun_with_coinciding_intermediate_levels_is_an_error():
    """An order-3 heun call whose two intermediate points share a noise level (r0 = r1)
    divides by r0 - r1 (diffusers: NaN): a ValueError naming steps, not NaN weights."""
    smp = make_sampler("dpm++_single", NoiseSchedule.from_diffusers(SL), 6, solver_order=3,
                       solver_type="heun")  # fmt: skip
    smp._sig = np.array([2.0, 1.0, 0.7, 0.7, 0.3, 0.2, 0.0])
    with pytest.raises(ValueError, match=r"steps: calls 1\.\.4 .* share a noise level"):
        smp._weights(3, 3)


# ---------------------------------------------------------------------- EDM half precision
@pytest.mark.parametrize("name", ["edm_euler", "edm_dpm++"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cfg", [{}, {"sigma_schedule": "exponential",
                                      "prediction_type": "v_prediction"}], ids=str)  # fmt: skip
def test_edm_half_precision_flash_attention_rule(name, dtype, cfg):
    """fp16 / bf16 state and model output, 12 steps: our worst per-step error vs diffusers'
    float32 step on the same (half-rounded) inputs is <= 2x diffusers' own error in that dtype
    (measured on cpu: fp16 3.4e-4 - 6.6e-4 vs 5.9e-4 - 1.7e-3, bf16 2.5e-3 - 4.1e-3 vs 5.4e-3 -
    1.1e-2)."""
    cls = getattr(diffusers, {"edm_euler": "EDMEulerScheduler",
                              "edm_dpm++": "EDMDPMSolverMultistepScheduler"}[name])  # fmt: skip
    if name == "edm_dpm++":
        cfg = {**cfg, "solver_order": 3}
    ref, half = cls(**cfg), cls(**cfg)
    ref.set_timesteps(12)
    half.set_timesteps(12)
    smp = make_sampler(name, None, 12, **cfg)
    X = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * ref.init_noise_sigma
    ours = theirs = 0.0
    for i, t in enumerate(ref.timesteps):
        c = smp.c_in(float(smp.sigmas[i]))
        u = (X.double() * c).to(dtype)  # our half state
        Xh = u.double() / c  # the same state in diffusers' units
        out = _toy(u.float(), t).to(dtype)
        want = ref.step(out.float(), t, Xh.float()).prev_sample
        got = smp.to_diffusers(smp.step(out, i, u).double(), i + 1)
        ours = max(ours, _rel(got, want))
        theirs = max(theirs, _rel(half.step(out, t, Xh.to(dtype)).prev_sample, want))
        X = want
    assert ours <= 2 * theirs, (ours, theirs)


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("euler", {"timesteps": "999"}),
        ("heun", {"timesteps": "999"}),
        ("ddpm", {"timesteps": "999"}),
        ("dpm++", {"timesteps": "999"}),
        ("dpm++_single", {"timesteps": "999"}),
        ("euler", {"sigmas": "10"}),
        ("euler", {"timesteps": b"999"}),
    ],
)
def test_custom_grid_given_as_a_string_is_a_type_error(name, opts):
    """A string is iterable: "999" read as [9, 9, 9] was refused as "not strictly descending",
    and "10" as sigmas [1.0, 0.0] would have run; now a TypeError naming the option."""
    key = next(iter(opts))
    with pytest.raises(TypeError, match=f"^{key}: expected a list"):
        make_sampler(name, NoiseSchedule("linear"), 3, **opts)
