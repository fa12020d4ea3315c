"""DPMSolverSinglestepSampler ("dpm++_single") vs diffusers' DPMSolverSinglestepScheduler, and
through sample() (the CUDA-graph loop, guidance, every unipc_step backend and the rest of the
shared contract: tests/test_sampler_contract.py).

Per call both sides get the same sample and model output; ours must agree with a float64
restatement of diffusers' update formulas (D0, D1, D2 as it writes them, from the group's anchor
sample) to a relative error <= 1e-5 (max |ours - ref| / max |ref|), and with the stock scheduler
to 1e-5 plus diffusers' own fp32 error.
"""

from __future__ import annotations

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
    check_cli_karras_solver_order,
    threshold64,
)
from _sampler_cases import rel as _rel
from _sampler_cases import toy as _toy
from _sampler_cases import vp_schedule as _schedule
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, PARITY_SHAPE, backend_cases, case_id

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, DPMSolverSinglestepSampler, make_sampler
from fastdiff.samplers.dpm_single import singlestep_orders

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL = PARITY_SHAPE, PARITY_RTOL


def _scheduler(sched: str = "scaled_linear", **opts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # algorithm_type="dpmsolver" is deprecated there
        return diffusers.DPMSolverSinglestepScheduler(**DIFFUSERS_BETAS[sched], **opts)


def _set(theirs, steps: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.set_timesteps(steps)


# ---------------------------------------------------------------------- float64 restatement
def _m64(x64, mo64, rho: float, smp: DPMSolverSinglestepSampler):
    """diffusers' convert_model_output in float64: x0 (dpmsolver++) or eps (dpmsolver)."""
    a = 1.0 / math.sqrt(1.0 + rho * rho)
    s = rho * a
    pred = smp.prediction_type
    if smp.algorithm_type == "dpmsolver++":
        x0 = {"epsilon": (x64 - s * mo64) / a, "v_prediction": a * x64 - s * mo64,
              "sample": mo64}[pred]  # fmt: skip
        if smp.thresholding:
            x0 = threshold64(x0, smp.dynamic_thresholding_ratio, smp.sample_max_value)
        return x0
    return {"epsilon": mo64, "v_prediction": a * mo64 + s * x64, "sample": (x64 - a * mo64) / s}[
        pred
    ]


def _update64(smp, r: np.ndarray, i: int, order: int, anchor, ms):
    """diffusers' singlestep update of ``order`` from call i - order + 1 to i + 1, float64;
    ``ms`` = the group's m, oldest (the anchor's) first."""
    a = i - order + 1
    al = [1.0 / math.sqrt(1.0 + float(v) ** 2) for v in r]
    sg = [float(v) * q for v, q in zip(r, al, strict=True)]
    t = i + 1
    pp = smp.algorithm_type == "dpmsolver++"
    if r[t] == 0.0:
        return ms[0]
    lam = {j: math.log(al[j]) - math.log(sg[j]) for j in range(a, t + 1)}
    h = lam[t] - lam[a]
    if pp:
        x = (sg[t] / sg[a]) * anchor
        A, B = al[t] * (1 - math.exp(-h)), al[t] * ((math.exp(-h) - 1) / h + 1) if h else 0.0
        C = -al[t] * ((math.exp(-h) - 1 + h) / h**2 - 0.5) if h else 0.0
    else:
        x = (al[t] / al[a]) * anchor
        A, B = -sg[t] * (math.exp(h) - 1), -sg[t] * ((math.exp(h) - 1) / h - 1) if h else 0.0
        C = -sg[t] * ((math.exp(h) - 1 - h) / h**2 - 0.5) if h else 0.0
    if order == 1:
        return x + A * ms[0]
    midpoint = smp.solver_type == "midpoint"
    if order == 2:
        r0 = (lam[i] - lam[a]) / h
        D0, D1 = ms[0], (ms[1] - ms[0]) / r0
        return x + A * D0 + (0.5 * A if midpoint else B) * D1
    r0, r1 = (lam[i] - lam[a]) / h, (lam[i - 1] - lam[a]) / h
    D0 = ms[0]
    D1_0, D1_1 = (ms[1] - ms[0]) / r1, (ms[2] - ms[0]) / r0
    if midpoint:
        return x + A * D0 + B * D1_1
    D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
    D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
    return x + A * D0 + B * D1 + C * D2


def _per_step(ours: DPMSolverSinglestepSampler, theirs, *, begin: int = 0, seed: int = 0):
    """Calls ``begin ..`` on each side with shared samples and outputs; returns the worst errors
    (ours, diffusers') vs the float64 restatement."""
    r = ours.sigmas()
    np.testing.assert_array_equal(r, theirs.sigmas.double().numpy())
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert list(ours.step_orders) == theirs.order_list
    theirs.set_begin_index(begin)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    worst, worst_theirs, ms, anchor = 0.0, 0.0, [], None
    for i in range(begin, len(ours)):
        order = min(theirs.order_list[i], i - begin + 1)
        mo = 0.6 * torch.randn(SHAPE, generator=g) + 0.4 * x.clamp(-3, 3)
        m = _m64(x.double(), mo.double(), float(r[i]), ours)
        if order == 1:
            anchor, ms = x.double(), []
        ms.append(m)
        assert len(ms) == order
        ref64 = _update64(ours, r, i, order, anchor, ms)
        ref = theirs.step(mo, theirs.timesteps[i], x).prev_sample
        got = ours.step(mo, i, x)
        err64, own = assert_step_parity(got, ref, ref64, f"call {i}")
        worst, worst_theirs = max(worst, err64), max(worst_theirs, own)
        x = ref64.float()
    return worst, worst_theirs


# ---------------------------------------------------------------------- per-call parity
def test_order_lists_are_diffusers():
    """singlestep_orders is diffusers' get_order_list (after set_timesteps' lower_order_final
    switch) for every step count 1..25, order and final sigma."""
    for order in (1, 2, 3):
        for lof in (False, True):
            for final in ("zero", "sigma_min"):
                for steps in range(1, 26):
                    theirs = _scheduler(solver_order=order, lower_order_final=lof,
                                        final_sigmas_type=final)  # fmt: skip
                    _set(theirs, steps)
                    ours = DPMSolverSinglestepSampler(_schedule(), steps, solver_order=order,
                                                      lower_order_final=lof,
                                                      final_sigmas_type=final)  # fmt: skip
                    assert list(ours.step_orders) == theirs.order_list, (order, lof, final, steps)
                    assert ours.lower_order_final == theirs.config.lower_order_final
    assert singlestep_orders(7, 3, True, True) == [1, 2, 3, 1, 2, 3, 1]
    assert singlestep_orders(6, 3, True, True) == [1, 2, 3, 1, 2, 1]


@pytest.mark.parametrize("grid", SIGMA_GRIDS, ids=SIGMA_GRID_IDS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_per_call_parity_dpmsolver_pp(grid, pred, steps, order, solver_type):
    opts = dict(prediction_type=pred, solver_order=order, solver_type=solver_type, **grid)
    for final in ("zero", "sigma_min"):
        theirs = _scheduler(final_sigmas_type=final, **opts)
        _set(theirs, steps)
        _per_step(DPMSolverSinglestepSampler(_schedule(), steps, final_sigmas_type=final,
                                             **opts), theirs)  # fmt: skip


@pytest.mark.parametrize("grid", SIGMA_GRIDS[:2], ids=SIGMA_GRID_IDS[:2])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 3, 7, 12])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_per_call_parity_dpmsolver(grid, pred, steps, order, solver_type):
    """algorithm_type="dpmsolver" (DPM-Solver-1/2/3 in the noise estimate; diffusers needs
    final_sigmas_type="sigma_min" there)."""
    opts = dict(prediction_type=pred, solver_order=order, solver_type=solver_type,
                algorithm_type="dpmsolver", final_sigmas_type="sigma_min", **grid)  # fmt: skip
    theirs = _scheduler(**opts)
    _set(theirs, steps)
    _per_step(DPMSolverSinglestepSampler(_schedule(), steps, **opts), theirs)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_thresholding_and_lower_order_final(pred):
    for steps, lof, final in ((9, False, "sigma_min"), (9, True, "sigma_min"), (10, True, "zero")):
        opts = dict(prediction_type=pred, solver_order=3, thresholding=True, sample_max_value=1.5,
                    lower_order_final=lof, final_sigmas_type=final)  # fmt: skip
        theirs = _scheduler("linear", **opts)
        _set(theirs, steps)
        _per_step(DPMSolverSinglestepSampler(_schedule("linear"), steps, **opts), theirs)


@pytest.mark.parametrize("order", [2, 3])
def test_flash_attention_rule(order):
    """Over 24-step runs (plain / Karras x epsilon / v / sample x midpoint / heun), our worst
    per-call error vs float64 is <= 2x diffusers' own fp32 error."""
    ours_worst = theirs_worst = 0.0
    for grid in SIGMA_GRIDS[:2]:
        for pred in ("epsilon", "v_prediction", "sample"):
            for st in ("midpoint", "heun"):
                opts = dict(prediction_type=pred, solver_order=order, solver_type=st, **grid)
                theirs = _scheduler(**opts)
                _set(theirs, 24)
                w = _per_step(DPMSolverSinglestepSampler(_schedule(), 24, **opts), theirs)
                ours_worst, theirs_worst = max(ours_worst, w[0]), max(theirs_worst, w[1])
    assert 0.0 < ours_worst <= 2 * theirs_worst, (ours_worst, theirs_worst)


@pytest.mark.parametrize("begin", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("order", [2, 3])
def test_img2img_start_matches_diffusers_begin_index(begin, order):
    """A run from call s > 0 (diffusers' set_begin_index) takes order min(order_i, i - s + 1)."""
    theirs = _scheduler(use_karras_sigmas=True, solver_order=order)
    _set(theirs, 10)
    ours = DPMSolverSinglestepSampler(_schedule(), 10, use_karras_sigmas=True,
                                      solver_order=order)  # fmt: skip
    _per_step(ours, theirs, begin=begin)


# ---------------------------------------------------------------------- whole runs
def _float64_loop(smp: DPMSolverSinglestepSampler, z: torch.Tensor, model=_toy) -> torch.Tensor:
    """The whole run restated in float64 (model included)."""
    r, x, ms, anchor = smp.sigmas(), z.double(), [], None
    for i, t in enumerate(smp.timesteps):
        order = smp.step_orders[i]
        if order == 1:
            anchor, ms = x, []
        ms.append(_m64(x, model(x, t.expand(x.shape[0])).double(), float(r[i]), smp))
        x = _update64(smp, r, i, order, anchor, ms)
    return x


RUNS = [
    ("scaled_linear", {"prediction_type": "epsilon"}, 20),
    ("scaled_linear", {"use_karras_sigmas": True, "solver_order": 3}, 25),
    (
        "scaled_linear",
        {"prediction_type": "v_prediction", "solver_order": 3, "solver_type": "heun"},
        11,
    ),
    ("linear", {"use_exponential_sigmas": True, "solver_order": 1}, 7),
    ("linear", {"prediction_type": "sample", "thresholding": True, "solver_order": 3}, 9),
    (
        "linear",
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3},
        13,
    ),
    ("cosine", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 6),
]


@pytest.mark.parametrize("sched,extra,steps", RUNS)
def test_sample_with_a_singlestep_scheduler_is_diffusers_loop(sched, extra, steps):
    """sample(schedule=DPMSolverSinglestepScheduler(...)) picks "dpm++_single" without a
    warning, takes the scheduler's settings and lands where diffusers' own loop does."""
    smp = DPMSolverSinglestepSampler(_schedule(sched), steps, **extra)
    assert_scheduler_run(_scheduler(sched, **extra), steps, "ddim", lambda z: _float64_loop(smp, z))


def test_registry_infer_and_options():
    from fastdiff._sampler_setup import infer_sampler, resolve_sampler

    assert SAMPLERS["dpm++_single"] is DPMSolverSinglestepSampler
    sch = _scheduler(prediction_type="v_prediction", use_karras_sigmas=True, solver_order=3,
                     solver_type="heun")  # fmt: skip
    assert infer_sampler(sch) == "dpm++_single"
    smp = resolve_sampler(None, None, 9, sch, None, None, {"final_sigmas_type": "sigma_min"})
    assert isinstance(smp, DPMSolverSinglestepSampler)
    got = (smp.prediction_type, smp.sigma_grid, smp.solver_order, smp.solver_type,
           smp.final_sigmas_type, smp.lower_order_final)  # fmt: skip
    assert got == ("v_prediction", "karras", 3, "heun", "sigma_min", False)
    smp = make_sampler("dpm++_single", NoiseSchedule("linear"), 5)
    assert smp.solver_order == 2 and smp.coef64.shape == (5, 12)
    assert smp.lower_order_final  # forced, as diffusers: final sigma zero
    assert smp.config()["solver_order"] == 2 and "solver_order=2" in repr(smp)
    smp = make_sampler("dpm++_single", NoiseSchedule("linear"), 4, solver_type="bh2")
    assert smp.solver_type == "midpoint"


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"solver_order": 0}, "solver_order: expected 1, 2 or 3, got 0"),
        ({"solver_order": 4}, "solver_order"),
        ({"solver_order": 2.0}, "solver_order"),
        ({"solver_order": True}, "solver_order"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"algorithm_type": "deis"}, "algorithm_type"),
        ({"solver_type": "bh3"}, "solver_type"),
        ({"final_sigmas_type": "max"}, "final_sigmas_type"),
        ({"algorithm_type": "dpmsolver"}, "final_sigmas_type: algorithm_type='dpmsolver' needs"),
        (
            {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": True},
            "thresholding: not implemented",
        ),
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "at most one"),
        ({"thresholding": True, "dynamic_thresholding_ratio": 0.0}, "dynamic_thresholding_ratio"),
        ({"thresholding": True, "sample_max_value": -1.0}, "sample_max_value"),
    ],
)
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverSinglestepSampler(NoiseSchedule("linear"), 6, **opts)


def test_coinciding_noise_levels_are_an_error():
    """Karras timesteps repeat near t = 0 at many steps, but the grid's sigmas do not; a spaced
    grid with 1000 steps over 1000 timesteps steps every t: fine. An order-2 call whose anchor
    and intermediate share a sigma divides by zero: ValueError naming steps."""
    smp = DPMSolverSinglestepSampler(NoiseSchedule("linear"), 6)
    smp._sig = np.array([2.0, 1.0, 1.0, 0.5, 0.3, 0.2, 0.0])
    with pytest.raises(ValueError, match="steps: calls 1..3 .* share a noise level"):
        smp._weights(2, 2)


def test_unsupported_scheduler_settings_through_sample():
    """(eta and unknown options: tests/test_sampler_contract.py)"""
    z = torch.randn(SHAPE)
    # flow sigmas and lambda_min_clipped are implemented (tests/test_flow_single_deis.py); flow
    # on a VP sigma grid is not
    bad = {"use_flow_sigmas": True, "use_exponential_sigmas": True}
    with pytest.raises(ValueError, match="use_flow_sigmas: not with use_exponential_sigmas=True"):
        fastdiff.sample(_toy, steps=5, schedule=_scheduler(**bad), noise=z)
    saved = dict(DIFFUSERS_BETAS["linear"], _class_name="DPMSolverSinglestepScheduler",
                 use_karras_sigmas=True, sigma_min=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="sigma_min=0.1"):
        fastdiff.sample(_toy, steps=5, schedule=saved, noise=z)


# ---------------------------------------------------------------------- CLI, half precision
def test_cli_sampler_dpm_single_karras_solver_order(tmp_path, monkeypatch):
    """fastdiff sample --sampler dpm++_single [--karras] [--solver-order 3] reaches sample()."""
    check_cli_karras_solver_order(tmp_path, monkeypatch, "dpm++_single")


@pytest.mark.parametrize("case", backend_cases("unipc_step"), ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_flash_attention_rule(case, dtype):
    """fp16 / bf16 samples and outputs (Karras, heun, orders 2 and 3, 12 calls): our worst
    per-call error vs float64 on the same half inputs is <= 2x diffusers' own error in that dtype
    (measured on cpu / torch: fp16 3.8e-4 vs 2.5e-3, bf16 3.9e-3 vs 1.8e-2); the anchor rides
    through x_c unrounded."""
    dev, backend = case
    for order in (2, 3):
        opts = dict(solver_order=order, solver_type="heun", use_karras_sigmas=True)
        theirs = _scheduler(**opts)
        _set(theirs, 12)
        ours = DPMSolverSinglestepSampler(_schedule(), 12, **opts)
        r, g = ours.sigmas(), torch.Generator().manual_seed(order)
        x, ms, anchor, worst, worst_theirs = torch.randn(2, 4, 9, 7, generator=g), [], None, 0, 0
        for i in range(12):
            mo = (0.6 * torch.randn(x.shape, generator=g) + 0.4 * x.clamp(-3, 3)).to(dtype)
            xh = x.to(dtype)
            if theirs.order_list[i] == 1:
                anchor, ms = xh.double(), []
            ms.append(_m64(xh.double(), mo.double(), float(r[i]), ours))
            ref = _update64(ours, r, i, theirs.order_list[i], anchor, ms)
            with fastdiff.use_backend(backend, op="unipc_step"):
                got = ours.step(mo.to(dev), i, xh.to(dev)).cpu()
            assert got.dtype == dtype
            worst = max(worst, _rel(got, ref))
            worst_theirs = max(worst_theirs, _rel(theirs.step(mo, theirs.timesteps[i], xh)[0], ref))
            x = ref.float()
        assert 0.0 < worst <= 2 * worst_theirs, (order, worst, worst_theirs)


AYS_SD15 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # Align Your Steps, SD 1.5


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_custom_timesteps_match_diffusers(order, final):
    """timesteps= as diffusers' set_timesteps(timesteps=...): per call, and a whole run through
    sample(timesteps=...) vs diffusers' loop; steps defaults to their number."""
    opts = dict(solver_order=order, solver_type="heun", final_sigmas_type=final)
    theirs = _scheduler(**opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.set_timesteps(timesteps=AYS_SD15)
    ours = DPMSolverSinglestepSampler(_schedule(), None, timesteps=AYS_SD15, **opts)
    assert ours.steps == 10 and ours.timesteps.tolist() == AYS_SD15
    _per_step(ours, theirs)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    sch, x = _scheduler(**opts), z
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sch.set_timesteps(timesteps=AYS_SD15)
    for t in sch.timesteps:
        x = sch.step(_toy(x, t.expand(x.shape[0])), t, x).prev_sample
    got = fastdiff.sample(_toy, schedule=_scheduler(**opts), noise=z, timesteps=AYS_SD15)
    ref64 = _float64_loop(ours, z)
    assert 0.0 < _rel(got, x) <= RTOL + _rel(x, ref64)


def test_custom_timesteps_refusals():
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        DPMSolverSinglestepSampler(_schedule(), None, timesteps=AYS_SD15, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="steps: got 5 but 10 custom timesteps"):
        DPMSolverSinglestepSampler(_schedule(), 5, timesteps=AYS_SD15)
    with pytest.raises(ValueError, match="strictly descending"):
        DPMSolverSinglestepSampler(_schedule(), None, timesteps=[10, 500])
