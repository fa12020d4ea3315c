"""DPM-Solver++ on Karras / exponential / beta sigma grids ("DPM++ 2M Karras") vs diffusers.

Whole sampling loops on a tiny deterministic fake model: at every step both sides get the same
x (diffusers' previous output) and the same model output, which depends on x and on the model
timestep t (so a wrong t shows), and must agree to a relative error <= 1e-5 in fp32
(max |ours - theirs| / max |theirs|). The model timesteps must be identical.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from _sampler_cases import toy as _fake_model
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, PARITY_SHAPE

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import DPMSolverPPSampler
from fastdiff.samplers import dpm_solver as dpm_mod

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL, SCHEDULES = PARITY_SHAPE, PARITY_RTOL, DIFFUSERS_BETAS
FLAGS = {g: f"use_{g}_sigmas" for g in ("karras", "exponential", "beta")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _pair(sched: str, steps: int, zero_snr: bool = False, **opts):
    """(ours, theirs) built with the same options; diffusers' begin index is pinned to 0 when
    its first timestep repeats (else its timestep lookup would start at step 1)."""
    cfg = dict(SCHEDULES[sched], rescale_betas_zero_snr=zero_snr)
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg, **opts)
    theirs.set_timesteps(steps)
    if steps > 1 and theirs.timesteps[0] == theirs.timesteps[1]:
        theirs.set_begin_index(0)
    ours = DPMSolverPPSampler(NoiseSchedule.from_diffusers(cfg), steps, **opts)
    return ours, theirs


def _loop(ours: DPMSolverPPSampler, theirs, seed: int = 0) -> float:
    """Run all steps with shared inputs; assert identical timesteps and per-step parity."""
    assert torch.equal(ours.timesteps, theirs.timesteps), (ours.timesteps, theirs.timesteps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    worst = 0.0
    for i, t in enumerate(ours.timesteps):
        mo = _fake_model(x, t)
        ref = theirs.step(mo, t, x).prev_sample
        got = ours.step(mo, i, x)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        err = _rel(got, ref)
        assert err <= RTOL, f"step {i} (t={int(t)}): rel err {err:.2e}"
        worst = max(worst, err)
        x = ref
    return worst


# ---------------------------------------------------------------------------------- parity
KARRAS_CASES = list(
    itertools.product(
        ["linear", "scaled_linear"], ["epsilon", "v_prediction"], [8, 20, 50], ["zero", "sigma_min"]
    )
)


@pytest.mark.parametrize("sched,pred,steps,final", KARRAS_CASES)
def test_karras_parity(sched, pred, steps, final):
    ours, theirs = _pair(
        sched, steps, use_karras_sigmas=True, prediction_type=pred, final_sigmas_type=final
    )
    plain = DPMSolverPPSampler(ours.schedule, steps)
    assert not torch.equal(ours.timesteps, plain.timesteps)  # the grid, not the spacing
    _loop(ours, theirs)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("steps", [8, 25])
@pytest.mark.parametrize("sched", ["linear", "scaled_linear"])
@pytest.mark.parametrize("grid", ["exponential", "beta"])
def test_exponential_and_beta_parity(grid, sched, steps, final):
    if grid == "beta":
        pytest.importorskip("scipy")
    ours, theirs = _pair(sched, steps, **{FLAGS[grid]: True}, final_sigmas_type=final)
    _loop(ours, theirs)


@pytest.mark.parametrize(
    "sched,steps,zero_snr,opts",
    [
        ("scaled_linear", 8, False, dict(lower_order_final=False)),
        ("scaled_linear", 8, False, dict(lower_order_final=False, final_sigmas_type="sigma_min")),
        ("scaled_linear", 12, False, dict(thresholding=True, sample_max_value=1.5)),
        ("scaled_linear", 12, False, dict(prediction_type="sample")),
        ("scaled_linear", 30, True, dict(prediction_type="v_prediction")),
        ("cosine", 10, False, {}),  # fractional t truncated; t = 998 four times first
    ],
    ids=["no-lof", "no-lof-sigma_min", "thresh", "sample", "zero-snr-v", "cosine"],
)
def test_karras_parity_options(sched, steps, zero_snr, opts):
    ours, theirs = _pair(sched, steps, zero_snr, use_karras_sigmas=True, **opts)
    _loop(ours, theirs)


def test_karras_grid_is_eq5_with_rho_7_and_matches_diffusers_bitwise():
    """Karras et al. 2022 eq. 5 between the schedule's float32 end noise levels; the float32
    grid and the rounded timesteps equal diffusers' exactly, over many step counts."""
    sig = dpm_mod.karras_sigmas(0.03, 14.6, 5)
    ramp = np.arange(5) / 4
    want = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sig, want, rtol=1e-14)
    for steps in (1, 2, 7, 33, 100, 999):
        ours, theirs = _pair("scaled_linear", steps, use_karras_sigmas=True)
        assert torch.equal(ours.timesteps, theirs.timesteps), steps
        assert np.array_equal(ours._grid, theirs.sigmas.double().numpy()), steps


def test_repeated_timesteps_near_zero_are_stepped_like_diffusers():
    """50 Karras steps on Stable Diffusion's schedule visit t = 1 twice (distinct sigmas): no
    error, as diffusers; the spaced-timestep path still rejects repeats (h = 0 there)."""
    ours, theirs = _pair("scaled_linear", 50, use_karras_sigmas=True)
    ts = ours.timesteps.tolist()
    assert len(set(ts)) < len(ts) and ts[-1] == 0
    _loop(ours, theirs, seed=3)
    with pytest.raises(ValueError, match="repeat timesteps"):
        DPMSolverPPSampler(NoiseSchedule("linear"), 1000)


def test_sigma_min_final_step_is_the_identity():
    """With final_sigmas_type='sigma_min' the grid's last sigma equals the final one: h = 0,
    diffusers returns x unchanged (r = inf); so must we (and without dividing by zero)."""
    ours = DPMSolverPPSampler(
        NoiseSchedule("scaled_linear"), 20, use_karras_sigmas=True,
        final_sigmas_type="sigma_min", lower_order_final=False,
    )  # fmt: skip
    assert ours.coef64[-1, 2:5].tolist() == [1.0, 0.0, 0.0]
    x = torch.randn(SHAPE)
    torch.testing.assert_close(ours.step(torch.randn(SHAPE), 19, x), x, rtol=0, atol=0)


def test_equal_sigmas_before_a_second_order_step_is_a_clear_error(monkeypatch):
    real = dpm_mod.karras_sigmas

    def dup(lo, hi, n, rho=7.0):
        sig = real(lo, hi, n, rho)
        sig[3] = sig[2]
        return sig

    monkeypatch.setattr(dpm_mod, "karras_sigmas", dup)
    with pytest.raises(ValueError, match="steps 2 and 3 of the karras sigma grid"):
        DPMSolverPPSampler(NoiseSchedule("linear"), 10, use_karras_sigmas=True)


# ----------------------------------------------------------------------------------- options
@pytest.mark.parametrize("pair", list(itertools.combinations(FLAGS.values(), 2)))
def test_at_most_one_sigma_grid(pair):
    kw = dict.fromkeys(pair, True)
    with pytest.raises(ValueError, match="at most one"):
        DPMSolverPPSampler(NoiseSchedule("linear"), 10, **kw)
    with pytest.raises(ValueError):  # diffusers agrees
        diffusers.DPMSolverMultistepScheduler(**kw)


# ------------------------------------------------------------------ history, one op per step
@pytest.mark.parametrize("begin", [3, 7])
def test_run_starting_mid_schedule_matches_diffusers_begin_index(begin):
    """img2img-style start at i = begin on the Karras grid: first order first (no stale x0
    history), also on a sampler reused after a full run (same shape: only the step index tells
    that its history is stale)."""
    ours, theirs = _pair("scaled_linear", 12, use_karras_sigmas=True)
    theirs.set_begin_index(begin)
    g = torch.Generator().manual_seed(1)
    x_start = torch.randn(SHAPE, generator=g)
    reused = DPMSolverPPSampler(ours.schedule, 12, use_karras_sigmas=True)
    y = torch.randn(SHAPE, generator=g)
    for i in range(12):
        y = reused.step(_fake_model(y, reused.timesteps[i]), i, y)
    x_ref, x, xr = x_start, x_start, x_start
    for i in range(begin, 12):
        t = ours.timesteps[i]
        x_ref = theirs.step(_fake_model(x_ref, t), t, x_ref).prev_sample
        x = ours.step(_fake_model(x, t), i, x)
        xr = reused.step(_fake_model(xr, t), i, xr)
        assert _rel(x, x_ref) <= RTOL, (i, _rel(x, x_ref))
        assert _rel(xr, x_ref) <= RTOL, (i, _rel(xr, x_ref))


def test_one_fused_op_call_per_step(monkeypatch):
    from fastdiff.ops import sampler_step as ops

    calls = []
    real = ops.dpm_solver_2m_step

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ops, "dpm_solver_2m_step", counting)
    s = DPMSolverPPSampler(NoiseSchedule("scaled_linear"), 9, use_karras_sigmas=True)
    x = torch.randn(SHAPE)
    for i in range(9):
        x = s.step(_fake_model(x, s.timesteps[i]), i, x)
    assert len(calls) == 9


# --------------------------------------------------------------------------- fastdiff.sample
def _diffusers_loop(sched, steps: int, noise: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    sched.set_timesteps(steps)
    x, seen = noise * sched.init_noise_sigma, []
    for t in sched.timesteps:
        seen.append(int(t))
        x = sched.step(_fake_model(sched.scale_model_input(x, t), t), t, x).prev_sample
    return x, seen


def _sample(steps: int, noise: torch.Tensor, **kw) -> tuple[torch.Tensor, list[int]]:
    seen: list[int] = []

    def model(x, t):
        seen.append(int(t[0]))
        return _fake_model(x, t)

    return fastdiff.sample(model, steps, sampler="dpm++", noise=noise, **kw), seen


@pytest.mark.parametrize("as_config", [False, True])
def test_sample_with_a_karras_scheduler_matches_diffusers(as_config):
    """schedule=DPMSolverMultistepScheduler(use_karras_sigmas=True) (or its saved config) was a
    ValueError; now its Karras setting is forwarded and the samples are diffusers'."""
    kw = dict(SCHEDULES["scaled_linear"], use_karras_sigmas=True, prediction_type="v_prediction")
    sched = diffusers.DPMSolverMultistepScheduler(**kw)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    ref, ref_t = _diffusers_loop(diffusers.DPMSolverMultistepScheduler(**kw), 12, noise)
    arg = {**sched.config, "_class_name": "DPMSolverMultistepScheduler"} if as_config else sched
    got, seen = _sample(12, noise, schedule=arg)
    assert seen == ref_t
    assert _rel(got, ref) <= RTOL


def test_sample_karras_as_a_sampler_option():
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    sched = diffusers.DPMSolverMultistepScheduler(**SCHEDULES["scaled_linear"])
    got, seen = _sample(10, noise, schedule=sched, use_karras_sigmas=True)
    karras = diffusers.DPMSolverMultistepScheduler(**SCHEDULES["scaled_linear"],
                                                   use_karras_sigmas=True)  # fmt: skip
    ref, ref_t = _diffusers_loop(karras, 10, noise)
    assert seen == ref_t
    assert _rel(got, ref) <= RTOL
    plain, plain_t = _sample(10, noise, schedule=sched)
    assert plain_t != seen and _rel(plain, ref) > 1e-3
    with pytest.raises(ValueError, match="at most one"):
        _sample(10, noise, use_karras_sigmas=True, use_beta_sigmas=True)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("pred", ["sample", "epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [25, 250])
def test_spaced_cosine_runs_step_between_diffusers_float32_levels(steps, pred, final):
    """Spaced timesteps (no sigma grid) on the cosine schedule, whole runs through ``sample()``
    (each side on its own trajectory): fastdiff steps between diffusers' float32 noise levels,
    as diffusers does. With float64 levels (and the float32 sigma_min as the end point) runs
    drifted up to 5e-5 (sample, 250 steps) and 9.5e-5 (sigma_min) from diffusers' loop; now
    <= 6e-6."""

    def model(x, t):
        return 0.3 * x + torch.sin(t.double() / 90).float().reshape(-1, 1, 1, 1)

    kw = dict(beta_schedule="squaredcos_cap_v2", prediction_type=pred, final_sigmas_type=final)
    sch = diffusers.DPMSolverMultistepScheduler(**kw)
    sch.set_timesteps(steps)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = z.clone()
    for t in sch.timesteps:
        x = sch.step(model(x, t.expand(2)), t, x).prev_sample
    got = fastdiff.sample(model, schedule=diffusers.DPMSolverMultistepScheduler(**kw),
                          steps=steps, noise=z)  # fmt: skip
    assert ((got - x).norm() / x.norm()).item() <= RTOL
