"""DPM-Solver++ ('dpm++') and UniPC ('unipc') on flow-matching models (SANA, Wan 2.1, ...):
diffusers' ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` with
``use_flow_sigmas=True`` step for step.

Grids and model timesteps of set_timesteps (flow_shift, dynamic shifting with mu, UniPC's linear
time shift / shift_terminal / custom sigmas / Karras grid read as flow sigmas, final_sigmas_type),
whole runs against diffusers' loops (orders 1-3, lower_order_final, DPM's SDE variant with the
noise fed, UniPC bh1 / bh2, disable_corrector), sample(schedule=<scheduler or saved config>) and
by name with options, each backend of the fused ops per step under the FlashAttention rule in
fp16 against a float64 restatement of the row, the CUDA-graph loop (faked on CPU), img2img's
start (diffusers' add_noise), convergence to the closed-form flow map of Gaussian data, errors.
"""

from __future__ import annotations

import math
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
from helpers import assert_no_host_sync, backend_cases, case_id

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff._sampler_setup import infer_sampler
from fastdiff.samplers import make_sampler

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler  # noqa: E402

RTOL = 1e-5
SHAPE = (2, 3, 5, 7)
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
CLASSES = {"dpm++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}

# (sampler, scheduler settings, set_timesteps mu)
DPM_CASES = [
    ("dpm++", {}, None),
    ("dpm++", {"flow_shift": 3.0}, None),
    ("dpm++", {"flow_shift": 5.0, "solver_order": 3}, None),
    ("dpm++", {"flow_shift": 3.0, "solver_order": 1}, None),
    ("dpm++", {"use_dynamic_shifting": True}, 0.7),
    ("dpm++", {"flow_shift": 3.0, "final_sigmas_type": "sigma_min"}, None),
    ("dpm++", {"flow_shift": 2.0, "solver_type": "heun", "lower_order_final": False}, None),
    ("dpm++", {"flow_shift": 3.0, "euler_at_final": True, "solver_order": 3}, None),
    ("dpm++", {"flow_shift": 3.0, "algorithm_type": "sde-dpmsolver++"}, None),
    ("dpm++", {"flow_shift": 5.0, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}, None),
    ("dpm++", {"flow_shift": 3.0, "prediction_type": "epsilon"}, None),
    ("dpm++", {"flow_shift": 3.0, "prediction_type": "v_prediction"}, None),
]
UNIPC_CASES = [
    ("unipc", {}, None),
    ("unipc", {"flow_shift": 5.0}, None),  # Wan 2.1 720p
    ("unipc", {"flow_shift": 3.0, "solver_order": 3}, None),
    ("unipc", {"flow_shift": 1.0, "solver_order": 1}, None),
    ("unipc", {"use_dynamic_shifting": True}, 0.8),
    ("unipc", {"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.5),
    ("unipc", {"flow_shift": 3.0, "shift_terminal": 0.1}, None),
    ("unipc", {"flow_shift": 3.0, "final_sigmas_type": "sigma_min"}, None),
    # bh1: diffusers' last step to sigma = 0 is NaN (as on VP grids); sigma_min ends finite
    ("unipc", {"flow_shift": 5.0, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, None),
    ("unipc", {"use_karras_sigmas": True}, None),
    (
        "unipc",
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_order": 3},
        None,
    ),  # fmt: skip
    ("unipc", {"flow_shift": 5.0, "disable_corrector": [0, 2]}, None),
    (
        "unipc",
        {"flow_shift": 5.0, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
        None,
    ),  # fmt: skip
    ("unipc", {"flow_shift": 3.0, "prediction_type": "epsilon"}, None),
]
STEPS = [1, 2, 5, 12, 25]


def _cid(c):
    name, kw, mu = c
    return "-".join([name, *(f"{k}={v}" for k, v in kw.items()), f"mu={mu}"])


def _theirs(name, kw, steps, mu=None, sigmas=None):
    sch = CLASSES[name](**{**FLOW, **kw})
    sch.set_timesteps(steps, mu=mu, **({"sigmas": sigmas} if sigmas is not None else {}))
    return sch


def _ours(name, kw, steps, mu=None, **extra):
    opts = {**FLOW, **kw, **({"mu": mu} if mu is not None else {}), **extra}
    return make_sampler(name, NoiseSchedule("linear"), steps, **opts)


def _noises(steps, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(steps)]


def _their_run(sch, z, noises=None, model=toy):
    x = z.clone()
    for k, t in enumerate(sch.timesteps):
        kw = {"variance_noise": noises[k]} if noises is not None and isinstance(
            sch, DPMSolverMultistepScheduler) else {}  # fmt: skip
        x = sch.step(model(x, t.expand(x.shape[0])), t, x, **kw).prev_sample
    return x


def _our_run(smp, z, noises=None, model=toy):
    x = z.clone()
    for i, t in enumerate(smp.timesteps):
        n = noises[i] if noises is not None and smp.needs_noise(i) else None
        x = smp.step(model(x, t.expand(x.shape[0])), i, x, noise=n)
    return x


# ---------------------------------------------------------------------------- diffusers parity
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", DPM_CASES + UNIPC_CASES, ids=_cid)
def test_whole_run_matches_diffusers(case, steps):
    """Timesteps (int(sigma T)), the grid and the fp32 run equal diffusers' (rel <= 1e-5)."""
    name, kw, mu = case
    if steps == 1 and "shift_terminal" in kw:  # diffusers: 0 / 0, a NaN grid
        with pytest.raises(ValueError, match="shift_terminal: the grid's last sigma is 1"):
            _ours(name, kw, steps, mu)
        return
    theirs, ours = _theirs(name, kw, steps, mu), _ours(name, kw, steps, mu)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    np.testing.assert_array_equal(np.float32(ours._ratios()), theirs.sigmas.numpy())
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    noises = _noises(steps)
    ref = _their_run(theirs, z, noises)
    got = _our_run(ours, z, noises)
    assert torch.isfinite(ref).all() and got.dtype == torch.float32
    err = rel(got, ref)
    assert err <= RTOL, f"rel err {err:.2e}"
    if kw.get("algorithm_type") == "sde-dpmsolver++" and steps > 1:  # the noise is used
        assert rel(_our_run(_ours(name, kw, steps, mu), z, _noises(steps, 8)), ref) > 1e-3


@pytest.mark.parametrize("steps", [3, 10])
def test_unipc_custom_sigmas_match_diffusers(steps):
    """set_timesteps(sigmas=...) (shifted like the default grid); sample() takes the steps from
    their number."""
    sig = np.linspace(1.0, 0.05, steps)
    theirs = _theirs("unipc", {"flow_shift": 2.0}, None, sigmas=sig)
    ours = _ours("unipc", {"flow_shift": 2.0}, steps, sigmas=sig)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ref = _their_run(theirs, z)
    assert rel(_our_run(ours, z), ref) <= RTOL
    got = fastdiff.sample(toy, sampler="unipc", noise=z, sigmas=sig, flow_shift=2.0, **FLOW)
    assert rel(got, ref) <= RTOL


def test_bh1_final_zero_is_finite_where_diffusers_is_nan():
    """UniPC bh1 to sigma = 0: diffusers' last step is NaN (B(h) = -h = -inf times 0); the
    first-order last step is x0, finite."""
    bh1 = {"solver_type": "bh1"}
    theirs, ours = _theirs("unipc", bh1, 5), _ours("unipc", bh1, 5)
    z = torch.randn(SHAPE)
    assert torch.isnan(_their_run(theirs, z)).any()
    assert torch.isfinite(_our_run(ours, z)).all()


@pytest.mark.parametrize("name", ["dpm++", "unipc"])
@pytest.mark.parametrize("saved", [False, True])
def test_sample_through_scheduler_and_by_name(name, saved):
    """sample(schedule=<the flow scheduler or its saved config>) infers the sampler and its
    flow settings; sample(sampler=name, use_flow_sigmas=True, flow_shift=...) is the same run;
    a pipeline's mu is an option."""
    kw = {"flow_shift": 5.0, "solver_order": 3} if name == "unipc" else {"flow_shift": 3.0}
    sch = _theirs(name, kw, 9)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    ref = _their_run(sch, z)
    schedule = dict(sch.config, _class_name=type(sch).__name__) if saved else sch
    assert infer_sampler(schedule) == name
    assert rel(sample_through_scheduler(sch, 9, z) if not saved else
               fastdiff.sample(toy, steps=9, schedule=schedule, noise=z), ref) <= RTOL  # fmt: skip
    got = fastdiff.sample(toy, sampler=name, steps=9, noise=z, **FLOW, **kw)
    assert rel(got, ref) <= RTOL
    dyn = _theirs(name, {"use_dynamic_shifting": True}, 6, mu=0.9)
    got = fastdiff.sample(toy, steps=6, schedule=CLASSES[name](**FLOW, use_dynamic_shifting=True),
                          mu=0.9, noise=z)  # fmt: skip
    assert rel(got, _their_run(dyn, z)) <= RTOL


@pytest.mark.parametrize("name", ["dpm++", "unipc"])
def test_guided_sample_matches_diffusers_on_the_combined_velocity(name):
    cond, uncond = torch.randn(2, 4), torch.randn(2, 4)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))

    def combined(x, t):
        u, c = cond_toy(torch.cat([x, x]), t.repeat(2), torch.cat([uncond, cond])).chunk(2)
        return u + 3.0 * (c - u)

    ref = _their_run(_theirs(name, {"flow_shift": 3.0}, 8), z, model=combined)
    got = fastdiff.sample(cond_toy, sampler=name, steps=8, noise=z, cond=cond, uncond=uncond,
                          guidance_scale=3.0, flow_shift=3.0, **FLOW)  # fmt: skip
    assert rel(got, ref) <= RTOL


# ---------------------------------------------------------------------------- backends, fp16
def _dpm_ref(row, x, v, hist, dtype):
    """DPM-Solver++'s step from the float64 row in ``dtype`` arithmetic (float64: the reference;
    fp16: the eager yardstick): x0 = (x - s v) / a, x_t = c_x x + c_x0 x0 + c_prev m1 + c_prev2
    m2."""
    c = [torch.tensor(float(r), dtype=dtype) for r in row]
    x, v = x.to(dtype), v.to(dtype)
    x0 = (x - c[1] * v) / c[0]
    out = c[2] * x + c[3] * x0
    for k, m in zip((4, 6), hist, strict=False):
        out = out + c[k] * m.to(dtype)
    return out


def _unipc_ref(row, x, v, last, hist, dtype):
    """UniPC's fused step from the float64 row (layout of UniPCSampler's docstring)."""
    c = [torch.tensor(float(r), dtype=dtype) for r in row]
    x, v = x.to(dtype), v.to(dtype)
    m = (x - c[1] * v) / c[0]
    h = [t.to(dtype) for t in hist] + [torch.zeros_like(x)] * (3 - len(hist))
    lst = last.to(dtype) if last is not None else torch.zeros_like(x)
    xc = c[2] * x + c[3] * lst + c[4] * m + c[5] * h[0] + c[6] * h[1] + c[10] * h[2]
    return c[7] * xc + c[8] * m + c[9] * h[0] + c[11] * h[1]


def _trajectory(name, kw, steps):
    """The fp32 run's per-step inputs: (x_i, v_i, history m_{i-1}, ..., UniPC's last)."""
    smp = _ours(name, kw, steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    out, ms, last = [], [], None
    for i, t in enumerate(smp.timesteps):
        v = toy(x, t.expand(SHAPE[0])) + 0.01 * torch.randn(SHAPE)  # not smooth: fresh values
        out.append((x, v, list(reversed(ms))[:3], last))
        if name == "unipc":
            row = smp.coef_table("cpu")[i]
            h = out[-1][2]
            last_ok = last if row[3] != 0 else None
            xc, m, x = smp.step_with_history(v, i, x, row, last_ok, *(h + [None] * 3)[:3])
            last = xc
        else:
            x, m = smp.step(v, i, x, return_x0=True)
        ms.append(m)
    return _ours(name, kw, steps), out


@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
@pytest.mark.parametrize("kw", [{"flow_shift": 3.0, "solver_order": 3},
                                {"flow_shift": 5.0, "final_sigmas_type": "sigma_min"}],
                         ids=["order3", "sigma_min"])  # fmt: skip
def test_dpm_backends_fp16_flashattention_rule(case, kw):
    """Each dpm_solver_2m_step backend per step in fp16 (inputs from a real run): error vs the
    float64 restatement of the row <= 2x the eager fp16 restatement's + one fp16 ulp."""
    dev, backend = case
    smp, traj = _trajectory("dpm++", kw, 7)
    with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
        for i, (x, v, hist, _) in enumerate(traj):
            row = smp.coef64[i]
            hist = hist[: smp._need[i]]
            ref = _dpm_ref(row, x.double(), v.double(), [m.double() for m in hist], torch.float64)
            eager = _dpm_ref(row, x.half(), v.half(), [m.half() for m in hist], torch.float16)
            kws = {"x0_prev": hist[0].half().to(dev) if hist else None}
            if len(hist) > 1:
                kws["x0_prev2"] = hist[1].half().to(dev)
            got = smp.step(v.half().to(dev), i, x.half().to(dev), **kws)
            assert got.dtype == torch.float16 and got.device.type == dev
            err, base = rel(got.cpu(), ref), rel(eager, ref)
            assert err <= 2 * base + 2**-11, f"step {i}: {err:.2e} vs eager {base:.2e}"


@pytest.mark.parametrize("case", backend_cases("unipc_step"), ids=case_id)
@pytest.mark.parametrize("kw", [{"flow_shift": 5.0, "solver_order": 3},
                                {"flow_shift": 3.0, "solver_type": "bh1",
                                 "final_sigmas_type": "sigma_min"}],
                         ids=["order3", "bh1"])  # fmt: skip
def test_unipc_backends_fp16_flashattention_rule(case, kw):
    dev, backend = case
    smp, traj = _trajectory("unipc", kw, 7)
    with fastdiff.use_backend(backend, op="unipc_step"):
        for i, (x, v, hist, last) in enumerate(traj):
            row = smp.coef64[i]
            last = last if row[3] != 0 else None
            ref = _unipc_ref(row, x.double(), v.double(), last, hist, torch.float64)
            eager = _unipc_ref(row, x.half(), v.half(), last, hist, torch.float16)
            h16 = [m.half().to(dev) for m in hist] + [None] * 3
            _, _, got = smp.step_with_history(v.half().to(dev), i, x.half().to(dev),
                                              smp.coef_table(dev)[i],
                                              last.half().to(dev) if last is not None else None,
                                              *h16[:3])  # fmt: skip
            assert got.dtype == torch.float16 and got.device.type == dev
            err, base = rel(got.cpu(), ref), rel(eager, ref)
            assert err <= 2 * base + 2**-11, f"step {i}: {err:.2e} vs eager {base:.2e}"


@pytest.mark.parametrize("name", ["dpm++", "unipc"])
@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
def test_fp32_whole_run_every_backend(name, case):
    """A whole fp32 run on each backend equals diffusers' loop (rel <= 1e-5)."""
    dev, backend = case
    op = "unipc_step" if name == "unipc" else "dpm_solver_2m_step"
    if backend not in fastdiff.available_backends(op, dev):
        pytest.skip(f"{op} has no {backend} backend here")
    kw = {"flow_shift": 5.0, "solver_order": 3}
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ref = _their_run(_theirs(name, kw, 10), z)
    smp, x = _ours(name, kw, 10), z.to(dev)
    with fastdiff.use_backend(backend, op=op):
        for i, t in enumerate(smp.timesteps):
            x = smp.step(toy(x.cpu(), t.expand(2)).to(dev), i, x)
    assert rel(x.cpu(), ref) <= RTOL


# ---------------------------------------------------------------------------- loop, img2img
@torch.no_grad()
@pytest.mark.parametrize(
    "case",
    [GraphCase("dpm++", {**FLOW, "flow_shift": 3.0, "solver_order": 3}),
     GraphCase("dpm++", {**FLOW, "flow_shift": 3.0, "algorithm_type": "sde-dpmsolver++"},
               runs=((1, 7, True), (2, 7, True)), noisy=True),
     GraphCase("unipc", {**FLOW, "flow_shift": 5.0, "solver_order": 3}, hist=4)],
    ids=["dpm++", "dpm++-sde", "unipc"],
)  # fmt: skip
def test_cuda_graph_loop_equals_eager(case, fake_cuda_graphs, monkeypatch):
    """sample(cuda_graph=True)'s loop with the fake graph (tests/conftest.py): the eager loop's
    samples and x0 trajectory, one capture for two runs."""
    check_graph_loop(case, fake_cuda_graphs, monkeypatch)


@pytest.mark.parametrize("name", ["dpm++", "unipc"])
def test_no_host_sync_in_the_loop(name):
    assert_no_host_sync(
        lambda m: fastdiff.sample(m, steps=6, sampler=name, shape=SHAPE[1:], batch_size=2,
                                  flow_shift=3.0, **FLOW),
        toy,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["dpm++", "unipc"])
@pytest.mark.parametrize("begin", [0, 3])
def test_img2img_start_and_run_match_diffusers(name, begin):
    """add_noise at call ``begin`` is diffusers' add_noise there ((1 - s) x0 + s n, its
    _sigma_to_alpha_sigma_t with flow sigmas), and the run from there (warming up again) its
    loop after set_begin_index."""
    kw = {"flow_shift": 3.0, "solver_order": 3}
    sch, smp = _theirs(name, kw, 10), _ours(name, kw, 10)
    g = torch.Generator().manual_seed(9)
    x0, n = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sch.set_begin_index(begin)
    start = sch.add_noise(x0, n, sch.timesteps[begin : begin + 1].repeat(SHAPE[0]))
    ours = smp.add_noise(x0, n, begin)
    assert rel(ours, start) <= 1e-6
    s = float(sch.sigmas[begin])
    assert rel(ours, (1 - s) * x0 + s * n) <= 1e-6
    x = start
    for t in sch.timesteps[begin:]:
        x = sch.step(toy(x, t.expand(2)), t, x).prev_sample
    y = ours
    for i in range(begin, 10):
        y = smp.step(toy(y, smp.timesteps[i].expand(2)), i, y)
    assert rel(y, x) <= RTOL
    got = fastdiff.sample(toy, sampler=name, steps=10, image=x0, strength=0.7, noise=n,
                          **FLOW, **kw)  # fmt: skip
    sch2 = _theirs(name, kw, 10)
    sch2.set_begin_index(3)  # diffusers' get_timesteps: t_start = 10 - int(10 * 0.7)
    x = sch2.add_noise(x0, n, sch2.timesteps[3:4].repeat(2))
    for t in sch2.timesteps[3:]:
        x = sch2.step(toy(x, t.expand(2)), t, x).prev_sample
    assert rel(got, x) <= RTOL


# ---------------------------------------------------------------------------- exact Gaussian flow
def _var(s, tau):
    return (1 - s) ** 2 * tau**2 + s**2


@pytest.mark.parametrize("name,kw,min_ratio", [
    ("dpm++", {"flow_shift": 1.0, "solver_order": 1}, 1.8),
    ("dpm++", {"flow_shift": 3.0, "final_sigmas_type": "sigma_min"}, 3.0),
    ("dpm++", {"flow_shift": 3.0, "solver_order": 3, "final_sigmas_type": "sigma_min"}, 1.6),
    ("unipc", {"flow_shift": 1.0}, 3.0),
    ("unipc", {"flow_shift": 1.0, "solver_order": 3}, 2.5),
])  # fmt: skip
def test_converges_to_the_exact_gaussian_flow_map(name, kw, min_ratio):
    """Data N(mu, tau^2 I): the exact velocity at x_s = (1 - s) x0 + s eps is E[eps - x0 |
    x_s], and the exact flow map from s_0 to s_e is (1 - s_e) mu + sqrt(var(s_e) / var(s_0))
    (x - (1 - s_0) mu), var(s) = (1 - s)^2 tau^2 + s^2. The error against it falls by >=
    min_ratio per doubling of the steps from 32 to 128 (first order: 2x, second: 4x; the
    measured sequences, also the irregular ones at flow_shift 5 that diffusers' schedulers
    share, are in the helper log)."""
    mu, tau = 0.7, 0.5
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for steps in (32, 64, 128):
        smp = _ours(name, kw, steps)
        sig = smp._ratios()
        x = z.clone()
        for i in range(steps):
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
@pytest.mark.parametrize("name", ["dpm++", "unipc"])
@pytest.mark.parametrize(
    "opts,err,match",
    [({"flow_shift": 0.0}, ValueError, "flow_shift"),
     ({"flow_shift": float("nan")}, ValueError, "flow_shift"),
     ({"flow_shift": "3"}, TypeError, "flow_shift: expected a finite float, got str"),
     ({"use_flow_sigmas": 1}, TypeError, "use_flow_sigmas"),
     ({"use_dynamic_shifting": "yes"}, TypeError, "use_dynamic_shifting"),
     ({"time_shift_type": "cubic"}, ValueError, "time_shift_type"),
     ({"mu": float("inf"), "use_dynamic_shifting": True}, ValueError, "mu"),
     ({"use_flow_sigmas": False}, ValueError, "prediction_type"),
     ({"use_exponential_sigmas": True}, ValueError, "use_flow_sigmas"),
     ({"use_beta_sigmas": True}, ValueError, "use_flow_sigmas")],
)  # fmt: skip
def test_bad_options_are_named(name, opts, err, match):
    with pytest.raises(err, match=match):
        _ours(name, opts, 5)


def test_sampler_specific_errors():
    with pytest.raises(ValueError, match="mu: dpm\\+\\+ takes mu only with use_dynamic"):
        _ours("dpm++", {}, 5, mu=0.5)
    with pytest.raises(ValueError, match="time_shift_type"):
        _ours("dpm++", {"use_dynamic_shifting": True, "time_shift_type": "linear"}, 5, mu=0.5)
    with pytest.raises(ValueError, match="use_flow_sigmas: not with use_karras"):
        _ours("dpm++", {"use_karras_sigmas": True}, 5)
    with pytest.raises(ValueError, match="use_flow_sigmas: not with use_lu_lambdas"):
        _ours("dpm++", {"use_lu_lambdas": True}, 5)
    with pytest.raises(ValueError, match="timesteps"):
        _ours("dpm++", {}, 3, timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="mu: use_dynamic_shifting=True needs mu"):
        _ours("unipc", {"use_dynamic_shifting": True}, 5)
    with pytest.raises(ValueError, match="shift_terminal"):
        _ours("unipc", {"shift_terminal": 1.5}, 5)
    with pytest.raises(ValueError, match="shift_terminal: only with use_flow_sigmas"):
        make_sampler("unipc", NoiseSchedule("linear"), 5, shift_terminal=0.1)
    with pytest.raises(ValueError, match="sigmas: custom sigmas need use_flow_sigmas"):
        make_sampler("unipc", NoiseSchedule("linear"), 2, sigmas=[0.9, 0.5])
    with pytest.raises(ValueError, match="sigmas: expected 3"):
        _ours("unipc", {}, 3, sigmas=[0.9, 0.5])
    with pytest.raises(ValueError, match=r"sigmas: expected values in \(0, 1\]"):
        _ours("unipc", {}, 2, sigmas=[1.5, 0.5])
    with pytest.raises(TypeError, match="sigmas"):
        _ours("unipc", {}, 2, sigmas="0.9")
    with pytest.raises(ValueError, match="sigmas: not with use_karras"):
        _ours("unipc", {"use_karras_sigmas": True}, 2, sigmas=[0.9, 0.5])
    # what stays unimplemented is still refused through a scheduler
    sch = UniPCMultistepScheduler(**FLOW, solver_p=DPMSolverMultistepScheduler())
    with warnings.catch_warnings(), pytest.raises(ValueError, match="solver_p"):
        warnings.simplefilter("ignore")
        fastdiff.sample(toy, steps=4, schedule=sch, shape=SHAPE[1:], batch_size=2)
