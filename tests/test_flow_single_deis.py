"""DEIS ('deis') and singlestep DPM-Solver ('dpm++_single') on flow-matching models: diffusers
0.42's ``DEISMultistepScheduler`` / ``DPMSolverSinglestepScheduler`` with ``use_flow_sigmas=True``
step for step; singlestep's ``lambda_min_clipped``.

Grids and model timesteps (flow_shift, dynamic shifting with mu, final_sigmas_type), whole runs
against diffusers' loops, sample(schedule=<scheduler or saved config>) and by name, each backend
of unipc_step per step under the FlashAttention rule in fp16 against a float64 restatement of
the row, fp32 whole runs per backend, the CUDA-graph loop (faked on CPU), img2img's start and
run, convergence to the closed-form flow map of Gaussian data, errors.

DEIS integrates the noise estimate eps = x + (1 - s) v (flow_prediction) with weights of order
rho = s / (1 - s) ~ 3000 at the first step: x_t = (alpha_t / alpha_s) x + alpha_t w eps cancels
~1500-fold, so an fp32 run carries ~1e-4 relative rounding error whoever computes it (diffusers'
own fp32 loop included). Non-epsilon DEIS runs are therefore compared with diffusers' loop in
float64 (its sigmas cast to float64 too: its float32 coefficients alone differ by ~3e-5 there),
bound 1e-5 + diffusers' own fp32 error against it; measured, ours is ~3x closer than diffusers'
fp32 loop. The same holds for singlestep's noise-space "dpmsolver" on a v_prediction model
(eps = alpha v + sigma x). Everything else is compared with diffusers' fp32 loop at rel <= 1e-5.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from _sampler_cases import (
    GraphCase,
    check_graph_loop,
    cond_toy,
    rel,
    sample_through_scheduler,
    toy,
)
from helpers import DIFFUSERS_BETAS, assert_no_host_sync, backend_cases, case_id

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff._sampler_setup import infer_sampler
from fastdiff.samplers import make_sampler

diffusers = pytest.importorskip("diffusers")

RTOL = 1e-5
SHAPE = (2, 3, 5, 7)
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
CLASSES = {"deis": "DEISMultistepScheduler", "dpm++_single": "DPMSolverSinglestepScheduler"}

# (sampler, scheduler settings, set_timesteps mu)
DEIS_CASES = [
    ("deis", {}, None),
    ("deis", {"flow_shift": 3.0}, None),
    ("deis", {"flow_shift": 5.0, "solver_order": 3}, None),
    ("deis", {"flow_shift": 3.0, "solver_order": 1}, None),
    ("deis", {"use_dynamic_shifting": True}, 0.7),
    ("deis", {"flow_shift": 3.0, "solver_order": 3, "lower_order_final": False}, None),
    ("deis", {"flow_shift": 3.0, "timestep_spacing": "trailing", "steps_offset": 1}, None),
    ("deis", {"flow_shift": 3.0, "thresholding": True, "sample_max_value": 1.5}, None),
    ("deis", {"flow_shift": 3.0, "prediction_type": "epsilon", "solver_order": 3}, None),
    ("deis", {"flow_shift": 3.0, "prediction_type": "v_prediction"}, None),
    ("deis", {"flow_shift": 3.0, "prediction_type": "sample"}, None),
]
SINGLE_CASES = [
    ("dpm++_single", {}, None),
    ("dpm++_single", {"flow_shift": 3.0}, None),
    ("dpm++_single", {"flow_shift": 5.0, "solver_order": 3}, None),
    ("dpm++_single", {"flow_shift": 3.0, "solver_order": 1}, None),
    ("dpm++_single", {"use_dynamic_shifting": True}, 0.7),
    ("dpm++_single", {"flow_shift": 3.0, "solver_order": 3, "solver_type": "heun",
                      "final_sigmas_type": "sigma_min"}, None),
    ("dpm++_single", {"flow_shift": 3.0, "lower_order_final": False,
                      "final_sigmas_type": "sigma_min"}, None),
    ("dpm++_single", {"flow_shift": 3.0, "thresholding": True, "sample_max_value": 1.5}, None),
    ("dpm++_single", {"flow_shift": 3.0, "prediction_type": "epsilon",
                      "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, None),
    ("dpm++_single", {"flow_shift": 3.0, "prediction_type": "v_prediction",
                      "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, None),
    ("dpm++_single", {"flow_shift": 3.0, "prediction_type": "v_prediction"}, None),
    ("dpm++_single", {"flow_shift": 3.0, "prediction_type": "sample", "solver_order": 3}, None),
]  # fmt: skip
STEPS = [1, 2, 5, 12, 25]


def _cid(c):
    name, kw, mu = c
    return "-".join([name, *(f"{k}={v}" for k, v in kw.items()), f"mu={mu}"])


def _theirs(name, kw, steps, mu=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singlestep: "dpmsolver" deprecated, lower_order_final
        sch = getattr(diffusers, CLASSES[name])(**{**FLOW, **kw})
        sch.set_timesteps(steps, mu=mu)
    return sch


def _ours(name, kw, steps, mu=None, **extra):
    opts = {**FLOW, **kw, **({"mu": mu} if mu is not None else {}), **extra}
    return make_sampler(name, NoiseSchedule("linear"), steps, **opts)


def _their_run(sch, z, model=toy, dtype=torch.float32, start=0):
    """diffusers' loop from call ``start``; float64: x, model outputs and its sigmas (so its
    step coefficients) in float64."""
    if dtype == torch.float64:
        sch.sigmas = sch.sigmas.double()
    x = z.clone().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in sch.timesteps[start:]:
            x = sch.step(model(x, t.expand(x.shape[0])).to(dtype), t, x).prev_sample
    return x


def _our_run(smp, z, model=toy, start=0):
    x = z.clone()
    for i in range(start, smp.steps):
        x = smp.step(model(x, smp.timesteps[i].expand(x.shape[0])), i, x)
    return x


# ---------------------------------------------------------------------------- diffusers parity
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", DEIS_CASES + SINGLE_CASES, ids=_cid)
def test_whole_run_matches_diffusers(case, steps):
    """Timesteps (int(s T)) and the float32 grid equal diffusers'; the fp32 run is within 1e-5
    of diffusers' fp32 loop, or (a noise-space solver, DEIS or singlestep "dpmsolver", on a
    non-epsilon model: see the module docstring) within 1e-5 + diffusers' own fp32 error of its
    float64 loop."""
    name, kw, mu = case
    theirs, ours = _theirs(name, kw, steps, mu), _ours(name, kw, steps, mu)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    np.testing.assert_array_equal(np.float32(ours.sigmas()), theirs.sigmas.numpy())
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    got = _our_run(ours, z)
    ref32 = _their_run(theirs, z)
    ref64 = _their_run(_theirs(name, kw, steps, mu), z.double(), dtype=torch.float64)
    assert torch.isfinite(ref32).all() and got.dtype == torch.float32
    eps_space = name == "deis" or kw.get("algorithm_type") == "dpmsolver"
    ill = eps_space and kw.get("prediction_type", FLOW["prediction_type"]) != "epsilon"
    if ill:
        err, bound = rel(got, ref64), RTOL + rel(ref32, ref64)
    else:
        err, bound = rel(got, ref32), RTOL
    assert err <= bound, f"rel err {err:.2e} > {bound:.2e}"
    assert rel(got, ref64) <= RTOL + rel(ref32, ref64)


@pytest.mark.parametrize("name", ["deis", "dpm++_single"])
@pytest.mark.parametrize("saved", [False, True])
def test_sample_through_scheduler_and_by_name(name, saved):
    """sample(schedule=<the flow scheduler or its saved config>) infers the sampler and its
    flow settings; by name with the options it is the same run; a pipeline's mu is an option."""
    kw = {"flow_shift": 3.0, "solver_order": 3, "prediction_type": "epsilon"}
    sch = _theirs(name, kw, 9)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    ref = _their_run(sch, z)
    schedule = dict(sch.config, _class_name=type(sch).__name__) if saved else sch
    assert infer_sampler(schedule) == name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DPMSolverSinglestep: lower_order_final forced on
        got = (sample_through_scheduler(sch, 9, z) if not saved else
               fastdiff.sample(toy, steps=9, schedule=schedule, noise=z))  # fmt: skip
    assert rel(got, ref) <= RTOL
    got = fastdiff.sample(toy, sampler=name, steps=9, noise=z, **{**FLOW, **kw})
    assert rel(got, ref) <= RTOL
    # the check can fail: the VP grid samples differently
    assert rel(fastdiff.sample(toy, sampler=name, steps=9, noise=z), ref) > 1e-2
    dyn = _theirs(name, {"use_dynamic_shifting": True, "prediction_type": "epsilon"}, 6, mu=0.9)
    sch = getattr(diffusers, CLASSES[name])(use_flow_sigmas=True, use_dynamic_shifting=True)
    got = fastdiff.sample(toy, steps=6, schedule=sch, mu=0.9, noise=z)
    assert rel(got, _their_run(dyn, z)) <= RTOL


@pytest.mark.parametrize("name", ["deis", "dpm++_single"])
def test_guided_sample_matches_diffusers_on_the_combined_output(name):
    cond, uncond = torch.randn(2, 4), torch.randn(2, 4)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    kw = {"flow_shift": 3.0, "prediction_type": "epsilon"}

    def combined(x, t):
        u, c = cond_toy(torch.cat([x, x]), t.repeat(2), torch.cat([uncond, cond])).chunk(2)
        return u + 3.0 * (c - u)

    ref = _their_run(_theirs(name, kw, 8), z, model=combined)
    got = fastdiff.sample(cond_toy, sampler=name, steps=8, noise=z, cond=cond, uncond=uncond,
                          guidance_scale=3.0, **{**FLOW, **kw})  # fmt: skip
    assert rel(got, ref) <= RTOL


def _clipped(sched, lmc, steps):
    """diffusers' singlestep scheduler (solver_order 3) on ``sched`` with lambda_min_clipped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sch = diffusers.DPMSolverSinglestepScheduler(**DIFFUSERS_BETAS[sched], solver_order=3,
                                                     lambda_min_clipped=lmc)  # fmt: skip
        sch.set_timesteps(steps)
    return sch


@pytest.mark.parametrize("steps", [5, 12])
@pytest.mark.parametrize("lmc,sched", [(-5.1, "cosine"), (-3.0, "linear"),
                                       (-1.0, "scaled_linear"), (-math.inf, "linear")])  # fmt: skip
def test_singlestep_lambda_min_clipped_matches_diffusers(lmc, sched, steps):
    """The spaced grid stops where lambda_t < lambda_min_clipped: timesteps and the run equal
    diffusers' (and clipping changes them), by options and through the scheduler."""
    sch = _clipped(sched, lmc, steps)
    schedule = NoiseSchedule.from_diffusers(sch)
    smp = make_sampler("dpm++_single", schedule, steps, solver_order=3, lambda_min_clipped=lmc)
    assert smp.timesteps.tolist() == sch.timesteps.tolist()
    plain = make_sampler("dpm++_single", schedule, steps, solver_order=3)
    assert (smp.timesteps[0] < plain.timesteps[0]) == (lmc != -math.inf)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ref = _their_run(sch, z)
    assert rel(_our_run(smp, z), ref) <= RTOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fastdiff.sample(toy, steps=steps, schedule=_clipped(sched, lmc, steps), noise=z)
    assert rel(got, ref) <= RTOL


@pytest.mark.parametrize("sched", ["cosine", "linear", "scaled_linear"])
def test_singlestep_lambda_min_clipped_at_a_training_lambda(sched):
    """lambda_min_clipped equal to one of diffusers' float32 lambda_t (or a float32 step off):
    the cut is where diffusers' searchsorted puts it (float64 lambdas moved it by one t)."""
    lam = _clipped(sched, -math.inf, 7).lambda_t
    for k in (990, 900, 700, 500, 100):
        for lmc in (float(lam[k]), float(np.nextafter(lam[k].numpy(), np.float32(9)))):
            sch = _clipped(sched, lmc, 7)
            smp = make_sampler("dpm++_single", NoiseSchedule.from_diffusers(sch), 7,
                               solver_order=3, lambda_min_clipped=lmc)  # fmt: skip
            assert smp.timesteps.tolist() == sch.timesteps.tolist(), (k, lmc)


def test_multistep_lambda_min_clipped_at_a_training_lambda():
    """dpm++ (multistep) cuts at diffusers' float32 lambda_t too (float64 -log(rho) moved the
    first timestep by one at 3 of these 5 values)."""
    bad = []
    for k in (990, 900, 700, 500, 100):
        lam = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear").lambda_t
        sch = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear",
                                                    lambda_min_clipped=float(lam[k]))  # fmt: skip
        sch.set_timesteps(7)
        smp = make_sampler("dpm++", NoiseSchedule.from_diffusers(sch), 7,
                           lambda_min_clipped=float(lam[k]))  # fmt: skip
        if smp.timesteps.tolist() != sch.timesteps.tolist():
            bad.append(k)
    assert bad == []


EPS_SINGLE = {"prediction_type": "epsilon", "algorithm_type": "dpmsolver",
              "final_sigmas_type": "sigma_min"}  # fmt: skip


@pytest.mark.parametrize("name,kw", [("deis", {"flow_shift": 3.0}),
                                     ("deis", {"flow_shift": 3.0, "prediction_type": "epsilon"}),
                                     ("dpm++_single", {"flow_shift": 3.0}),
                                     ("dpm++_single", EPS_SINGLE)])  # fmt: skip
def test_trajectory_x0_is_the_flow_x0(name, kw):
    """return_trajectory's x0 rows are the flow x0 of each call: x - s v for a velocity, (x - s
    eps) / (1 - s) for a noise prediction (DEIS and "dpmsolver" keep eps as their history)."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    opts = {**FLOW, **kw}
    _, traj = fastdiff.sample(toy, sampler=name, steps=6, noise=z, return_trajectory=True, **opts)
    sig = _ours(name, kw, 6).sigmas()
    for i, t in enumerate(traj["timesteps"]):
        x, out, s = traj["x"][i].double(), toy(traj["x"][i], t.expand(2)).double(), sig[i]
        want = (
            x - s * out if opts["prediction_type"] == "flow_prediction" else (x - s * out) / (1 - s)
        )
        tol = 1e-3 if i == 0 else 1e-4  # DEIS: x0 from eps divides by 1 - s ~ 3e-4 at i = 0
        assert rel(traj["x0"][i], want) <= tol, f"call {i}"


# ---------------------------------------------------------------------------- backends, fp16
def _unipc_ref(row, x, v, last, hist, pred, dtype):
    """unipc_step from the float64 row in ``dtype`` arithmetic: m from the op's prediction type
    (epsilon: (x - s v) / a; v_prediction: a x - s v), x_c, x_next (UniPCSampler's layout)."""
    c = [torch.tensor(float(r), dtype=dtype) for r in row]
    x, v = x.to(dtype), v.to(dtype)
    m = (x - c[1] * v) / c[0] if pred == "epsilon" else c[0] * x - c[1] * v
    h = [t.to(dtype) for t in hist] + [torch.zeros_like(x)] * (3 - len(hist))
    lst = last.to(dtype) if last is not None else torch.zeros_like(x)
    xc = c[2] * x + c[3] * lst + c[4] * m + c[5] * h[0] + c[6] * h[1] + c[10] * h[2]
    return c[7] * xc + c[8] * m + c[9] * h[0] + c[11] * h[1]


def _trajectory(name, kw, steps):
    """The fp32 run's per-step inputs: (x_i, v_i, [m_{i-1}, m_{i-2}], anchor or None)."""
    smp = _ours(name, kw, steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    out, ms, last = [], [], None
    for i, t in enumerate(smp.timesteps):
        v = toy(x, t.expand(SHAPE[0])) + 0.01 * torch.randn(SHAPE)  # not smooth: fresh values
        row = smp.coef_table("cpu")[i]
        hist = list(reversed(ms))[:2]
        out.append((x, v, hist, last if row[3] != 0 else None))
        xc, m, x = smp.step_with_history(v, i, x, row, out[-1][3], *(hist + [None] * 2)[:2])
        last = xc
        ms.append(m)
    return _ours(name, kw, steps), out


@pytest.mark.parametrize("case", backend_cases("unipc_step"), ids=case_id)
@pytest.mark.parametrize("name,kw", [("deis", {"flow_shift": 3.0, "solver_order": 3}),
                                     ("dpm++_single", {"flow_shift": 5.0, "solver_order": 3}),
                                     ("dpm++_single", {"flow_shift": 3.0, "solver_type": "heun",
                                                       "final_sigmas_type": "sigma_min"})],
                         ids=["deis", "single3", "single-heun"])  # fmt: skip
def test_backends_fp16_flashattention_rule(case, name, kw):
    """Each unipc_step backend per step in fp16 (inputs from a real run): error vs the float64
    restatement of the row <= 2x the eager fp16 restatement's + one fp16 ulp."""
    dev, backend = case
    smp, traj = _trajectory(name, kw, 8)
    pred = smp._op_prediction()
    with fastdiff.use_backend(backend, op="unipc_step"):
        for i, (x, v, hist, last) in enumerate(traj):
            row = smp.coef64[i]
            ref = _unipc_ref(row, x.double(), v.double(), last, hist, pred, torch.float64)
            eager = _unipc_ref(row, x.half(), v.half(), last, hist, pred, torch.float16)
            h16 = [m.half().to(dev) for m in hist] + [None] * 2
            _, _, got = smp.step_with_history(v.half().to(dev), i, x.half().to(dev),
                                              smp.coef_table(dev)[i],
                                              last.half().to(dev) if last is not None else None,
                                              *h16[:2])  # fmt: skip
            assert got.dtype == torch.float16 and got.device.type == dev
            err, base = rel(got.cpu(), ref), rel(eager, ref)
            assert err <= 2 * base + 2**-11, f"step {i}: {err:.2e} vs eager {base:.2e}"


@pytest.mark.parametrize("name", ["deis", "dpm++_single"])
@pytest.mark.parametrize("case", backend_cases("unipc_step"), ids=case_id)
def test_fp32_whole_run_every_backend(name, case):
    """A whole fp32 run on each backend equals diffusers' loop (rel <= 1e-5; DEIS with an
    epsilon model, singlestep with a velocity model)."""
    dev, backend = case
    kw = {"flow_shift": 5.0, "solver_order": 3}
    if name == "deis":
        kw["prediction_type"] = "epsilon"
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ref = _their_run(_theirs(name, kw, 10), z)
    smp, x = _ours(name, kw, 10), z.to(dev)
    with fastdiff.use_backend(backend, op="unipc_step"):
        for i, t in enumerate(smp.timesteps):
            x = smp.step(toy(x.cpu(), t.expand(2)).to(dev), i, x)
    assert rel(x.cpu(), ref) <= RTOL


# ---------------------------------------------------------------------------- loop, img2img
@torch.no_grad()
@pytest.mark.parametrize(
    "case",
    [GraphCase("deis", {**FLOW, "flow_shift": 3.0, "solver_order": 3}, hist=4),
     GraphCase("dpm++_single", {**FLOW, "flow_shift": 3.0, "solver_order": 3}, hist=4)],
    ids=["deis", "dpm++_single"],
)  # fmt: skip
def test_cuda_graph_loop_equals_eager(case, fake_cuda_graphs, monkeypatch):
    """sample(cuda_graph=True)'s loop with the fake graph (tests/conftest.py): the eager loop's
    samples and x0 trajectory, one capture for two runs."""
    check_graph_loop(case, fake_cuda_graphs, monkeypatch)


@pytest.mark.parametrize("name", ["deis", "dpm++_single"])
def test_no_host_sync_in_the_loop(name):
    assert_no_host_sync(
        lambda m: fastdiff.sample(m, steps=6, sampler=name, shape=SHAPE[1:], batch_size=2,
                                  flow_shift=3.0, **FLOW),
        toy,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["deis", "dpm++_single"])
@pytest.mark.parametrize("begin", [0, 3])
def test_img2img_start_and_run_match_diffusers(name, begin):
    """add_noise at call ``begin`` is diffusers' add_noise there ((1 - s) x0 + s n), and the
    run from there (warming up again) its loop after set_begin_index; sample(image=,
    strength=0.7) starts at call 3 as diffusers' img2img pipelines."""
    kw = {"flow_shift": 3.0, "solver_order": 3, "prediction_type": "epsilon"}
    sch, smp = _theirs(name, kw, 10), _ours(name, kw, 10)
    g = torch.Generator().manual_seed(9)
    x0, n = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sch.set_begin_index(begin)
    start = sch.add_noise(x0, n, sch.timesteps[begin : begin + 1].repeat(SHAPE[0]))
    ours = smp.add_noise(x0, n, begin)
    assert rel(ours, start) <= 1e-6
    s = float(sch.sigmas[begin])
    assert rel(ours, (1 - s) * x0 + s * n) <= 1e-6
    assert rel(_our_run(smp, ours, start=begin), _their_run(sch, start, start=begin)) <= RTOL
    got = fastdiff.sample(toy, sampler=name, steps=10, image=x0, strength=0.7, noise=n,
                          **{**FLOW, **kw})  # fmt: skip
    sch2 = _theirs(name, kw, 10)
    sch2.set_begin_index(3)  # diffusers' get_timesteps: t_start = 10 - int(10 * 0.7)
    x = sch2.add_noise(x0, n, sch2.timesteps[3:4].repeat(2))
    assert rel(got, _their_run(sch2, x, start=3)) <= RTOL


# ---------------------------------------------------------------------------- exact Gaussian flow
def _var(s, tau):
    return (1 - s) ** 2 * tau**2 + s**2


@pytest.mark.parametrize("name,kw,steps,min_ratio", [
    ("deis", {"solver_order": 1}, (32, 64, 128), 1.8),
    ("deis", {"solver_order": 2}, (8, 16, 32), 4.0),
    ("dpm++_single", {"solver_order": 1, "final_sigmas_type": "sigma_min"}, (32, 64, 128), 1.8),
    ("dpm++_single", {"solver_order": 2, "final_sigmas_type": "sigma_min"}, (32, 64, 128), 3.0),
    ("dpm++_single", {"solver_order": 2}, (32, 64, 128), 3.0),
])  # fmt: skip
def test_converges_to_the_exact_gaussian_flow_map(name, kw, steps, min_ratio):
    """Data N(mu, tau^2 I): the exact velocity at x_s = (1 - s) x0 + s eps is E[eps - x0 |
    x_s]; the exact flow map from s_0 to s_e is (1 - s_e) mu + sqrt(var(s_e) / var(s_0)) (x -
    (1 - s_0) mu), var(s) = (1 - s)^2 tau^2 + s^2. The error against it falls by >= min_ratio
    per doubling of the steps (first order: 2x, second: 4x). DEIS order 2 is measured at 8 to
    32 steps: from 32 on its fp32 error floor (~3e-4, the first step's cancellation, module
    docstring) hides the discretisation error (measured 5.0e-2, 6.2e-3, 4.9e-4, 6.0e-4, 2.6e-4
    at 8 .. 128 steps)."""
    mu, tau = 0.7, 0.5
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for n in steps:
        smp = _ours(name, kw, n)
        sig = smp.sigmas()
        x = z.clone()
        for i in range(n):
            s = sig[i]
            d = x - (1 - s) * mu
            v = -mu + (s - (1 - s) * tau**2) / _var(s, tau) * d
            x = smp.step(v.float(), i, x.float()).double()
        e = sig[-1]
        exact = (1 - e) * mu + math.sqrt(_var(e, tau) / _var(sig[0], tau)) * (z - (1 - sig[0]) * mu)
        errs.append((x - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errs, errs[1:], strict=False)]
    assert all(r >= min_ratio for r in ratios), f"errors {errs}, ratios {ratios}"


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", ["deis", "dpm++_single"])
@pytest.mark.parametrize(
    "opts,err,match",
    [({"flow_shift": 0.0}, ValueError, "flow_shift"),
     ({"flow_shift": float("nan")}, ValueError, "flow_shift"),
     ({"use_flow_sigmas": 1}, TypeError, "use_flow_sigmas"),
     ({"use_dynamic_shifting": "yes"}, TypeError, "use_dynamic_shifting"),
     ({"time_shift_type": "linear"}, ValueError, "time_shift_type"),
     ({"mu": 0.5}, ValueError, "takes mu only with use_dynamic_shifting"),
     ({"mu": float("inf"), "use_dynamic_shifting": True}, ValueError, "mu"),
     ({"use_flow_sigmas": False}, ValueError, "prediction_type: 'flow_prediction' needs"),
     ({"use_karras_sigmas": True}, ValueError, "use_flow_sigmas: not with use_karras"),
     ({"use_exponential_sigmas": True}, ValueError, "use_flow_sigmas: not with use_exp"),
     ({"use_beta_sigmas": True}, ValueError, "use_flow_sigmas: not with use_beta")],
)  # fmt: skip
def test_bad_options_are_named(name, opts, err, match):
    with pytest.raises(err, match=match):
        _ours(name, opts, 5)


@pytest.mark.parametrize("name", ["deis", "dpm++_single"])
def test_mu_error_names_the_sampler(name):
    with pytest.raises(ValueError, match=f"mu: {re.escape(name)} takes mu only with use_dyn"):
        _ours(name, {}, 5, mu=0.5)


def test_singlestep_specific_errors():
    with pytest.raises(ValueError, match="timesteps: custom timesteps cannot be combined"):
        _ours("dpm++_single", {}, 3, timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="needs algorithm_type='dpmsolver\\+\\+'"):
        _ours("dpm++_single", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, 5)
    lin = NoiseSchedule("linear")
    for bad, err in ((float("nan"), ValueError), (float("inf"), ValueError), ("-3", TypeError),
                     (True, TypeError), (30.0, ValueError)):  # fmt: skip
        with pytest.raises(err, match="lambda_min_clipped"):
            make_sampler("dpm++_single", lin, 5, lambda_min_clipped=bad)
    # the SDE at order 3 runs (on the flow grid too: tests/test_dpm_single_sde.py)
    sde3 = _ours("dpm++_single", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, 6)
    assert sde3.step_orders == (1, 2, 3, 1, 2, 1) and sde3.coef_width == 9
