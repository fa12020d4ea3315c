"""The second history operand of ``dpm_solver_2m_step`` (``x0_prev2``, DPM++ 3M / 3M SDE).

x_next = c_x x + c_x0 x0 + c_prev x0_prev + c_prev2 x0_prev2 + c_noise z with coef
[a, s, c_x, c_x0, c_prev, c_noise, c_prev2, 0] (c_eps = 0), on every backend against a float64
reference under the FlashAttention rule; an absent operand's term is skipped (never multiplied
by 0); validation; the validated-call cache of the cpu path; one step against diffusers'
``multistep_dpm_solver_third_order_update`` with coefficients derived here.
"""

from __future__ import annotations

import math

import _dpm_step_ref as _ref
import pytest
import torch
from _dpm_step_ref import PREDS
from _dpm_step_ref import coef as _coef
from _dpm_step_ref import dtypes as _dtypes
from _dpm_step_ref import inputs as _inputs
from _dpm_step_ref import layouts as _layouts
from _dpm_step_ref import step as _step
from helpers import assert_fa_rule, backend_cases, case_id, poison_

import fastdiff
from fastdiff.ops._philox import philox_randn
from fastdiff.ops.sampler_step import _unsupported, dpm_solver_2m_step

CASES = backend_cases("dpm_solver_2m_step")
# [a, s, c_x, c_x0, c_prev, c_noise, c_prev2, 0]: every term nonzero, of mixed signs
ROW = [0.8, 0.6, 0.91, 1.7, -0.95, 0.33, 0.27, 0.0]
OP = torch.ops.fastdiff.dpm_solver_2m_step.default


def reference(x, mo, p1, p2, z, pred, dt, g=None, clip=None, row=ROW):
    """The op's math in plain torch in ``dt`` with the fp32-rounded coefficients."""
    return _ref.reference(x, mo, p1, p2, z, pred, dt, g, clip, row=row)


# ---------------------------------------------------------------------------------------- op
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("pred", PREDS)
def test_3m_step_against_float64(case, pred, poisoned):
    dev, backend = case
    coef = _coef(dev, ROW)
    for dtype in _dtypes(case):
        x, mo, p1, p2, z = _inputs(dev, dtype)
        for noise in (None, z):
            for g, clip in ((2.0, 1.5), (None, None)):
                m = mo if g is not None else mo[: x.shape[0]]
                out, x0 = _step(backend, x, m, coef, p1, x0_prev2=p2, prediction_type=pred,
                                guidance_scale=g, clip_range=clip, noise=noise)  # fmt: skip
                assert out.dtype == dtype and out.shape == x.shape
                r, rx0 = reference(x, m, p1, p2, noise, pred, torch.float64, g, clip)
                e, ex0 = reference(x, m, p1, p2, noise, pred, dtype, g, clip)
                name = f"{dtype} noise={noise is not None} g={g}"
                assert_fa_rule(out, r, e, atol=1e-6, name=name)
                assert_fa_rule(x0, rx0, ex0, atol=1e-6, name=f"x0 {name}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_3m_step_fp16_large_values_stay_finite(case):
    dev, backend = case
    x, mo, p1, p2, z = _inputs(dev, torch.float16, cfg=False, scale=1000.0)
    p1, p2 = p1 * 1000, p2 * 1000
    out, x0 = _step(
        backend, x, mo, _coef(dev, ROW), p1, x0_prev2=p2, noise=z, prediction_type="sample"
    )
    assert torch.isfinite(out).all() and torch.isfinite(x0).all()
    r, _ = reference(x, mo, p1, p2, z, "sample", torch.float64)
    e, _ = reference(x, mo, p1, p2, z, "sample", torch.float16)
    assert_fa_rule(out, r, e, atol=1e-2, name="x1000")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_3m_step_layouts_and_philox(case, poisoned):
    """Every layout of x; x0_prev2 in another layout and dtype than x (made dense / cast);
    in-kernel Philox noise (the state is not modified)."""
    dev, backend = case
    coef = _coef(dev, ROW)
    for name, x in _layouts(dev, torch.float32):
        mo, p1 = torch.randn_like(x), torch.randn_like(x)
        p2_variants = {
            "like x": torch.randn_like(x),
            "transposed": torch.randn(x.shape[::-1], device=dev).permute(3, 2, 1, 0),
            "fp16": torch.randn_like(x).half(),
        }
        gs = torch.tensor([2**40 + 12345, 7], dtype=torch.int64, device=dev)
        for pname, p2 in p2_variants.items():
            out, _ = _step(backend, x, mo, coef, p1, x0_prev2=p2, prediction_type="v_prediction",
                           generator_state=gs)  # fmt: skip
            assert gs.tolist() == [2**40 + 12345, 7]
            z = philox_randn(gs, tuple(x.shape))
            r, _ = reference(x, mo, p1, p2, z, "v_prediction", torch.float64)
            e, _ = reference(x, mo, p1, p2.float(), z, "v_prediction", torch.float32)
            assert_fa_rule(out, r, e, atol=2e-6, name=f"{name} / {pname}")
            if name == "channels_last":
                assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_absent_operand_term_is_skipped_not_zeroed(case):
    """A NaN / inf coefficient of an absent operand does not reach the output: without
    x0_prev2, c_prev2 is never read; without noise, c_noise; the other way round, a NaN
    c_prev2 does reach it when x0_prev2 is given (the term is really there). (coef[7] is the
    eps term's c_eps, whose operand is always there: tests/test_stage2_precision.py.)"""
    dev, backend = case
    x, mo, p1, p2, z = _inputs(dev, torch.float32, cfg=False)
    clean = [*ROW[:5], 0.0, 0.0, 0.0]
    base, _ = _step(backend, x, mo, _coef(dev, clean), p1)
    for bad in (math.nan, math.inf):
        for slot in (5, 6):
            row = list(clean)
            row[slot] = bad
            got, _ = _step(backend, x, mo, _coef(dev, row), p1)
            assert torch.equal(got, base), f"coef[{slot}] = {bad} leaked"
        row = [*clean[:6], 0.25, 0.0]
        row[5] = bad  # c_noise, no noise: skipped with x0_prev2 present too
        got, _ = _step(backend, x, mo, _coef(dev, row), p1, x0_prev2=p2)
        ref, _ = _step(backend, x, mo, _coef(dev, [*clean[:6], 0.25, 0.0]), p1, x0_prev2=p2)
        assert torch.isfinite(got).all() and torch.equal(got, ref)
    nan_row = [*clean[:6], math.nan, 0.0]
    got, _ = _step(backend, x, mo, _coef(dev, nan_row), p1, x0_prev2=p2)
    assert torch.isnan(got).all()
    # a NaN-filled history buffer: counted when given
    got, _ = _step(backend, x, mo, _coef(dev, ROW), p1, x0_prev2=torch.full_like(p2, math.nan))
    assert torch.isnan(got).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_c_prev2_equals_the_2m_step(case):
    dev, backend = case
    x, mo, p1, p2, z = _inputs(dev, torch.float32, cfg=False)
    row = [*ROW[:6], 0.0, 0.0]
    two, _ = _step(backend, x, mo, _coef(dev, row), p1, noise=z)
    three, _ = _step(backend, x, mo, _coef(dev, row), p1, x0_prev2=p2, noise=z)
    assert torch.equal(two, three)
    moved, _ = _step(backend, x, mo, _coef(dev, ROW), p1, x0_prev2=p2, noise=z)
    assert not torch.allclose(moved, two)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_opcheck_3m(case):
    dev, backend = case
    coef = _coef(dev, ROW)
    x, mo, p1, p2, z = _inputs(dev, torch.float32, shape=(2, 3, 4, 5))
    gs = torch.tensor([11, 4], dtype=torch.int64, device=dev)
    torch.library.opcheck(OP, (x, mo, coef, p1, z, None, backend, 1, 1.0, 3.0, p2))
    torch.library.opcheck(OP, (x, mo[:2], coef, p1, None, gs, backend, 0, None, None, p2))
    grads = [t.clone().requires_grad_(True) for t in (x, p1, p2)]
    torch.library.opcheck(OP, (grads[0], mo, coef, grads[1], z, None, backend, 1, None, 2.0,
                               grads[2]))  # fmt: skip


def test_gradient_through_x0_prev2_is_c_prev2():
    x, mo, p1, p2, _ = _inputs("cpu", torch.float32, cfg=False)
    p2.requires_grad_(True)
    coef = _coef("cpu", ROW).requires_grad_(True)
    out, _ = dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=p2)
    g2, gc = torch.autograd.grad(out.sum(), (p2, coef))
    torch.testing.assert_close(g2, torch.full_like(p2, ROW[6]))
    torch.testing.assert_close(gc[6], p2.detach().sum())


def test_compiled_call_passes_x0_prev2():
    x, mo, p1, p2, _ = _inputs("cpu", torch.float32, cfg=False)
    coef = _coef("cpu", ROW)

    def f(x, mo, coef, p1, p2):
        return dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=p2)

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, mo, coef, p1, p2)
    ref = f(x, mo, coef, p1, p2)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_validation_names_the_argument_and_writes_nothing():
    coef = _coef("cpu", ROW)
    x, mo, p1, p2, z = _inputs("cpu", torch.float32, cfg=False)
    snap = [t.clone() for t in (x, mo, p1, p2, z, coef)]
    bad = [
        (dict(x0_prev=None, x0_prev2=p2), ValueError, "x0_prev2 .*needs x0_prev"),
        (dict(x0_prev2=torch.randn(2, 3, 7, 5)), ValueError, "x0_prev2 must have x's shape"),
        (dict(x0_prev2=p2.to(torch.int32)), TypeError, "x0_prev2 must be float32"),
        (dict(x0_prev2=p2.to(torch.float64)), TypeError, "x0_prev2 must be float32"),
        (dict(x0_prev2=p2.to("meta")), ValueError, "x0_prev2 is on meta"),
        (dict(x0_prev2=p2.numpy()), TypeError, "x0_prev2 must be a torch.Tensor"),
    ]
    for backend in dict.fromkeys(b for _, b in CASES):  # in order (a set is PYTHONHASHSEED order)
        for kw, exc, msg in bad:
            kw = {"x0_prev": p1, **kw}
            with fastdiff.use_backend(backend), pytest.raises(exc, match=msg) as e:
                dpm_solver_2m_step(x, mo, coef, **kw)
            assert str(e.value).startswith("dpm_solver_2m_step: ")
    for a, b in zip((x, mo, p1, p2, z, coef), snap, strict=True):
        assert torch.equal(a, b)


def test_x0_prev2_is_keyword_only():
    x, mo, p1, p2, _ = _inputs("cpu", torch.float32, cfg=False)
    with pytest.raises(TypeError):
        dpm_solver_2m_step(x, mo, _coef("cpu", ROW), p1, p2)


@pytest.mark.skipif(("cpu", "cpu") not in CASES, reason="needs the cpu backend")
def test_cpu_cache_tells_calls_with_and_without_x0_prev2_apart():
    """The validated-call cache keys on x0_prev2's presence and layout: a call with it never
    reuses an entry made without it (and vice versa), and a repeat reads its current values."""
    coef = _coef("cpu", ROW)
    x, mo, p1, p2, _ = _inputs("cpu", torch.float32, shape=(2, 4, 8, 8), cfg=False)

    def ref(p2_):
        return OP(x, mo, coef, p1, None, None, "cpu", 0, None, None, p2_)

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))

    z = torch.randn_like(x)
    for _ in range(3):  # first call, then cached repeats, alternating
        assert same(dpm_solver_2m_step(x, mo, coef, p1), ref(None))
        assert same(dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=p2), ref(p2))
        want = OP(x, mo, coef, p1, z, None, "cpu", 0, None, None, p2)
        assert same(dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=p2, noise=z), want)
        p2.mul_(-1.5)
    cl = p2.contiguous(memory_format=torch.channels_last)  # another layout: re-planned
    assert same(dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=cl), ref(p2))
    with pytest.raises(ValueError, match="x0_prev2 must have x's shape"):
        dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=p2[:1])
    with pytest.raises(ValueError, match="needs x0_prev"):
        dpm_solver_2m_step(x, mo, coef, None, x0_prev2=p2)


def test_every_kernel_backend_built_here_takes_x0_prev2():
    """No backend that runs the 2M step lacks the 3M operand (a stale fastdiff._C would)."""
    x = torch.empty(1)
    assert _unsupported(x, x) == _unsupported(x)


@pytest.mark.skipif(("cpu", "cpu") not in CASES, reason="needs the cpu backend")
def test_raw_cpu_binding_refuses_x0_prev2_outside_a_3m_step():
    """The C++ boundary: x0_prev2 with mode 0 or without x0_prev is a ValueError, nothing
    written; the planned entry point takes it as a twelfth argument."""
    from fastdiff import _ext

    c = _ext.native()
    x, mo, q = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    coef = _coef("cpu", ROW)
    out = poison_(torch.empty(2, 3))

    def call(mode, z):
        c.sampler_step_cpu(mode, 2, 3, 0, 3, x.data_ptr(), 3, mo.data_ptr(), 3, 0, 0, 0, 0, z, 3,
                           0, 0, 0, coef.data_ptr(), out.data_ptr(), 0, 0, 0, 2, False, 0.0,
                           False, False, 0.0, q.data_ptr(), 3)  # fmt: skip

    for mode, z in ((0, x.data_ptr()), (1, 0)):
        with pytest.raises(ValueError, match="x0_prev2 needs mode 1 and x0_prev"):
            call(mode, z)
    assert torch.isnan(out).all()
    call(1, x.data_ptr())  # prediction "sample": x0 = mo
    r = ROW
    want = r[2] * x + r[3] * mo + r[4] * x + r[6] * q
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    plan = c.sampler_step_cpu_plan(1, 2, 3, 0, 3, 3, 0, 3, 0, 0, 0, 0, 3, 0, 0, 2, False, False,
                                   False, False, 0, 3)  # fmt: skip
    ptrs = [x.data_ptr(), mo.data_ptr(), x.data_ptr(), 0, coef.data_ptr(), out.data_ptr(), 0]
    poison_(out)
    c.sampler_step_cpu_run(plan, *ptrs, 0.0, 0.0, 0, q.data_ptr())
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    poison_(out)
    c.sampler_step_cpu_run(plan, *ptrs, 0.0, 0.0, 0)  # no x0_prev2: the 2M step
    torch.testing.assert_close(out, want - r[6] * q, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="got 15"):  # 14 at most (x0_prev3, x0_prev4 trail)
        c.sampler_step_cpu_run(plan, *ptrs, 0.0, 0.0, 0, 0, 0, 0, 0)


# ---------------------------------------------------------------------- diffusers 3M formula
def _third_order_row(sched, i: int, sde: bool) -> list[float]:
    """[a, s, c_x, c_x0, c_prev, c_noise, c_prev2, 0] of diffusers' third-order update at step
    ``i``, in float64: x_t = c_x x + A0 D0 + A1 D1 + A2 D2 with D0 = m0,
    D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0 + r1),
    D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1, written out in m0, m1, m2."""
    sig = sched.sigmas.double()

    def alpha_sigma(s):
        a = 1.0 / math.sqrt(float(s) ** 2 + 1.0)
        return a, float(s) * a

    (at, st), (a0, s0), (a1, s1), (a2, s2) = (alpha_sigma(sig[i + k]) for k in (1, 0, -1, -2))
    lt, l0, l1, l2 = (
        math.log(a) - math.log(s) for a, s in ((at, st), (a0, s0), (a1, s1), (a2, s2))
    )
    h, h0, h1 = lt - l0, l0 - l1, l1 - l2
    r0, r1 = h0 / h, h1 / h
    if sde:
        e2 = math.exp(-2.0 * h)
        c_x = st / s0 * math.exp(-h)
        A0 = at * (1.0 - e2)
        A1 = at * ((1.0 - e2) / (-2.0 * h) + 1.0)
        A2 = at * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        c_noise = st * math.sqrt(1.0 - e2)
    else:
        e1 = math.exp(-h)
        c_x = st / s0
        A0 = -at * (e1 - 1.0)
        A1 = at * ((e1 - 1.0) / h + 1.0)
        A2 = -at * ((e1 - 1.0 + h) / h**2 - 0.5)
        c_noise = 0.0
    k = r0 / (r0 + r1)
    # d = D1_0 - D1_1 = m0/r0 - m1 (1/r0 + 1/r1) + m2/r1
    d0, d1, d2 = 1.0 / r0, -(1.0 / r0 + 1.0 / r1), 1.0 / r1
    # D1 = (m0 - m1)/r0 + k d, D2 = d / (r0 + r1)
    c0 = A0 + A1 * (1.0 / r0 + k * d0) + A2 * d0 / (r0 + r1)
    c1 = A1 * (-1.0 / r0 + k * d1) + A2 * d1 / (r0 + r1)
    c2 = A1 * k * d2 + A2 * d2 / (r0 + r1)
    return [a0, s0, c_x, c0, c1, c_noise, c2, 0.0]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("pred", ["epsilon", "sample"])
def test_one_3m_step_equals_diffusers_third_order_update(case, algo, pred):
    diffusers = pytest.importorskip("diffusers")
    dev, backend = case
    sched = diffusers.DPMSolverMultistepScheduler(solver_order=3, algorithm_type=algo)
    sched.set_timesteps(12)
    i = 5
    sched._step_index = i
    x, mo, p1, p2, z = _inputs("cpu", torch.float32, shape=(2, 3, 8, 8), cfg=False)
    row = _third_order_row(sched, i, algo.startswith("sde"))
    a0, s0 = row[0], row[1]
    m0 = mo if pred == "sample" else (x.double() - s0 * mo.double()) / a0
    m0 = sched.convert_model_output(mo, sample=x) if pred == "epsilon" else m0
    want = sched.multistep_dpm_solver_third_order_update(
        [p2, p1, m0.float()], sample=x, noise=z if algo.startswith("sde") else None
    )
    noise = z.to(dev) if algo.startswith("sde") else None
    got, x0 = _step(backend, x.to(dev), mo.to(dev), _coef(dev, row), p1.to(dev),
                    x0_prev2=p2.to(dev), noise=noise, prediction_type=pred)  # fmt: skip
    torch.testing.assert_close(x0.cpu(), m0.float(), rtol=1e-5, atol=1e-5)
    err = (got.cpu().double() - want.double()).abs().max() / want.double().abs().max()
    assert err <= 1e-5, f"relative error {err:.2e}"
