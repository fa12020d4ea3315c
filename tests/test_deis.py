"""DEISSampler ("deis") vs diffusers' DEISMultistepScheduler, and through sample() (the CUDA-graph
loop, guidance, every unipc_step backend and the rest of the shared contract:
tests/test_sampler_contract.py).

DEIS ("logrho", orders 1-3) integrates the Lagrange polynomial in log rho through the last
noise estimates over [rho_i, rho_{i+1}], rho = sigma / alpha. Per step both sides get the same
sample and model output; ours must agree with a float64 restatement (the closed-form
antiderivatives diffusers writes, evaluated in float64) to a relative error <= 1e-5 (max |ours -
ref| / max |ref|), and with the stock scheduler to 1e-5 plus diffusers' own fp32 error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _sampler_cases import (
    SIGMA_GRID_IDS,
    SIGMA_GRIDS,
    assert_scheduler_run,
    assert_step_parity,
    check_cli_karras_solver_order,
    threshold64,
)
from _sampler_cases import toy as _toy
from _sampler_cases import vp_schedule as _schedule
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, PARITY_SHAPE
from test_gmm_exact import GMMEps, _assert_mixture, _run

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, DEISSampler, make_sampler
from fastdiff.samplers.deis import deis_weights

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL = PARITY_SHAPE, PARITY_RTOL


def _scheduler(sched: str = "scaled_linear", **opts):
    return diffusers.DEISMultistepScheduler(**DIFFUSERS_BETAS[sched], **opts)


# ---------------------------------------------------------------------- float64 restatement
_L = np.log


def _ind2(t, b, c):  # int (log r - log c) / (log b - log c) dr
    return t * (_L(t) - _L(c) - 1) / (_L(b) - _L(c))


def _ind3(t, b, c, d):  # int (log r - log c)(log r - log d) / ((log b - log c)(log b - log d)) dr
    lt, lc, ld = _L(t), _L(c), _L(d)
    num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt * lt - 2 * lt + 2)
    return num / ((_L(b) - lc) * (_L(b) - ld))


def _weights64(r: np.ndarray, i: int, order: int) -> list[float]:
    t, s0 = r[i + 1], r[i]
    if order == 1:
        return [t - s0]
    if order == 2:
        s1 = r[i - 1]
        return [_ind2(t, s0, s1) - _ind2(s0, s0, s1), _ind2(t, s1, s0) - _ind2(s0, s1, s0)]
    s1, s2 = r[i - 1], r[i - 2]
    return [_ind3(t, b, c, d) - _ind3(s0, b, c, d)
            for b, c, d in ((s0, s1, s2), (s1, s2, s0), (s2, s0, s1))]  # fmt: skip


def _eps64(x64, mo64, rho: float, smp: DEISSampler):
    a = 1.0 / math.sqrt(1.0 + rho * rho)
    s = rho * a
    pred = smp.prediction_type
    x0 = {"epsilon": (x64 - s * mo64) / a, "v_prediction": a * x64 - s * mo64, "sample": mo64}[pred]
    if smp.thresholding:
        x0 = threshold64(x0, smp.dynamic_thresholding_ratio, smp.sample_max_value)
    return (x64 - a * x0) / s


def _per_step(ours: DEISSampler, theirs, *, begin: int = 0, seed: int = 0):
    """Steps ``begin ..`` on each side with shared samples and outputs; returns the worst errors
    (ours, diffusers') vs the float64 restatement."""
    r = ours.sigmas()
    np.testing.assert_array_equal(r, theirs.sigmas.double().numpy())
    theirs.set_begin_index(begin)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    worst, worst_theirs, hist = 0.0, 0.0, []
    n = len(ours)
    few = ours.lower_order_final and n < 15
    for i in range(begin, n):
        order = min(ours.solver_order, i - begin + 1)
        order = 1 if few and i == n - 1 else min(order, 2) if few and i == n - 2 else order
        a_i, a_n = (1.0 / math.sqrt(1.0 + float(v) ** 2) for v in (r[i], r[i + 1]))
        mo = 0.6 * torch.randn(SHAPE, generator=g) + 0.4 * x.clamp(-3, 3)
        eps = _eps64(x.double(), mo.double(), float(r[i]), ours)
        hist = [eps, *hist][:3]
        w = _weights64(r, i, order)
        ref64 = a_n * (x.double() / a_i + sum(wj * e for wj, e in zip(w, hist, strict=False)))
        ref = theirs.step(mo, theirs.timesteps[i], x).prev_sample
        got = ours.step(mo, i, x)
        err64, own = assert_step_parity(got, ref, ref64, f"step {i}")
        worst, worst_theirs = max(worst, err64), max(worst_theirs, own)
        x = ref64.float()
    return worst, worst_theirs


def test_weights():
    """Order 1 is DDIM's rho_{i+1} - rho_i; the weights integrate polynomials in log rho of
    degree < order exactly (sum_j w_j p(log rho_{i-j}) = int p(log rho) d rho); they equal the
    closed forms diffusers writes (in float64) on a grid with near-equal noise levels."""
    r = np.array([14.6, 6.0, 2.5, 0.9, 0.3, 0.0292])
    for i in range(2, 5):
        np.testing.assert_allclose(deis_weights(r, i, 1), [r[i + 1] - r[i]], rtol=1e-15)
        for order in (2, 3):
            w = deis_weights(r, i, order)
            u = np.log(r[i - np.arange(order)])
            for deg in range(order):  # int u^deg e^u du, by quadrature
                grid = np.linspace(np.log(r[i]), np.log(r[i + 1]), 20001)
                f = grid**deg * np.exp(grid)
                want = np.sum((f[1:] + f[:-1]) / 2 * np.diff(grid))
                np.testing.assert_allclose(np.dot(w, u**deg), want, rtol=1e-7)
            np.testing.assert_allclose(w, _weights64(r, i, order), rtol=1e-12)
    close = np.array([0.031, 0.0305, 0.0302, 0.03])
    np.testing.assert_allclose(deis_weights(close, 2, 3), _weights64(close, 2, 3), rtol=1e-6)
    with pytest.raises(ValueError, match="share a noise level"):
        deis_weights(np.array([2.0, 1.0, 1.0, 0.5]), 2, 2)


@pytest.mark.parametrize("grid", SIGMA_GRIDS, ids=SIGMA_GRID_IDS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_per_step_parity_with_diffusers(grid, pred, spacing, steps, order):
    opts = dict(prediction_type=pred, timestep_spacing=spacing, solver_order=order, **grid)
    if spacing == "leading":
        opts["steps_offset"] = 1
    theirs = _scheduler(**opts)
    theirs.set_timesteps(steps)
    ours = DEISSampler(_schedule(), steps, **opts)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    _per_step(ours, theirs)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("grid", SIGMA_GRIDS[:2], ids=SIGMA_GRID_IDS[:2])
def test_thresholding_and_lower_order_final(pred, grid):
    for steps, lof in ((8, True), (8, False), (16, True)):
        opts = dict(prediction_type=pred, solver_order=3, thresholding=True,
                    lower_order_final=lof, sample_max_value=1.5, **grid)  # fmt: skip
        theirs = _scheduler("linear", **opts)
        theirs.set_timesteps(steps)
        ours = DEISSampler(_schedule("linear"), steps, **opts)
        tail = (2, 1) if lof and steps < 15 else (3, 3)
        assert ours.step_orders == (1, 2, *(3,) * (steps - 4), *tail)
        _per_step(ours, theirs)


@pytest.mark.parametrize("order", [2, 3])
def test_flash_attention_rule(order):
    """Over 30-step runs (plain / Karras x epsilon / v / sample), our worst per-step error vs
    float64 is <= 2x diffusers' own fp32 error (measured: 1.7e-7 vs 1.6e-6 at order 2, 2.2e-7
    vs 2.9e-5 at order 3, where diffusers' float32 antiderivatives cancel)."""
    ours_worst = theirs_worst = 0.0
    for grid in SIGMA_GRIDS[:2]:
        for pred in ("epsilon", "v_prediction", "sample"):
            opts = dict(prediction_type=pred, solver_order=order, **grid)
            theirs = _scheduler(**opts)
            theirs.set_timesteps(30)
            w = _per_step(DEISSampler(_schedule(), 30, **opts), theirs)
            ours_worst, theirs_worst = max(ours_worst, w[0]), max(theirs_worst, w[1])
    assert 0.0 < ours_worst <= 2 * theirs_worst, (ours_worst, theirs_worst)


@pytest.mark.parametrize("begin", [1, 2, 3, 5])
@pytest.mark.parametrize("order", [2, 3])
def test_img2img_start_matches_diffusers_begin_index(begin, order):
    """A run from step s > 0 (diffusers' set_begin_index) starts at first order again."""
    theirs = _scheduler(use_karras_sigmas=True, solver_order=order)
    theirs.set_timesteps(10)
    ours = DEISSampler(_schedule(), 10, use_karras_sigmas=True, solver_order=order)
    _per_step(ours, theirs, begin=begin)


def _float64_loop(smp: DEISSampler, z: torch.Tensor, model=_toy) -> torch.Tensor:
    """The whole run restated in float64 (model included)."""
    r, x, hist = smp.sigmas(), z.double(), []
    for i, t in enumerate(smp.timesteps):
        a_i, a_n = (1.0 / math.sqrt(1.0 + float(v) ** 2) for v in (r[i], r[i + 1]))
        hist = [_eps64(x, model(x, t.expand(x.shape[0])).double(), float(r[i]), smp), *hist][:3]
        w = _weights64(r, i, smp.step_orders[i])
        x = a_n * (x / a_i + sum(wj * e for wj, e in zip(w, hist, strict=False)))
    return x


RUNS = [
    ("scaled_linear", "epsilon", "linspace", {}, 20),
    ("scaled_linear", "epsilon", "leading", {"steps_offset": 1, "use_karras_sigmas": True}, 25),
    ("scaled_linear", "v_prediction", "trailing", {"solver_order": 3}, 12),
    ("linear", "epsilon", "linspace", {"use_exponential_sigmas": True, "solver_order": 1}, 7),
    ("linear", "sample", "linspace", {"thresholding": True, "solver_order": 3}, 9),
    ("cosine", "epsilon", "trailing", {"lower_order_final": False, "solver_order": 3}, 6),
]


@pytest.mark.parametrize("sched,pred,spacing,extra,steps", RUNS)
def test_sample_with_a_deis_scheduler_is_diffusers_loop(sched, pred, spacing, extra, steps):
    """sample(schedule=DEISMultistepScheduler(...)) picks "deis" without a warning, takes the
    scheduler's settings and lands where diffusers' own loop does."""
    sch = _scheduler(sched, prediction_type=pred, timestep_spacing=spacing, **extra)
    smp = DEISSampler(_schedule(sched), steps, prediction_type=pred, timestep_spacing=spacing,
                      **extra)  # fmt: skip
    assert_scheduler_run(sch, steps, "ddim", lambda z: _float64_loop(smp, z))


def test_registry_infer_and_options():
    from fastdiff._sampler_setup import infer_sampler, resolve_sampler

    assert SAMPLERS["deis"] is DEISSampler
    sch = _scheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                     use_karras_sigmas=True, solver_order=3)  # fmt: skip
    assert infer_sampler(sch) == "deis"
    smp = resolve_sampler(None, None, 8, sch, None, None, {"lower_order_final": False})
    assert isinstance(smp, DEISSampler)
    got = (smp.prediction_type, smp.timestep_spacing, smp.sigma_grid, smp.solver_order,
           smp.lower_order_final)  # fmt: skip
    assert got == ("v_prediction", "trailing", "karras", 3, False)
    smp = make_sampler("deis", NoiseSchedule("linear"), 5)
    assert smp.solver_order == 2 and smp.coef64.shape == (5, 12)
    assert smp.config()["solver_order"] == 2 and "solver_order=2" in repr(smp)
    # diffusers reads these as its only method, "deis" / "logrho"
    smp = make_sampler("deis", NoiseSchedule("linear"), 5, algorithm_type="dpmsolver++",
                       solver_type="midpoint")  # fmt: skip
    assert (smp.algorithm_type, smp.solver_type) == ("deis", "logrho")


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"solver_order": 0}, "solver_order: expected 1, 2 or 3, got 0"),
        ({"solver_order": 4}, "solver_order"),
        ({"solver_order": 2.0}, "solver_order"),
        ({"solver_order": True}, "solver_order"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ({"solver_type": "bh3"}, "solver_type"),
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "at most one"),
        ({"thresholding": True, "dynamic_thresholding_ratio": 0.0}, "dynamic_thresholding_ratio"),
        ({"thresholding": True, "sample_max_value": -1.0}, "sample_max_value"),
        ({"timestep_spacing": "leading", "steps": 1000}, "share a noise level"),
    ],
)
def test_bad_options(opts, match):
    steps = opts.pop("steps", 5)
    with pytest.raises(ValueError, match=match):
        DEISSampler(NoiseSchedule("linear"), steps, **opts)


def test_unsupported_scheduler_settings_through_sample():
    """(eta and unknown options: tests/test_sampler_contract.py)"""
    z = torch.randn(SHAPE)
    # flow sigmas are implemented (tests/test_flow_single_deis.py); not on a VP sigma grid
    flow = _scheduler(use_flow_sigmas=True, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="use_flow_sigmas: not with use_karras_sigmas=True"):
        fastdiff.sample(_toy, steps=5, schedule=flow, noise=z)
    saved = dict(DIFFUSERS_BETAS["linear"], _class_name="DEISMultistepScheduler",
                 use_karras_sigmas=True, sigma_min=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="sigma_min=0.1"):
        fastdiff.sample(_toy, steps=5, schedule=saved, noise=z)


@pytest.mark.parametrize("order", [1, 2])
def test_recovers_gaussian_mixture(order):
    """On the exact eps of a Gaussian mixture, 30 DEIS steps land on the mixture. (At 25 steps
    order 2 misplaces the smallest component by up to 0.034 > 0.03 on 2 of 20 seeds; at 30 the
    worst of 20 is 0.017. Order 3 does not, with 25 or 50 steps, for diffusers' scheduler either
    (measured): its cubic extrapolation over the last, long log-rho steps overshoots on this
    stiff eps.)"""
    sch = NoiseSchedule("linear")
    _assert_mixture(_run(DEISSampler(sch, 30, solver_order=order), GMMEps(sch)))


def test_cli_sampler_deis_karras_solver_order(tmp_path, monkeypatch):
    """fastdiff sample --sampler deis [--karras] [--solver-order 3] reaches sample()."""
    check_cli_karras_solver_order(tmp_path, monkeypatch, "deis")
