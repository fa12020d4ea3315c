"""DPM-Solver++ 3M (``solver_order=3``, ODE and SDE) and the other DPMSolverMultistepScheduler
settings (``solver_order`` 1, ``solver_type="heun"``, ``euler_at_final``, ``use_lu_lambdas``,
``lambda_min_clipped``) against diffusers 0.42's ``DPMSolverMultistepScheduler``.

Per step (same x, model output and noise fed to both; relative error <= 1e-5 in fp32, as
tests/test_samplers_parity.py), over whole runs through ``fastdiff.sample`` (options and
``schedule=<diffusers scheduler>``), the folded coefficient rows against a float64 restatement of
diffusers' update formulas, img2img starts and reused samplers, every backend, the CUDA-graph
loop (fake graphs on CPU), and the settings still refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PARITY_RTOL, PARITY_SHAPE, backend_cases, case_id, record_sample_calls
from test_euler_ancestral import _gens, _graphed_equals_eager, _Net
from test_samplers_parity import _loop, _model_output, _rel, _schedule

import fastdiff
from fastdiff._sampler_setup import resolve_sampler
from fastdiff.samplers import DPMSolverPPSampler

diffusers = pytest.importorskip("diffusers")

ODE, SDE = "dpmsolver++", "sde-dpmsolver++"
PREDS = ["epsilon", "v_prediction", "sample"]


def _pair(steps: int, sched: str = "scaled_linear", **kw):
    """(ours, theirs) with the same settings, diffusers' timesteps set."""
    sch, cfg = _schedule(sched)
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg, **kw)
    theirs.set_timesteps(steps)
    return DPMSolverPPSampler(sch, steps, **kw), theirs


def _record_orders(theirs) -> list[int]:
    """Wrap diffusers' three update methods on the instance: the order each step ran."""
    orders: list[int] = []
    for order, name in enumerate(("dpm_solver_first_order_update",
                                  "multistep_dpm_solver_second_order_update",
                                  "multistep_dpm_solver_third_order_update"), 1):  # fmt: skip
        fn = getattr(theirs, name)

        def wrapped(*a, _fn=fn, _order=order, **k):
            orders.append(_order)
            return _fn(*a, **k)

        setattr(theirs, name, wrapped)
    return orders


def _step_parity(ours, theirs, steps: int, seed: int = 0) -> float:
    """Step by step with the same noise fed to both (diffusers' ``variance_noise``)."""
    g = torch.Generator().manual_seed(seed + 100)
    sde = ours.algorithm_type == SDE

    def noise(i, t):
        return torch.randn(PARITY_SHAPE, generator=g) if sde else None

    def step(mo, t, x, z):
        return theirs.step(mo, t, x, variance_noise=z).prev_sample

    return _loop(ours, theirs, step, steps, noise_fn=noise, seed=seed)


def _whole_run_rel(steps: int, **kw) -> float:
    """Both loops run on their own from the same x_T (a fixed x-dependent stand-in model, the
    same noise sequence): relative difference of the final samples."""
    ours, theirs = _pair(steps, **kw)
    g = torch.Generator().manual_seed(21)
    x_T = torch.randn(PARITY_SHAPE, generator=g)
    zs = [torch.randn(PARITY_SHAPE, generator=g) for _ in range(steps)]

    def model(x, t):
        return 0.8 * torch.tanh(x) + 0.05 * math.sin(float(t) / 50.0)

    x = y = x_T
    for i, t in enumerate(theirs.timesteps):
        z = zs[i] if ours.algorithm_type == SDE else None
        x = theirs.step(model(x, t), t, x, variance_noise=z).prev_sample
        y = ours.step(model(y, t), i, y, noise=z)
    return _rel(y, x)


# ------------------------------------------------------------------------- orders 1 / 2 / 3
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("lof", [True, False], ids=["lof", "no-lof"])
@pytest.mark.parametrize("algo", [ODE, SDE])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_step_parity_per_order(order, algo, lof, steps, pred):
    """Every step equals diffusers' (rel. err <= 1e-5 fp32), the order of each step is the one
    diffusers' lower_order_nums / lower_order_final / lower_order_second pick, and whole runs
    from the same x_T (each loop on its own outputs) end within 1e-5."""
    ours, theirs = _pair(steps, solver_order=order, algorithm_type=algo, lower_order_final=lof,
                         prediction_type=pred)  # fmt: skip
    ran = _record_orders(theirs)
    assert _step_parity(ours, theirs, steps) <= PARITY_RTOL
    assert list(ours.step_orders) == ran
    whole = _whole_run_rel(steps, solver_order=order, algorithm_type=algo, lower_order_final=lof,
                           prediction_type=pred)  # fmt: skip
    assert whole <= PARITY_RTOL, whole
    if order == 3:  # not vacuous: the third-order rows are used and read m_{i-2}
        assert 3 in ran and all((ours.coef64[i, 6] != 0) == (o == 3) for i, o in enumerate(ran))


@pytest.mark.parametrize(
    "sched,opts,steps",
    [
        ("scaled_linear", dict(use_karras_sigmas=True), 10),
        ("linear", dict(use_karras_sigmas=True, algorithm_type=SDE), 20),
        ("scaled_linear", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), 10),
        ("scaled_linear", dict(use_exponential_sigmas=True, algorithm_type=SDE), 12),
        ("cosine", dict(timestep_spacing="trailing", prediction_type="v_prediction"), 15),
        ("linear", dict(timestep_spacing="leading", steps_offset=1), 25),
        ("scaled_linear", dict(thresholding=True, sample_max_value=1.5), 10),
    ],
    ids=["karras", "karras-sde", "karras-sigma_min", "exp-sde", "cosine-v", "leading", "thresh"],
)
def test_third_order_parity_with_sigma_grids_and_options(sched, opts, steps):
    ours, theirs = _pair(steps, sched, solver_order=3, **opts)
    ran = _record_orders(theirs)
    assert _step_parity(ours, theirs, steps, seed=3) <= PARITY_RTOL
    assert list(ours.step_orders) == ran and 3 in ran


# ------------------------------------------------------------------------ host-only settings
SETTINGS = [
    ("scaled_linear", dict(solver_type="heun"), 8),
    ("scaled_linear", dict(solver_type="heun", algorithm_type=SDE), 20),
    ("linear", dict(solver_type="heun", use_karras_sigmas=True, prediction_type="v_prediction"),
     12),
    ("scaled_linear", dict(solver_type="heun", solver_order=3), 10),  # 3M ignores solver_type
    ("scaled_linear", dict(euler_at_final=True, final_sigmas_type="sigma_min"), 20),
    ("scaled_linear", dict(euler_at_final=True, final_sigmas_type="sigma_min",
                           use_karras_sigmas=True, solver_order=3, algorithm_type=SDE), 16),
    ("linear", dict(euler_at_final=True, lower_order_final=False), 8),
    ("scaled_linear", dict(use_lu_lambdas=True), 10),
    ("linear", dict(use_lu_lambdas=True, solver_order=3, algorithm_type=SDE), 20),
    ("cosine", dict(use_lu_lambdas=True, solver_order=3, prediction_type="v_prediction"), 12),
    ("scaled_linear", dict(use_lu_lambdas=True, final_sigmas_type="sigma_min",
                           lower_order_final=False), 8),
    ("scaled_linear", dict(use_lu_lambdas=True, use_karras_sigmas=True), 10),  # Karras wins
    ("scaled_linear", dict(use_lu_lambdas=True, use_exponential_sigmas=True), 10),  # Lu wins
    ("cosine", dict(lambda_min_clipped=-5.1), 10),
    ("cosine", dict(lambda_min_clipped=-5.1, timestep_spacing="leading", solver_order=3), 20),
    ("cosine", dict(lambda_min_clipped=-5.1, timestep_spacing="trailing", algorithm_type=SDE),
     10),
    ("cosine", dict(lambda_min_clipped=-3.0, solver_order=3, prediction_type="v_prediction"), 15),
    ("scaled_linear", dict(lambda_min_clipped=-1.0, use_karras_sigmas=True), 10),  # unused
]  # fmt: skip
SETTING_IDS = ["heun", "heun-sde", "heun-karras-v", "heun-3m", "eaf-sigma_min", "eaf-karras-3m-sde",
               "eaf-no-lof", "lu", "lu-3m-sde", "lu-cosine-3m", "lu-sigma_min", "lu+karras",
               "lu+exp", "clip", "clip-leading-3m", "clip-trailing-sde", "clip-3-3m-v",
               "clip-karras"]  # fmt: skip


@pytest.mark.parametrize("sched,opts,steps", SETTINGS, ids=SETTING_IDS)
def test_settings_step_parity(sched, opts, steps):
    ours, theirs = _pair(steps, sched, **opts)
    ran = _record_orders(theirs)
    assert _step_parity(ours, theirs, steps, seed=5) <= PARITY_RTOL
    assert list(ours.step_orders) == ran


def test_settings_change_the_method():
    """Each setting changes the rows (a parity test where it did nothing could not fail)."""
    sch, _ = _schedule("scaled_linear")
    cos, _ = _schedule("cosine")
    base = DPMSolverPPSampler(sch, 20, final_sigmas_type="sigma_min")
    for kw in (dict(solver_type="heun"), dict(euler_at_final=True), dict(use_lu_lambdas=True),
               dict(solver_order=3), dict(solver_order=1)):  # fmt: skip
        other = DPMSolverPPSampler(sch, 20, final_sigmas_type="sigma_min", **kw)
        assert not np.array_equal(other.coef64, base.coef64), kw
    lu = DPMSolverPPSampler(sch, 10, use_lu_lambdas=True)
    exp = DPMSolverPPSampler(sch, 10, use_exponential_sigmas=True)
    assert lu.sigma_grid == "lu" and not torch.equal(lu.timesteps, exp.timesteps)  # rounded
    np.testing.assert_allclose(lu._grid, exp._grid, rtol=1e-6)  # the same log-even grid
    clipped = DPMSolverPPSampler(cos, 10, lambda_min_clipped=-5.1)
    assert clipped.timesteps[0] < DPMSolverPPSampler(cos, 10).timesteps[0]


def test_order_three_last_step_to_sigma_min_is_the_identity():
    """A sigma grid ending at sigma_min with final_sigmas_type="sigma_min" and no
    lower_order_final: the last step has h = 0. diffusers' 3M and heun formulas give NaN there
    (0/0); fastdiff takes the limit, x_t = x_s, as diffusers' first-order and midpoint steps."""
    for kw in (dict(solver_order=3), dict(solver_type="heun")):
        ours, theirs = _pair(8, use_karras_sigmas=True, final_sigmas_type="sigma_min",
                             lower_order_final=False, **kw)  # fmt: skip
        g = torch.Generator().manual_seed(0)
        x = torch.randn(PARITY_SHAPE, generator=g)
        for i, t in enumerate(theirs.timesteps):
            mo = _model_output(x, g)
            ref = theirs.step(mo, t, x).prev_sample
            got = ours.step(mo, i, x)
            if i < 7:
                assert _rel(got, ref) <= PARITY_RTOL, (kw, i)
            else:
                assert torch.isnan(ref).all() and torch.equal(got, x), kw
            x = ref if i < 7 else x


# -------------------------------------------------------------- the rows vs diffusers' formulas
def _diffusers_update64(ours, i, order, x, ms, z):
    """diffusers' update in float64 (its D0 / D1 / D2 form), on fastdiff's sigma grid."""
    sig = torch.tensor(ours._ratios(), dtype=torch.float64)
    alpha = 1 / (sig**2 + 1).sqrt()
    sigma = sig * alpha
    lam = alpha.log() - sigma.log()
    a_t, s_t, s_0 = alpha[i + 1], sigma[i + 1], sigma[i]
    h = lam[i + 1] - lam[i]
    sde = ours.algorithm_type == SDE
    if sde:
        out = (s_t / s_0 * torch.exp(-h)) * x + s_t * torch.sqrt(1 - torch.exp(-2 * h)) * z
        A = a_t * (1 - torch.exp(-2 * h))
        B = a_t * ((1 - torch.exp(-2 * h)) / (-2 * h) + 1)
        C = a_t * ((1 - torch.exp(-2 * h) - 2 * h) / (2 * h) ** 2 - 0.5)
    else:
        out = (s_t / s_0) * x
        A = -a_t * (torch.exp(-h) - 1)
        B = a_t * ((torch.exp(-h) - 1) / h + 1)
        C = -a_t * ((torch.exp(-h) - 1 + h) / h**2 - 0.5)
    m0 = ms[0]
    if order == 1:
        return out + A * m0
    r0 = (lam[i] - lam[i - 1]) / h
    if order == 2:
        d1 = (m0 - ms[1]) / r0
        return out + A * m0 + (0.5 * A if ours.solver_type == "midpoint" else B) * d1
    r1 = (lam[i - 1] - lam[i - 2]) / h
    d1_0, d1_1 = (m0 - ms[1]) / r0, (ms[1] - ms[2]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return out + A * m0 + B * d1 + C * d2


@pytest.mark.parametrize(
    "opts",
    [dict(solver_order=3), dict(solver_order=3, algorithm_type=SDE),
     dict(solver_order=3, use_karras_sigmas=True, lower_order_final=False),
     dict(solver_order=3, use_lu_lambdas=True, algorithm_type=SDE),
     dict(solver_type="heun"), dict(solver_type="heun", algorithm_type=SDE),
     dict(solver_order=2), dict(solver_order=1, algorithm_type=SDE)],
    ids=["3m", "3m-sde", "3m-karras", "3m-lu-sde", "heun", "heun-sde", "2m", "1-sde"],
)  # fmt: skip
def test_rows_equal_diffusers_formulas_in_float64(opts):
    """The folded row [a, s, c_x, c_x0, c_prev, c_noise, c_prev2, 0] applied in float64 equals
    diffusers' D0/D1/D2 update restated in float64 (rel. 1e-12), for the full-history rows and
    the lower-order rows a run starting at i > 0 uses."""
    sch, _ = _schedule("scaled_linear")
    ours = DPMSolverPPSampler(sch, 12, **opts)
    g = torch.Generator().manual_seed(7)
    x, z, *ms = (torch.randn(40, generator=g, dtype=torch.float64) for _ in range(5))
    for i in range(12):
        for k in (1, 2, 3):
            order = min(k, ours.step_orders[i])
            row = ours._rows64[k][i]
            got = row[2] * x + row[3] * ms[0] + row[4] * ms[1] + row[6] * ms[2] + row[5] * z
            want = _diffusers_update64(ours, i, order, x, ms, z)
            assert _rel(got, want) <= 1e-12, (i, k, _rel(got, want))
            if order < 3:
                assert row[6] == 0.0
            if order < 2:
                assert row[4] == 0.0


# ------------------------------------------------------------------ img2img, reuse, history
@pytest.mark.parametrize("algo", [ODE, SDE])
@pytest.mark.parametrize("begin", [2, 5])
def test_run_starting_mid_schedule_matches_diffusers_begin_index(begin, algo):
    """From i = begin (diffusers: set_begin_index) a 3M sampler steps first, then second, then
    third order; a sampler reused after a full run at another batch size equals a fresh one."""
    ours, theirs = _pair(12, solver_order=3, algorithm_type=algo)
    theirs.set_begin_index(begin)
    ran = _record_orders(theirs)
    g = torch.Generator().manual_seed(1)
    x_start = torch.randn(PARITY_SHAPE, generator=g)
    mos = [_model_output(x_start, g) for _ in range(12)]
    zs = [torch.randn(PARITY_SHAPE, generator=g) for _ in range(12)]
    x_ref = x = x_start
    for i in range(begin, 12):
        x_ref = theirs.step(mos[i], theirs.timesteps[i], x_ref, variance_noise=zs[i]).prev_sample
        x = ours.step(mos[i], i, x, noise=zs[i])
        assert _rel(x, x_ref) <= PARITY_RTOL, (i, _rel(x, x_ref))
    assert ran[:3] == [1, 2, 3]
    reused = DPMSolverPPSampler(ours.schedule, 12, solver_order=3, algorithm_type=algo)
    y = torch.randn(3, *PARITY_SHAPE[1:], generator=g)
    for i in range(12):
        y = reused.step(torch.randn(y.shape, generator=g), i, y, noise=torch.randn_like(y))
    x = x_start
    for i in range(begin, 12):
        x = reused.step(mos[i], i, x, noise=zs[i])
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)


def test_skipped_step_drops_both_history_entries():
    """Stepping i = 0, 1, 2 then 4: step 4 has no m_3, so it is first order (not 3M with a
    stale m_{i-2}); after 4, step 5 is second order."""
    sch, _ = _schedule("scaled_linear")
    smp = DPMSolverPPSampler(sch, 10, solver_order=3)
    ref = DPMSolverPPSampler(sch, 10, solver_order=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(PARITY_SHAPE, generator=g)
    mos = [torch.randn(PARITY_SHAPE, generator=g) for _ in range(10)]
    for i in (0, 1, 2):
        smp.step(mos[i], i, x)
    got4, got5 = smp.step(mos[4], 4, x), smp.step(mos[5], 5, x)
    ref4 = ref.step(mos[4], 4, x, x0_prev=None)
    m4 = ref.step(mos[4], 4, x, x0_prev=None, return_x0=True)[1]
    ref5 = ref.step(mos[5], 5, x, x0_prev=m4)
    assert torch.equal(got4, ref4) and torch.equal(got5, ref5)
    third = ref.step(mos[5], 5, x, x0_prev=m4, x0_prev2=mos[3])
    assert not torch.allclose(third, ref5)  # the row of step 5 is third order with m_{i-2}


def test_explicit_history_equals_the_sampler_history():
    """step(x0_prev=m_{i-1}, x0_prev2=m_{i-2}) is the sampler's own history; x0_prev alone at a
    third-order step is the second-order step; x0_prev2 without x0_prev is refused."""
    sch, _ = _schedule("linear")
    own = DPMSolverPPSampler(sch, 8, solver_order=3)
    ext = DPMSolverPPSampler(sch, 8, solver_order=3)
    g = torch.Generator().manual_seed(4)
    x = y = torch.randn(PARITY_SHAPE, generator=g)
    hist: list[torch.Tensor] = []
    for i in range(8):
        mo = torch.randn(PARITY_SHAPE, generator=g)
        x = own.step(mo, i, x)
        prev = dict(zip(("x0_prev", "x0_prev2"), hist, strict=False))
        y, m = ext.step(mo, i, y, return_x0=True, **{"x0_prev": None, **prev})
        assert torch.equal(x, y), i
        hist = [m, *hist][:2]
    x, mo = torch.randn(PARITY_SHAPE, generator=g), torch.randn(PARITY_SHAPE, generator=g)
    m1 = torch.randn(PARITY_SHAPE, generator=g)
    two = ext.step(mo, 4, x, x0_prev=m1)
    row = ext._rows64[2][4]  # the second-order row of step 4
    assert row[6] == 0.0 and row[4] != 0.0 and ext.coef64[4, 6] != 0.0
    x0 = (x - row[1] * mo) / row[0]
    want = row[2] * x.double() + row[3] * x0.double() + row[4] * m1.double()
    assert _rel(two, want) <= 1e-5
    with pytest.raises(ValueError, match="x0_prev2: .*without x0_prev"):
        ext.step(mo, 4, x, x0_prev2=m1)


# -------------------------------------------------------------------- fastdiff.sample, backends
@torch.no_grad()
@pytest.mark.parametrize(
    "opts",
    [dict(solver_order=3), dict(solver_order=3, algorithm_type=SDE, use_karras_sigmas=True),
     dict(solver_order=1, algorithm_type=SDE), dict(solver_type="heun", use_lu_lambdas=True),
     dict(solver_order=3, euler_at_final=True, final_sigmas_type="sigma_min")],
    ids=["3m", "3m-sde-karras", "1-sde", "heun-lu", "3m-eaf"],
)  # fmt: skip
def test_sample_matches_the_diffusers_loop(opts):
    """fastdiff.sample(schedule=<diffusers scheduler with the settings>) and
    fastdiff.sample(sampler="dpm++", <settings>) are diffusers' own loop (same seed)."""
    net = _Net().eval()
    sched = diffusers.DPMSolverMultistepScheduler(prediction_type="v_prediction", **opts)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sched.set_timesteps(10)
    x, g = x_T, torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        x = sched.step(net(x, t.reshape(1)), t, x, generator=g).prev_sample
    via_sched = fastdiff.sample(net, steps=10, schedule=sched, noise=x_T,
                                generator=torch.Generator().manual_seed(5))  # fmt: skip
    via_opts = fastdiff.sample(net, steps=10, sampler="dpm++", noise=x_T,
                               prediction_type="v_prediction", **opts,
                               generator=torch.Generator().manual_seed(5))  # fmt: skip
    for got in (via_sched, via_opts):
        assert _rel(got, x) <= 1e-4
    smp = resolve_sampler(net, None, 10, sched, None, None, {})
    assert isinstance(smp, DPMSolverPPSampler)
    assert smp.solver_order == opts.get("solver_order", 2)
    assert smp.solver_type == opts.get("solver_type", "midpoint")


def _small_run(backend: str, dtype: torch.dtype, algo: str, dev: str) -> torch.Tensor:
    """A 3M run of 8 steps at a small odd size on one backend, noise and outputs given."""
    sch, _ = _schedule("scaled_linear")
    smp = DPMSolverPPSampler(sch, 8, solver_order=3, algorithm_type=algo,
                             prediction_type="v_prediction")  # fmt: skip
    g = torch.Generator().manual_seed(9)
    shape = (2, 3, 5, 7)
    x = torch.randn(shape, generator=g).to(dev, dtype)
    with fastdiff.use_backend(backend):
        for i in range(8):
            r = torch.randn(shape, generator=g).to(dev)
            mo = (0.5 * r + 0.5 * x.float().tanh()).to(dtype)
            z = torch.randn(shape, generator=g).to(dev) if algo == SDE else None
            x = smp.step(mo, i, x, noise=z)
    return x.cpu()


@pytest.mark.parametrize("algo", [ODE, SDE])
@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
def test_every_backend_gives_the_same_samples(case, algo):
    dev, backend = case
    ref = _small_run("torch", torch.float32, algo, dev)
    got = _small_run(backend, torch.float32, algo, dev)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    half = _small_run(backend, torch.float16, algo, dev)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, rtol=0, atol=2e-2)


@torch.no_grad()
@pytest.mark.parametrize("algo", [ODE, SDE])
def test_cuda_graph_loop_equals_eager(algo, fake_cuda_graphs, monkeypatch):
    """The CUDA-graph loop (fake graphs on CPU) keeps m_{i-2} in a second static buffer:
    graphed 3M runs equal eager ones, twice (the history is reset between runs)."""
    from fastdiff import api

    net = _Net(num_classes=4).eval()
    eager_loop = api._sample_eager

    def run(graphed, call):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        return fastdiff.sample(net, steps=7, sampler="dpm++", solver_order=3, algorithm_type=algo,
                               shape=(3, 8, 8), batch_size=2, generator=_gens([call, call + 1]),
                               cond=torch.tensor([call, 1]), guidance_scale=2.0,
                               return_trajectory=True)  # fmt: skip

    out = _graphed_equals_eager(run)
    assert len(fake_cuda_graphs) == 1 and fake_cuda_graphs[0].x0_prev2 is not None
    two = fastdiff.sample(net, steps=7, sampler="dpm++", algorithm_type=algo, shape=(3, 8, 8),
                          batch_size=2, generator=_gens([2, 3]), cond=torch.tensor([2, 1]),
                          guidance_scale=2.0)  # fmt: skip
    assert not torch.allclose(two, out, atol=1e-4)  # 3M is not 2M


# ------------------------------------------------------------------------------ refused
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(solver_order=4), r"solver_order: expected 1, 2 or 3, got 4"),
        (dict(solver_order=0), r"solver_order: expected 1, 2 or 3, got 0"),
        (dict(solver_order=True), r"solver_order: expected 1, 2 or 3, got True"),
        (dict(solver_type="rk4"), r"solver_type: expected one of .*'heun'.*got 'rk4'"),
        (dict(lambda_min_clipped=math.nan), r"lambda_min_clipped: expected a float < inf"),
        (dict(lambda_min_clipped=math.inf), r"lambda_min_clipped: expected a float < inf"),
        (dict(lambda_min_clipped=9.0), r"lambda_min_clipped: expected <= lambda at t = 0"),
    ],
)
def test_bad_settings_are_value_errors_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverPPSampler(fastdiff.NoiseSchedule("linear"), 10, **kw)
    with pytest.raises(TypeError, match="lambda_min_clipped: expected a float, got str"):
        DPMSolverPPSampler(fastdiff.NoiseSchedule("linear"), 10, lambda_min_clipped="-5")


def test_trailing_grid_cut_short_by_lambda_min_clipped_is_refused():
    """diffusers' trailing grid keeps the stride T / steps from the clipped end and so runs
    fewer steps than asked; fastdiff refuses instead of running another number of steps."""
    sch, cfg = _schedule("cosine")
    lam = diffusers.DPMSolverMultistepScheduler(**cfg).lambda_t
    clip = float(lam[850])
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg, lambda_min_clipped=clip,
                                                   timestep_spacing="trailing")  # fmt: skip
    theirs.set_timesteps(10)
    assert len(theirs.timesteps) == 9
    with pytest.raises(ValueError, match=r"lambda_min_clipped: .* 9 timesteps for steps=10"):
        DPMSolverPPSampler(sch, 10, lambda_min_clipped=clip, timestep_spacing="trailing")
    ours, theirs = _pair(10, "cosine", lambda_min_clipped=clip)  # linspace: fine
    assert _step_parity(ours, theirs, 10) <= PARITY_RTOL


@pytest.mark.filterwarnings("ignore:.*deprecated:FutureWarning")
@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type"),
        (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type"),
        # the flow grid is implemented (tests/test_flow_multistep.py), not with a VP grid
        (dict(use_flow_sigmas=True, use_karras_sigmas=True), "use_flow_sigmas"),
        (dict(use_flow_sigmas=True, use_lu_lambdas=True), "use_flow_sigmas"),
    ],
    ids=["dpmsolver", "sde-dpmsolver", "flow-karras", "flow-lu"],
)
def test_settings_still_refused_name_themselves(kw, name):
    sched = diffusers.DPMSolverMultistepScheduler(solver_order=3, **kw)
    with pytest.raises(ValueError, match=name):
        fastdiff.sample(_Net().eval(), steps=4, schedule=sched, shape=(3, 8, 8))


def test_unsupported_table_lists_only_unimplemented_settings():
    from fastdiff._sampler_setup import _UNSUPPORTED_SETTINGS

    left = set(_UNSUPPORTED_SETTINGS["dpm++"])
    done = {"solver_order", "solver_type", "euler_at_final", "use_lu_lambdas",
            "lambda_min_clipped", "use_flow_sigmas", "use_dynamic_shifting"}  # fmt: skip
    assert not left & done


def test_order_patterns():
    """The order of each step (lower_order_final: < 15 steps; euler_at_final; sigma_min)."""
    sch = fastdiff.NoiseSchedule("linear")
    cases = {
        (3, 6, True, "zero", False): (1, 2, 3, 3, 2, 1),
        (3, 6, False, "zero", False): (1, 2, 3, 3, 3, 1),
        (3, 6, False, "sigma_min", False): (1, 2, 3, 3, 3, 3),
        (3, 6, False, "sigma_min", True): (1, 2, 3, 3, 3, 1),
        (3, 16, True, "sigma_min", False): (1, 2, *[3] * 14),
        (2, 4, True, "zero", False): (1, 2, 2, 1),
        (1, 4, False, "sigma_min", False): (1, 1, 1, 1),
        (3, 2, True, "zero", False): (1, 1),
    }
    for (order, n, lof, final, eaf), want in cases.items():
        smp = DPMSolverPPSampler(sch, n, solver_order=order, lower_order_final=lof,
                                 final_sigmas_type=final, euler_at_final=eaf)  # fmt: skip
        assert smp.step_orders == want, (order, n, lof, final, eaf)


HAS_WEIGHTS = (Path(fastdiff.__file__).parent / "weights" / "digits.safetensors").is_file()


@pytest.mark.skipif(not HAS_WEIGHTS, reason="needs the shipped digits model")
def test_cli_solver_order_reaches_the_dpm_sampler(tmp_path, monkeypatch, capsys):
    """``fastdiff sample --sampler dpm++ --solver-order 3`` is DPM++ 3M (other images than 2M
    with the same seed); with another sampler it is a one-line error and writes nothing."""
    from fastdiff.cli import main

    seen = record_sample_calls(monkeypatch, run=True)
    outs = [tmp_path / "3m.png", tmp_path / "2m.png"]
    for out, extra in zip(outs, (["--solver-order", "3"], []), strict=True):
        assert main(["sample", "--steps", "6", "--n", "2", "--sampler", "dpm++", "--quiet",
                     "--out", str(out), *extra]) == 0  # fmt: skip
    assert seen[0]["solver_order"] == 3 and "solver_order" not in seen[1]
    assert outs[0].read_bytes() != outs[1].read_bytes()
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    assert main(["sample", "--steps", "2", "--n", "2", "--sampler", "ddim", "--solver-order",
                 "3", "--quiet", "--out", str(bad)]) != 0  # fmt: skip
    err = capsys.readouterr().err
    assert "--solver-order: for --sampler" in err and "got --sampler ddim" in err
    assert not bad.exists()
