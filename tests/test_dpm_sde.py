"""DPM++ 2M SDE (``algorithm_type="sde-dpmsolver++"``): the noise path of the fused
``dpm_solver_2m_step`` op on every backend, and the sampler against diffusers 0.42's
``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``.

Op: x_next = c_x x + c_x0 x0 + c_prev x0_prev + c_noise z, z from ``noise`` or in-kernel Philox
(``generator_state``), against a float64 reference under the FlashAttention rule. Sampler: per
step with the same noise fed to both (``variance_noise=``), relative error <= 1e-5 in fp32, and
whole runs seeded with the same ``torch.Generator``.
"""

from __future__ import annotations

import inspect
import math

import _dpm_step_ref as _ref
import numpy as np
import pytest
import torch
from _dpm_step_ref import PREDS, SHAPE
from _dpm_step_ref import coef as _coef
from _dpm_step_ref import dtypes as _dtypes
from _dpm_step_ref import layouts as _layouts
from helpers import PARITY_RTOL, PARITY_SHAPE, assert_fa_rule, backend_cases, case_id
from test_euler_ancestral import _gens, _graphed_equals_eager, _Net
from test_samplers_parity import _loop, _schedule

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff._sampler_setup import resolve_sampler
from fastdiff.ops._philox import philox_randn
from fastdiff.ops.sampler_step import dpm_solver_2m_step, sampler_step
from fastdiff.samplers import DPMSolverPPSampler

diffusers = pytest.importorskip("diffusers")

CASES = backend_cases("dpm_solver_2m_step")
SDE = "sde-dpmsolver++"


def _sde_row(i: int = 3) -> list[float]:
    """A real 2M SDE row [a, s, c_x, c_x0, c_prev, c_noise, 0, 0] (all terms nonzero)."""
    row = DPMSolverPPSampler(NoiseSchedule("linear"), 10, algorithm_type=SDE).coef64[i]
    assert all(row[:6] != 0)
    return row.tolist()


ROW = _sde_row()


def sde_reference(x, mo, prev, z, pred, dt, g=None, clip=None, row=ROW):
    """The op's math in plain torch in ``dt`` with the fp32-rounded coefficients."""
    return _ref.reference(x, mo, prev, None, z, pred, dt, g, clip, row=row)


def _inputs(dev, dtype, shape=SHAPE, cfg=True, scale=1.0):
    """x, the model output, x0_prev, z."""
    x, mo, prev, _, z = _ref.inputs(dev, dtype, shape, cfg, scale)
    return x, mo, prev, z


# ---------------------------------------------------------------------------------------- op
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("pred", PREDS)
def test_sde_step_with_noise_tensor(case, pred):
    dev, backend = case
    coef = _coef(dev, ROW)
    for dtype in _dtypes(case):
        x, mo, prev, z = _inputs(dev, dtype)
        with fastdiff.use_backend(backend):
            out, x0 = dpm_solver_2m_step(x, mo, coef, prev, prediction_type=pred,
                                         guidance_scale=2.0, clip_range=1.5, noise=z)  # fmt: skip
            first, _ = dpm_solver_2m_step(x, mo, coef, None, prediction_type=pred,
                                          guidance_scale=2.0, clip_range=1.5, noise=z)  # fmt: skip
        assert out.dtype == dtype and out.shape == x.shape
        for got, p, name in ((out, prev, "2M"), (first, None, "first order")):
            r, rx0 = sde_reference(x, mo, p, z, pred, torch.float64, 2.0, 1.5)
            e, _ = sde_reference(x, mo, p, z, pred, dtype, 2.0, 1.5)
            assert_fa_rule(got, r, e, atol=1e-6, name=f"{name} {dtype}")
        assert_fa_rule(x0, rx0, sde_reference(x, mo, prev, z, pred, dtype, 2.0, 1.5)[1],
                       atol=1e-6, name="x0")  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sde_step_fp16_large_values_stay_finite(case):
    dev, backend = case
    x, mo, prev, z = _inputs(dev, torch.float16, cfg=False, scale=1000.0)
    with fastdiff.use_backend(backend):
        out, x0 = dpm_solver_2m_step(
            x, mo, _coef(dev, ROW), prev, noise=z, prediction_type="sample"
        )
    assert torch.isfinite(out).all() and torch.isfinite(x0).all()
    r, _ = sde_reference(x, mo, prev, z, "sample", torch.float64)
    e, _ = sde_reference(x, mo, prev, z, "sample", torch.float16)
    assert_fa_rule(out, r, e, atol=1e-3, name="x1000")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sde_step_philox_noise_and_layouts(case):
    """generator_state draws z in the kernel: element e is lane e % 4 of randn4x(seed,
    offset + e // 4) in x's logical order, whatever the layout; the state is not modified."""
    dev, backend = case
    coef = _coef(dev, ROW)
    for name, x in _layouts(dev, torch.float32):
        mo = torch.randn_like(x)
        prev = torch.randn_like(x)
        gs = torch.tensor([2**40 + 12345, 7], dtype=torch.int64, device=dev)
        with fastdiff.use_backend(backend):
            out, _ = dpm_solver_2m_step(x, mo, coef, prev, prediction_type="v_prediction",
                                        generator_state=gs)  # fmt: skip
        assert gs.tolist() == [2**40 + 12345, 7]
        z = philox_randn(gs, tuple(x.shape))
        r, _ = sde_reference(x, mo, prev, z, "v_prediction", torch.float64)
        e, _ = sde_reference(x, mo, prev, z, "v_prediction", torch.float32)
        assert_fa_rule(out, r, e, atol=2e-6, name=name)  # normals agree to ~1e-6 across backends
        if name == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_philox_stream_is_the_same_on_every_backend(case):
    """The Philox z of a backend equals the torch reference's (and so every other backend's):
    noise=philox_randn(state) and generator_state=state give the same step."""
    dev, backend = case
    coef = _coef(dev, ROW)
    x, mo, prev, _ = _inputs(dev, torch.float32, shape=(2, 3, 9, 7), cfg=False)
    gs = torch.tensor([987654321, 2**33 + 3], dtype=torch.int64, device=dev)
    with fastdiff.use_backend(backend):
        got, _ = dpm_solver_2m_step(x, mo, coef, prev, generator_state=gs)
        via_noise, _ = dpm_solver_2m_step(x, mo, coef, prev, noise=philox_randn(gs, x.shape))
    with fastdiff.use_backend("torch"):
        ref, _ = dpm_solver_2m_step(x, mo, coef, prev, generator_state=gs)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, via_noise, rtol=0, atol=1e-5)
    other = gs + torch.tensor([0, 1], device=dev)
    with fastdiff.use_backend(backend):
        moved, _ = dpm_solver_2m_step(x, mo, coef, prev, generator_state=other)
    assert not torch.allclose(moved, got)  # the offset selects the counters


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_noise_with_zero_c_noise_is_the_ode_step(case):
    dev, backend = case
    row = [*ROW[:5], 0.0, 0.0, 0.0]
    coef = _coef(dev, row)
    x, mo, prev, z = _inputs(dev, torch.float32, cfg=False)
    gs = torch.tensor([5, 0], dtype=torch.int64, device=dev)
    with fastdiff.use_backend(backend):
        ode, _ = dpm_solver_2m_step(x, mo, coef, prev)
        with_z, _ = dpm_solver_2m_step(x, mo, coef, prev, noise=z)
        with_gen, _ = dpm_solver_2m_step(x, mo, coef, prev, generator_state=gs)
        sde, _ = dpm_solver_2m_step(x, mo, _coef(dev, ROW), prev, noise=z)
    assert torch.equal(with_z, ode) and torch.equal(with_gen, ode)
    assert not torch.allclose(sde, ode)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_opcheck_sde(case):
    dev, backend = case
    coef = _coef(dev, ROW)
    x, mo, prev, z = _inputs(dev, torch.float32, shape=(2, 3, 4, 5))
    gs = torch.tensor([11, 4], dtype=torch.int64, device=dev)
    op = torch.ops.fastdiff.dpm_solver_2m_step.default
    torch.library.opcheck(op, (x, mo, coef, prev, z, None, backend, 1, 1.0, 3.0))
    torch.library.opcheck(op, (x, mo[:2], coef, None, None, gs, backend, 0, None, None))
    xg, zg = x.clone().requires_grad_(True), z.clone().requires_grad_(True)
    torch.library.opcheck(op, (xg, mo, coef, prev, zg, None, backend, 1, None, 2.0))


def test_gradient_through_the_noise_is_c_noise():
    coef = _coef("cpu", ROW)
    x, mo, prev, z = _inputs("cpu", torch.float32, cfg=False)
    z.requires_grad_(True)
    out, _ = dpm_solver_2m_step(x, mo, coef, prev, noise=z)
    (g,) = torch.autograd.grad(out.sum(), z)
    torch.testing.assert_close(g, torch.full_like(z, float(coef[5])))


def test_validation_errors_name_the_argument_and_write_nothing():
    coef = _coef("cpu", ROW)
    x, mo, prev, z = _inputs("cpu", torch.float32, cfg=False)
    gs = torch.tensor([1, 2])
    snap = [t.clone() for t in (x, mo, prev, z, gs)]
    bad = [
        (dict(noise=torch.randn(2, 3, 7, 5)), ValueError, "noise must have x's shape"),
        (dict(noise=z.to(torch.int32)), TypeError, "noise must be float32"),
        (dict(noise=z.to("meta")), ValueError, "noise is on meta"),
        (dict(noise=z, generator_state=gs), ValueError, "at most one of noise and generator"),
        (dict(generator_state=gs.int()), TypeError, "generator_state must be an int64"),
        (dict(generator_state=torch.tensor([1, 2, 3])), ValueError, r"state must .*\(2,\)"),
        (dict(generator_state=gs.to("meta")), ValueError, "generator_state is on meta"),
    ]  # fmt: skip
    for backend in dict.fromkeys(b for _, b in CASES):  # in order (a set is PYTHONHASHSEED order)
        for kw, exc, msg in bad:
            with fastdiff.use_backend(backend), pytest.raises(exc, match=msg) as e:
                dpm_solver_2m_step(x, mo, coef, prev, **kw)
            assert str(e.value).startswith("dpm_solver_2m_step: ")  # named, as the other ops'
    with pytest.raises(ValueError, match="^sampler_step: noise must have x's shape"):
        sampler_step(x, mo, coef, noise=z[:2])
    for a, b in zip((x, mo, prev, z, gs), snap, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(("cpu", "cpu") not in CASES, reason="needs the cpu backend")
def test_cpu_repeat_calls_read_the_current_noise_and_state():
    """The validated-call cache of the cpu fast path keys the noise operand by layout only: a
    repeat reads the tensors' current values, and equals the custom op."""
    coef = _coef("cpu", ROW)
    x, mo, prev, z = _inputs("cpu", torch.float32, shape=(2, 4, 8, 8), cfg=False)
    gs = torch.tensor([77, 0])
    op = torch.ops.fastdiff.dpm_solver_2m_step.default

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))

    for _ in range(3):
        got = dpm_solver_2m_step(x, mo, coef, prev, noise=z)
        assert same(got, op(x, mo, coef, prev, z, None, "cpu", 0, None, None))
        z.mul_(-1.5)
        g2 = dpm_solver_2m_step(x, mo, coef, prev, generator_state=gs)
        ref = op(x, mo, coef, prev, None, gs, "cpu", 0, None, None)
        assert same(g2, ref)
        gs[1] += x.numel()
    plain = dpm_solver_2m_step(x, mo, coef, prev)
    assert same(plain, op(x, mo, coef, prev, None, None, "cpu", 0, None, None))


# ----------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("bad", ["dpmsolver", "sde-dpmsolver", "sde", ""])
def test_algorithm_type_is_validated(bad):
    msg = rf"algorithm_type: expected one of .*sde-dpmsolver\+\+.*got {bad!r}"
    with pytest.raises(ValueError, match=msg):
        DPMSolverPPSampler(NoiseSchedule("linear"), 10, algorithm_type=bad)


@pytest.mark.parametrize("opts", [dict(), dict(use_karras_sigmas=True),
                                  dict(final_sigmas_type="sigma_min", lower_order_final=False)],
                         ids=["default", "karras", "sigma_min"])  # fmt: skip
def test_sde_coefficients_follow_the_paper(opts):
    """Rows = [a_s, s_s, (s_t/s_s) e^{-h}, alpha_t (1 - e^{-2h})(1 + 1/(2r)),
    -alpha_t (1 - e^{-2h})/(2r), sigma_t sqrt(1 - e^{-2h}), 0, 0] (Lu et al. 2022 appendix);
    the ODE solver's rows have no noise and noise is drawn on every SDE step."""
    sch = NoiseSchedule("scaled_linear")
    sde = DPMSolverPPSampler(sch, 12, algorithm_type=SDE, **opts)
    ode = DPMSolverPPSampler(sch, 12, **opts)
    assert np.array_equal(sde.timesteps, ode.timesteps)
    ratio = ode._ratios()
    alpha = [1 / math.sqrt(1 + r * r) for r in ratio]
    lam = [-math.log(r) if r > 0 else math.inf for r in ratio]
    c, o = sde.coef64, ode.coef64
    for i in range(12):
        e = ratio[i + 1] / ratio[i]  # e^{-h}
        phi2 = alpha[i + 1] * (1 - e * e)
        np.testing.assert_allclose(c[i, :2], o[i, :2], rtol=1e-14)
        np.testing.assert_allclose(c[i, 2], o[i, 2] * e, rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(c[i, 5], ratio[i + 1] * alpha[i + 1] * math.sqrt(1 - e * e),
                                   rtol=1e-12, atol=1e-300)  # fmt: skip
        if o[i, 4] == 0:  # first order
            np.testing.assert_allclose(c[i, 3:5], [phi2, 0.0], rtol=1e-12, atol=1e-300)
        else:
            r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            want = [phi2 * (1 + 0.5 / r), -phi2 * 0.5 / r]
            np.testing.assert_allclose(c[i, 3:5], want, rtol=1e-12)
        assert c[i, 6] == c[i, 7] == 0.0 and o[i, 5] == 0.0
    assert all(sde.needs_noise(i) for i in range(12)) and not any(ode.needs_noise(i)
                                                                  for i in range(12))  # fmt: skip
    if opts.get("final_sigmas_type") != "sigma_min":
        assert c[-1, 5] == 0.0 and c[-1, 2] == 0.0  # the last step lands on sigma 0: x0
    else:
        assert c[-1, 5] > 0.0  # down to the noise level of t = 0, with fresh noise
    assert sde.config()["algorithm_type"] == SDE and ode.config()["algorithm_type"] != SDE


PARITY_CASES = [
    ("scaled_linear", "linspace", "epsilon", 10, {}),
    ("scaled_linear", "linspace", "v_prediction", 20, {}),
    ("linear", "leading", "epsilon", 20, {}),
    ("linear", "trailing", "v_prediction", 10, {}),
    ("cosine", "trailing", "epsilon", 20, {}),
    ("scaled_linear", "linspace", "epsilon", 10, dict(use_karras_sigmas=True)),
    ("linear", "linspace", "v_prediction", 20, dict(use_karras_sigmas=True)),
    ("scaled_linear", "linspace", "epsilon", 8, dict(lower_order_final=False)),
    ("scaled_linear", "linspace", "epsilon", 20,
     dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    ("scaled_linear", "trailing", "epsilon", 10, dict(thresholding=True, sample_max_value=1.5)),
]  # fmt: skip


@pytest.mark.parametrize("sched,spacing,pred,steps,opts", PARITY_CASES,
                         ids=lambda v: str(v) if not isinstance(v, dict) else
                         "-".join(f"{k}={w}" for k, w in v.items()) or "plain")  # fmt: skip
def test_per_step_parity_with_diffusers(sched, spacing, pred, steps, opts):
    """Same state, model output and noise at every step (diffusers' via variance_noise=)."""
    sch, cfg = _schedule(sched)
    kw = dict(prediction_type=pred, timestep_spacing=spacing, algorithm_type=SDE, **opts)
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg, **kw)
    theirs.set_timesteps(steps)
    ours = DPMSolverPPSampler(sch, steps, **kw)
    g = torch.Generator().manual_seed(11)

    def noise(i, t):
        return torch.randn(PARITY_SHAPE, generator=g)

    def step(mo, t, x, z):
        return theirs.step(mo, t, x, variance_noise=z).prev_sample

    worst = _loop(ours, theirs, step, steps, noise_fn=noise)
    assert worst <= PARITY_RTOL


@pytest.mark.parametrize("begin", [3, 7])
def test_run_starting_mid_schedule_matches_diffusers_begin_index(begin):
    """img2img-style: from i = begin (diffusers: set_begin_index) the first step is SDE first
    order (with its noise term), then 2M SDE; the same noise replayed into diffusers."""
    sch, cfg = _schedule("scaled_linear")
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg, algorithm_type=SDE)
    theirs.set_timesteps(10)
    theirs.set_begin_index(begin)
    ours = DPMSolverPPSampler(sch, 10, algorithm_type=SDE)
    g = torch.Generator().manual_seed(1)
    x_ref = x = torch.randn(PARITY_SHAPE, generator=g)
    for i in range(begin, 10):
        mo, z = (torch.randn(PARITY_SHAPE, generator=g) for _ in range(2))
        x_ref = theirs.step(mo, theirs.timesteps[i], x_ref, variance_noise=z).prev_sample
        x = ours.step(mo, i, x, noise=z)
        rel = ((x - x_ref).abs().max() / x_ref.abs().max()).item()
        assert rel <= PARITY_RTOL, (i, rel)


def test_step_generator_draws_what_diffusers_draws():
    """A generator given to our step and the same seed given to diffusers' step: same z, the
    same result, and the generators advance alike (the last step included)."""
    sch, cfg = _schedule("scaled_linear")
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg, algorithm_type=SDE)
    theirs.set_timesteps(6)
    ours = DPMSolverPPSampler(sch, 6, algorithm_type=SDE)
    g_ours, g_theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = torch.randn(PARITY_SHAPE)
    for i, t in enumerate(theirs.timesteps):
        mo = 0.7 * torch.tanh(x) + 0.1
        ref = theirs.step(mo, t, x, generator=g_theirs).prev_sample
        got = ours.step(mo, i, x, generator=g_ours)
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        assert rel <= PARITY_RTOL, (i, rel)
        x = ref
    assert torch.equal(g_ours.get_state(), g_theirs.get_state())


@torch.no_grad()
@pytest.mark.parametrize("karras", [False, True], ids=["linspace", "karras"])
def test_sample_matches_the_diffusers_loop_with_a_generator(karras):
    """fastdiff.sample(sampler='dpm++', schedule=<diffusers SDE scheduler>, generator=seed) is
    diffusers' own loop with the same seed ("DPM++ 2M SDE" / "DPM++ 2M SDE Karras")."""
    net = _Net().eval()
    sched = diffusers.DPMSolverMultistepScheduler(
        algorithm_type=SDE, prediction_type="v_prediction", use_karras_sigmas=karras
    )
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sched.set_timesteps(10)
    x, g = x_T, torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        x = sched.step(net(x, t.reshape(1)), t, x, generator=g).prev_sample
    got = fastdiff.sample(net, steps=10, sampler="dpm++", schedule=sched, noise=x_T,
                          generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert ((got - x).abs().max() / x.abs().max()).item() <= 1e-4
    smp = resolve_sampler(net, "dpm++", 10, sched, None, None, {})
    assert isinstance(smp, DPMSolverPPSampler) and smp.algorithm_type == SDE
    assert smp.sigma_grid == ("karras" if karras else None)
    ode = fastdiff.sample(net, steps=10, sampler="dpm++", noise=x_T, prediction_type="v_prediction",
                          use_karras_sigmas=karras)  # fmt: skip
    assert not torch.allclose(ode, got, atol=1e-3)  # the SDE run differs from the ODE run


@pytest.mark.filterwarnings("ignore:.*deprecated:FutureWarning")
@pytest.mark.parametrize("algo", ["dpmsolver", "sde-dpmsolver"])
def test_schedule_with_another_algorithm_type_is_refused(algo):
    net = _Net().eval()
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type=algo,
                                                  final_sigmas_type="sigma_min")  # fmt: skip
    with pytest.raises(ValueError, match=rf"algorithm_type: .*got {algo!r}"):
        fastdiff.sample(net, steps=4, sampler="dpm++", schedule=sched, shape=(3, 8, 8))


@torch.no_grad()
def test_batch_equals_singles_with_generator_list_and_guidance():
    net = _Net(num_classes=4).eval()
    labels = torch.tensor([1, 3, 0])
    kw = dict(steps=8, sampler="dpm++", algorithm_type=SDE, shape=(3, 8, 8), guidance_scale=2.5)
    batch = fastdiff.sample(net, generator=_gens([1, 2, 3]), cond=labels, **kw)
    for k, seed in enumerate([1, 2, 3]):
        one = fastdiff.sample(net, generator=_gens([seed]), cond=labels[k : k + 1], **kw)
        assert (batch[k] - one[0]).abs().max().item() <= 1e-5, k
    other = fastdiff.sample(net, generator=_gens([9, 2, 3]), cond=labels, **kw)
    assert not torch.allclose(other[0], batch[0]) and torch.allclose(other[1], batch[1], atol=1e-5)
    plain = fastdiff.sample(net, generator=_gens([1, 2, 3]), cond=labels,
                            **{**kw, "guidance_scale": None})  # fmt: skip
    assert not torch.allclose(plain, batch)


@torch.no_grad()
def test_philox_run_is_reproducible_with_manual_seed_and_advances():
    net = _Net().eval()
    kw = dict(steps=6, sampler="dpm++", algorithm_type=SDE, shape=(3, 8, 8), batch_size=2)
    torch.manual_seed(123)
    a = fastdiff.sample(net, **kw)
    torch.manual_seed(123)
    b = fastdiff.sample(net, **kw)
    torch.manual_seed(124)
    c = fastdiff.sample(net, **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    smp = DPMSolverPPSampler(NoiseSchedule("linear"), 6, algorithm_type=SDE)
    x, mo = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    gs = torch.tensor([42, 8])
    got = smp.step(mo, 0, x, generator_state=gs)
    assert gs.tolist() == [42, 8 + x.numel()]  # advanced past the counters used
    z = philox_randn(torch.tensor([42, 8]), x.shape)
    torch.testing.assert_close(got, smp.step(mo, 0, x, noise=z), rtol=0, atol=1e-5)


def _graph_passes_sde_noise() -> bool:
    """Whether fastdiff/_graph.py hands the DPM step its noise buffer / Philox state (the
    lead's side of this feature; see the s10 "sde" report)."""
    from fastdiff import _graph

    src = inspect.getsource(_graph._StepGraph._body)
    head = src.split("else:")[0]
    return "noise" in head or "skw" in head


@pytest.mark.xfail(not _graph_passes_sde_noise(), strict=True,
                   reason="fastdiff/_graph.py's multistep branch passes no noise yet")  # fmt: skip
@pytest.mark.parametrize("philox", [False, True], ids=["generator", "philox"])
@torch.no_grad()
def test_cuda_graph_loop_equals_eager(philox, fake_cuda_graphs, monkeypatch):
    from fastdiff import api

    net = _Net(num_classes=4).eval()
    eager_loop = api._sample_eager

    def run(graphed, call):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        torch.manual_seed(call)
        gens = None if philox else _gens([call, call + 1])
        return fastdiff.sample(net, steps=6, sampler="dpm++", algorithm_type=SDE,
                               shape=(3, 8, 8), batch_size=2, generator=gens,
                               cond=torch.tensor([call, 1]), guidance_scale=2.0,
                               return_trajectory=True)  # fmt: skip

    out = _graphed_equals_eager(run)
    assert len(fake_cuda_graphs) == 1
    assert fake_cuda_graphs[0].noise is None if philox else fake_cuda_graphs[0].noise is not None
    assert not torch.allclose(out, run(False, 1)[0])
