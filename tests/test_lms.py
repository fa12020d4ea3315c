"""LMSSampler ("lms") vs diffusers' LMSDiscreteScheduler, and through sample() (the CUDA-graph
loop, guidance, every unipc_step backend and the rest of the shared contract:
tests/test_sampler_contract.py).

LMS integrates the Lagrange polynomial through the last ``order`` ODE derivatives d = eps over
[sigma_i, sigma_{i+1}] (k-diffusion's sample_lms). Per step both sides get the same sample and
model output; ours must agree with a float64 restatement (diffusers' step in sigma space, its
weights by quadrature, independent of lms_weights) to a relative error <= 1e-5 (max |ours -
ref| / max |ref|), and with the stock scheduler to 1e-5 plus diffusers' own fp32 error.
fastdiff's sample is the VP one, x = x_sigma / sqrt(1 + sigma^2).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from _sampler_cases import (
    SIGMA_GRID_IDS,
    SIGMA_GRIDS,
    assert_scheduler_run,
    assert_step_parity,
    diffusers_loop,
)
from _sampler_cases import rel as _rel
from _sampler_cases import toy as _toy
from _sampler_cases import vp_schedule as _schedule
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, PARITY_SHAPE, record_sample_calls
from test_gmm_exact import GMMEps, _assert_mixture, _run

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, EulerSampler, LMSSampler, make_sampler
from fastdiff.samplers.lms import lms_weights

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL = PARITY_SHAPE, PARITY_RTOL


def _scheduler(sched: str = "scaled_linear", **opts):
    return diffusers.LMSDiscreteScheduler(**DIFFUSERS_BETAS[sched], **opts)


def _quad_weights(sig: np.ndarray, i: int, order: int) -> np.ndarray:
    """The LMS weights for the float64 references, computed independently of lms_weights: the
    Lagrange basis l_j(tau) = prod_{k != j} (tau - s_{i-k}) / (s_{i-j} - s_{i-k}) evaluated in
    product form at 4-point Gauss-Legendre nodes on [sigma_i, sigma_{i+1}] (exact for its
    degree <= 3)."""
    nodes = [float(sig[i - k]) for k in range(order)]
    a, b = float(sig[i]), float(sig[i + 1])
    gx, gw = np.polynomial.legendre.leggauss(4)
    tau = 0.5 * (b - a) * gx + 0.5 * (a + b)
    out = []
    for j, nj in enumerate(nodes):
        basis = np.prod([(tau - nk) / (nj - nk) for k, nk in enumerate(nodes) if k != j], axis=0)
        out.append(0.5 * (b - a) * float(np.sum(gw * basis)))
    return np.array(out)


@pytest.mark.parametrize("weights", [lms_weights, _quad_weights])
def test_weights_are_adams_bashforth_on_a_uniform_grid(weights):
    """On sigma = 4, 3, 2, 1, 0 the weights are h times the Adams-Bashforth ones (h = -1)."""
    sig = np.array([4.0, 3.0, 2.0, 1.0, 0.0])
    ab = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
          4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}  # fmt: skip
    for order, want in ab.items():
        np.testing.assert_allclose(weights(sig, 3, order), -np.array(want), rtol=1e-13)
    # non-uniform: order 2 by hand (the line through d_i and d_{i-1} integrated)
    s = np.array([5.0, 2.0, 0.5])
    h = s[2] - s[1]
    w1 = (h * h / 2) / (s[0] - s[1])  # integral of (tau - s1) / (s0 - s1)
    np.testing.assert_allclose(weights(s, 1, 2), [h - w1, w1], rtol=1e-13)


def _d64(x64, mo64, sig: float, pred: str):
    """float64 derivative d = (x_sigma - x0) / sigma at VP sample x (diffusers' step)."""
    a = 1.0 / math.sqrt(1.0 + sig * sig)
    xs = x64 / a
    if pred == "epsilon":
        x0 = xs - sig * mo64
    elif pred == "v_prediction":
        x0 = mo64 * (-sig / math.sqrt(sig * sig + 1)) + xs / (sig * sig + 1)
    else:
        x0 = mo64
    return (xs - x0) / sig


def _per_step(ours: LMSSampler, theirs, *, begin: int = 0, seed: int = 0, order: int = 4):
    """Steps ``begin ..`` on each side with shared samples and outputs; returns the worst errors
    (ours, diffusers') vs the float64 restatement."""
    sig = ours._sig32()
    np.testing.assert_array_equal(sig, theirs.sigmas.double().numpy())
    theirs.set_begin_index(begin)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    worst, worst_theirs, hist = 0.0, 0.0, []
    for i in range(begin, len(ours)):
        t = theirs.timesteps[i]
        a_i, a_n = (1.0 / math.sqrt(1.0 + float(v) ** 2) for v in (sig[i], sig[i + 1]))
        mo = 0.6 * torch.randn(SHAPE, generator=g) + 0.4 * x.clamp(-3, 3)
        hist = [_d64(x.double(), mo.double(), float(sig[i]), ours.prediction_type), *hist][:order]
        w = _quad_weights(sig, i, min(i + 1, order))
        ref64 = a_n * (x.double() / a_i + sum(wj * d for wj, d in zip(w, hist, strict=False)))
        theirs.scale_model_input(x / a_i, t)  # (diffusers warns unless it is called)
        ref = theirs.step(mo, t, x / a_i, order=order).prev_sample * a_n
        got = ours.step(mo, i, x)
        err64, own = assert_step_parity(got, ref, ref64, f"step {i}")
        worst, worst_theirs = max(worst, err64), max(worst_theirs, own)
        x = ref64.float()
    return worst, worst_theirs


@pytest.mark.parametrize("grid", SIGMA_GRIDS, ids=SIGMA_GRID_IDS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 20])
def test_per_step_parity_with_diffusers(grid, pred, spacing, steps):
    opts = dict(prediction_type=pred, timestep_spacing=spacing, **grid)
    if spacing == "leading":
        opts["steps_offset"] = 1
    theirs = _scheduler(**opts)
    theirs.set_timesteps(steps)
    ours = LMSSampler(_schedule(), steps, **opts)
    assert torch.equal(ours.timesteps, theirs.timesteps.round().to(torch.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _per_step(ours, theirs)


def test_flash_attention_rule():
    """Over whole grids of steps, our worst per-step error vs float64 is <= 2x diffusers' own
    fp32 error (measured: 6.6e-7 vs 1.7e-6)."""
    ours_worst = theirs_worst = 0.0
    for grid in SIGMA_GRIDS[:2]:
        for pred in ("epsilon", "v_prediction", "sample"):
            theirs = _scheduler(prediction_type=pred, **grid)
            theirs.set_timesteps(30)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w = _per_step(LMSSampler(_schedule(), 30, prediction_type=pred, **grid), theirs)
            ours_worst, theirs_worst = max(ours_worst, w[0]), max(theirs_worst, w[1])
    assert 0.0 < ours_worst <= 2 * theirs_worst, (ours_worst, theirs_worst)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_lower_orders(order):
    theirs = _scheduler(prediction_type="v_prediction")
    theirs.set_timesteps(8)
    ours = LMSSampler(_schedule(), 8, prediction_type="v_prediction", order=order)
    _per_step(ours, theirs, order=order)


@pytest.mark.parametrize("begin", [1, 2, 3, 5])
def test_img2img_start_matches_diffusers_begin_index(begin):
    """A run from step s > 0 (diffusers' set_begin_index): diffusers uses the first
    min(i - s + 1, 4) weights of order min(i + 1, 4); ours the same rows."""
    theirs = _scheduler(use_karras_sigmas=True)
    theirs.set_timesteps(10)
    ours = LMSSampler(_schedule(), 10, use_karras_sigmas=True)
    _per_step(ours, theirs, begin=begin)


RUNS = [
    ("scaled_linear", "epsilon", "linspace", {}, 20),
    ("scaled_linear", "epsilon", "leading", {"steps_offset": 1, "use_karras_sigmas": True}, 25),
    ("scaled_linear", "v_prediction", "trailing", {}, 12),
    ("linear", "epsilon", "linspace", {"use_exponential_sigmas": True}, 7),
    ("linear", "sample", "linspace", {}, 5),
]


@pytest.mark.parametrize("sched,pred,spacing,extra,steps", RUNS)
def test_sample_with_an_lms_scheduler_is_diffusers_loop(sched, pred, spacing, extra, steps):
    """sample(schedule=LMSDiscreteScheduler(...)) picks "lms" without a warning, takes the
    scheduler's settings and lands where diffusers' own loop does."""
    sch = _scheduler(sched, prediction_type=pred, timestep_spacing=spacing, **extra)
    assert_scheduler_run(sch, steps, "euler")


@pytest.mark.parametrize("form", ["object", "saved-config"])
@pytest.mark.parametrize("leftover", [False, True], ids=["no-ends", "euler-ends"])
@pytest.mark.parametrize("grid", SIGMA_GRIDS, ids=SIGMA_GRID_IDS)
def test_leftover_sigma_ends_as_diffusers(grid, leftover, form):
    """LMSDiscreteScheduler.from_config(euler.config) keeps Euler's sigma_min / sigma_max:
    diffusers' exponential / beta grids read them, its default and Karras grids do not.
    sample(schedule=<that scheduler or its config>) lands where diffusers' loop does, with the
    ends or without them, and the ends change exactly the grids that read them."""
    betas = DIFFUSERS_BETAS["scaled_linear"]
    ends = {"sigma_min": 0.3, "sigma_max": 6.0} if leftover else {}
    euler = diffusers.EulerDiscreteScheduler(**betas, **ends)
    sch = diffusers.LMSDiscreteScheduler.from_config(euler.config, **grid)
    assert (getattr(sch.config, "sigma_min", None) is not None) is leftover
    steps, z = 9, torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ref = diffusers_loop(sch, steps, z)
    schedule = sch if form == "object" else json.loads(sch.to_json_string())  # a saved config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fastdiff.sample(_toy, steps=steps, schedule=schedule, noise=z)
    err = _rel(got, ref)
    assert 0.0 < err <= RTOL, f"whole-run rel err {err:.2e}"
    if leftover:  # the same run without the ends: equal unless the grid reads them
        plain = _scheduler(**grid)
        without = fastdiff.sample(_toy, steps=steps, schedule=plain, noise=z)
        reads = bool(grid) and "use_karras_sigmas" not in grid
        assert torch.equal(got, without) is not reads
        if reads:
            assert sch.sigmas[0].item() == pytest.approx(6.0, rel=1e-6)


def test_sigma_ends_options():
    """LMSSampler's sigma_min / sigma_max: Euler's ends on the exponential / beta grids;
    checked but unused on the default and Karras grids (as diffusers' LMS)."""
    for grid in SIGMA_GRIDS:
        smp = LMSSampler(_schedule(), 6, sigma_min=0.3, sigma_max=6.0, **grid)
        plain = LMSSampler(_schedule(), 6, **grid)
        reads = bool(grid) and "use_karras_sigmas" not in grid
        assert np.array_equal(smp.sigmas(), plain.sigmas()) is not reads
        if reads:
            want = EulerSampler(_schedule(), 6, sigma_min=0.3, sigma_max=6.0, **grid).sigmas()
            np.testing.assert_array_equal(smp.sigmas(), want.astype(np.float32))
        for bad in ({"sigma_min": 0.0}, {"sigma_max": float("inf")}):
            with pytest.raises(ValueError, match=next(iter(bad))):
                LMSSampler(_schedule(), 6, **bad, **grid)
        with pytest.raises(TypeError, match="^sigma_min: expected None or .*, got str$"):
            LMSSampler(_schedule(), 6, sigma_min="1", **grid)  # a wrong type


def test_registry_infer_and_options():
    from fastdiff._sampler_setup import infer_sampler, resolve_sampler

    assert SAMPLERS["lms"] is LMSSampler
    sch = _scheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                     use_karras_sigmas=True)  # fmt: skip
    assert infer_sampler(sch) == "lms"
    smp = resolve_sampler(None, None, 8, sch, None, None, {"order": 2})
    assert isinstance(smp, LMSSampler)
    assert (smp.prediction_type, smp.timestep_spacing, smp.sigma_grid, smp.order) == (
        "v_prediction", "trailing", "karras", 2)  # fmt: skip
    smp = make_sampler("lms", NoiseSchedule("linear"), 5)
    assert smp.order == 4 and smp.coef64.shape == (5, 12)
    assert smp.config()["order"] == 4 and "order=4" in repr(smp)


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"order": 0}, "order: expected an int in 1..4, got 0"),
        ({"order": 5}, "order"),
        ({"order": 2.0}, "order"),
        ({"order": True}, "order"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "at most one"),
    ],
)
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        LMSSampler(NoiseSchedule("linear"), 5, **opts)


@pytest.mark.parametrize("grid", [None, "karras"])
def test_recovers_gaussian_mixture(grid):
    """On the exact eps of a Gaussian mixture, 50 LMS steps (25 on the Karras grid) land on the
    mixture. (25 steps on the default grid do not: their components come back ~1.45x TAU wide,
    past the TAU +- 50 % check on 16 of 20 seeds; at 50 steps the worst of 20 seeds is 1.15x.)"""
    sch = NoiseSchedule("linear")
    smp = LMSSampler(sch, 25 if grid == "karras" else 50, use_karras_sigmas=grid == "karras")
    _assert_mixture(_run(smp, GMMEps(sch)))


def test_cli_sampler_lms_karras(tmp_path, monkeypatch):
    """fastdiff sample --sampler lms [--karras] reaches sample() as "lms" (Karras sigmas)."""
    from fastdiff.cli import main

    seen = record_sample_calls(monkeypatch)
    out = tmp_path / "lms.png"
    args = ["sample", "--steps", "3", "--n", "2", "--sampler", "lms", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0 and out.is_file()
    assert seen[-1]["sampler"] == "lms" and "use_karras_sigmas" not in seen[-1]
    assert main([*args, "--karras", "--out", str(out)]) == 0
    assert seen[-1]["use_karras_sigmas"] is True
