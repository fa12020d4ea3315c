"""The third and fourth history operands of ``dpm_solver_2m_step`` (``x0_prev3`` / ``x0_prev4``,
coef[8] / coef[9]): SA-Solver's predictor-corrector of orders 3-4 and the singlestep SDE of
order 3.

x_next = c_x x + c_x0 x0 + c_prev x0_prev + c_prev2 x0_prev2 + c_prev3 x0_prev3 + c_prev4
x0_prev4 + c_noise z + c_eps eps with coef [a, s, c_x, c_x0, c_prev, c_noise, c_prev2, c_eps,
c_prev3, c_prev4], on every backend against a float64 reference under the FlashAttention rule
(fresh inputs, poisoned outputs, odd sizes, non-contiguous / channels_last, NaN / inf masks); a
zero coefficient drops its term (no 0 * inf = NaN), an absent operand's coefficient is never
read; validation (nothing written); opcheck, autograd, torch.compile; the stale-build refusal;
the C++ boundary.
"""

from __future__ import annotations

import math

import _dpm_step_ref as _ref
import pytest
import torch
from _dpm_step_ref import PREDS
from _dpm_step_ref import coef as _coef
from _dpm_step_ref import dtypes as _dtypes
from _dpm_step_ref import layouts as _layouts
from _dpm_step_ref import step as _step
from helpers import assert_fa_rule, backend_cases, case_id, poison_

import fastdiff
from fastdiff.ops._philox import philox_randn
from fastdiff.ops.sampler_step import _unsupported, dpm_solver_2m_step

CASES = backend_cases("dpm_solver_2m_step")
# every term nonzero, of mixed signs; c_eps too
ROW = [0.8, 0.6, 0.91, 1.7, -0.95, 0.33, 0.27, 0.12, -0.41, 0.19]
OP = torch.ops.fastdiff.dpm_solver_2m_step.default


def _inputs(dev, dtype, **kw):
    """x, the model output, x0_prev .. x0_prev4, z (fresh draws of _dpm_step_ref.inputs)."""
    return _ref.inputs(dev, dtype, history=4, **kw)


def reference(x, mo, ps, z, pred, dt, g=None, clip=None, row=ROW):
    """The op's math in plain torch in ``dt`` with the fp32-rounded coefficients; ``ps`` =
    (x0_prev, x0_prev2, x0_prev3, x0_prev4 or None). Returns (x_next, x0)."""
    p1, p2, p3, p4 = ps
    return _ref.reference(x, mo, p1, p2, z, pred, dt, g, clip, row=row, p3=p3, p4=p4)


# ---------------------------------------------------------------------------------------- op
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("pred", PREDS)
def test_deep_history_step_against_float64(case, pred, poisoned):
    dev, backend = case
    for dtype in _dtypes(case):
        x, mo, p1, p2, p3, p4, z = _inputs(dev, dtype)
        for four in (False, True):
            row = ROW if four else ROW[:9]  # coef of 9: coef[9] is not there to read
            coef = _coef(dev, row)
            q4 = p4 if four else None
            for noise in (None, z):
                for g, clip in ((2.0, 1.5), (None, None)):
                    m = mo if g is not None else mo[: x.shape[0]]
                    out, x0 = _step(backend, x, m, coef, p1, x0_prev2=p2, x0_prev3=p3,
                                    x0_prev4=q4, prediction_type=pred, guidance_scale=g,
                                    clip_range=clip, noise=noise)  # fmt: skip
                    assert out.dtype == dtype and out.shape == x.shape
                    ps = (p1, p2, p3, q4)
                    r, rx0 = reference(x, m, ps, noise, pred, torch.float64, g, clip, row)
                    e, ex0 = reference(x, m, ps, noise, pred, dtype, g, clip, row)
                    name = f"{dtype} four={four} noise={noise is not None} g={g}"
                    assert_fa_rule(out, r, e, atol=1e-6, name=name)
                    assert_fa_rule(x0, rx0, ex0, atol=1e-6, name=f"x0 {name}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_deep_history_nan_inf_masks(case):
    """inf / NaN in the model output and in each history operand reach the output where the
    reference has them (the masks are compared by the FA rule)."""
    dev, backend = case
    x, mo, p1, p2, p3, p4, z = _inputs(dev, torch.float32, cfg=False)
    for t, k in ((mo, 0), (p3, 1), (p4, 2), (p2, 3)):
        t.view(-1)[k * 7] = math.inf
        t.view(-1)[k * 7 + 3] = math.nan
    out, x0 = _step(backend, x, mo, _coef(dev, ROW), p1, x0_prev2=p2, x0_prev3=p3, x0_prev4=p4,
                    noise=z, prediction_type="sample")  # fmt: skip
    ps = (p1, p2, p3, p4)
    r, rx0 = reference(x, mo, ps, z, "sample", torch.float64)
    e, ex0 = reference(x, mo, ps, z, "sample", torch.float32)
    assert torch.isnan(out).any() and torch.isinf(out).any()
    assert_fa_rule(out, r, e, atol=1e-6, name="masks")
    assert_fa_rule(x0, rx0, ex0, atol=1e-6, name="x0 masks")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_deep_history_layouts_and_philox(case, poisoned):
    """Every layout of x; x0_prev3 / x0_prev4 in another layout and dtype than x (made dense /
    cast); in-kernel Philox noise (the state is not modified)."""
    dev, backend = case
    coef = _coef(dev, ROW)
    for name, x in _layouts(dev, torch.float32):
        mo, p1, p2 = (torch.randn_like(x) for _ in range(3))
        variants = {
            "like x": (torch.randn_like(x), torch.randn_like(x)),
            "transposed": tuple(
                torch.randn(x.shape[::-1], device=dev).permute(3, 2, 1, 0) for _ in range(2)
            ),  # fmt: skip
            "fp16": (torch.randn_like(x).half(), torch.randn_like(x).half()),
        }
        gs = torch.tensor([2**40 + 12345, 7], dtype=torch.int64, device=dev)
        for vname, (p3, p4) in variants.items():
            out, _ = _step(backend, x, mo, coef, p1, x0_prev2=p2, x0_prev3=p3, x0_prev4=p4,
                           prediction_type="v_prediction", generator_state=gs)  # fmt: skip
            assert gs.tolist() == [2**40 + 12345, 7]
            z = philox_randn(gs, tuple(x.shape))
            ps = (p1, p2, p3, p4)
            r, _ = reference(x, mo, ps, z, "v_prediction", torch.float64)
            e, _ = reference(x, mo, (p1, p2, p3.float(), p4.float()), z, "v_prediction",
                             torch.float32)  # fmt: skip
            assert_fa_rule(out, r, e, atol=2e-6, name=f"{name} / {vname}")
            if name == "channels_last":
                assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_coefficient_drops_the_term(case):
    """c_prev3 = 0 / c_prev4 = 0 (and c_noise, c_eps = 0): the term is not formed, so an inf /
    NaN operand does not reach the output (kMask), and the result is the 3M step's; a nonzero
    coefficient does form it."""
    dev, backend = case
    x, mo, p1, p2, p3, p4, z = _inputs(dev, torch.float32, cfg=False)
    row3 = [*ROW[:7], 0.0]
    three, _ = _step(backend, x, mo, _coef(dev, row3), p1, x0_prev2=p2, noise=z)
    for bad in (math.inf, math.nan):
        b3, b4 = torch.full_like(p3, bad), torch.full_like(p4, bad)
        got, _ = _step(backend, x, mo, _coef(dev, [*row3, 0.0, 0.0]), p1, x0_prev2=p2,
                       x0_prev3=b3, x0_prev4=b4, noise=z)  # fmt: skip
        assert torch.equal(got, three), f"an operand of {bad} with a zero coefficient leaked"
        # c_noise = 0 with an inf noise, c_eps = 0 with an inf eps (a sample model at s = 0)
        row = [ROW[0], 0.0, *ROW[2:5], 0.0, ROW[6], 0.0, 0.0, 0.0]
        got, _ = _step(
            backend,
            x,
            mo,
            _coef(dev, row),
            p1,
            x0_prev2=p2,
            x0_prev3=b3,
            x0_prev4=b4,
            noise=torch.full_like(z, bad),
            prediction_type="sample",
        )
        ref, _ = reference(x, mo, (p1, p2, None, None), None, "sample", torch.float64, row=row)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    nan3 = [*row3, 0.25, 0.0]
    got, _ = _step(backend, x, mo, _coef(dev, nan3), p1, x0_prev2=p2,
                   x0_prev3=torch.full_like(p3, math.nan), x0_prev4=p4, noise=z)  # fmt: skip
    assert torch.isnan(got).all()
    nan4 = [*row3, 0.0, 0.25]
    got, _ = _step(backend, x, mo, _coef(dev, nan4), p1, x0_prev2=p2, x0_prev3=p3,
                   x0_prev4=torch.full_like(p4, math.nan), noise=z)  # fmt: skip
    assert torch.isnan(got).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_absent_x0_prev4_never_reads_c_prev4(case):
    """Without x0_prev4, coef[9] (NaN / inf here) is not read: the result equals the one with
    coef[9] = 0, and a coef of 9 elements works."""
    dev, backend = case
    x, mo, p1, p2, p3, _, z = _inputs(dev, torch.float32, cfg=False)
    want, _ = _step(backend, x, mo, _coef(dev, ROW[:9]), p1, x0_prev2=p2, x0_prev3=p3, noise=z)
    for bad in (math.nan, math.inf):
        got, _ = _step(backend, x, mo, _coef(dev, [*ROW[:9], bad]), p1, x0_prev2=p2,
                       x0_prev3=p3, noise=z)  # fmt: skip
        assert torch.equal(got, want)
    r, _ = reference(x, mo, (p1, p2, p3, None), z, "epsilon", torch.float64, row=ROW[:9])
    torch.testing.assert_close(want.double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_opcheck_deep_history(case):
    dev, backend = case
    x, mo, p1, p2, p3, p4, z = _inputs(dev, torch.float32, shape=(2, 3, 4, 5))
    coef = _coef(dev, ROW)
    gs = torch.tensor([11, 4], dtype=torch.int64, device=dev)
    torch.library.opcheck(OP, (x, mo, coef, p1, z, None, backend, 1, 1.0, 3.0, p2, p3, p4))
    torch.library.opcheck(OP, (x, mo[:2], coef[:9], p1, None, gs, backend, 0, None, None, p2,
                               p3))  # fmt: skip
    grads = [t.clone().requires_grad_(True) for t in (x, p1, p3, p4)]
    torch.library.opcheck(OP, (grads[0], mo, coef, grads[1], z, None, backend, 1, None, 2.0, p2,
                               grads[2], grads[3]))  # fmt: skip


def test_gradients_through_x0_prev3_and_x0_prev4():
    x, mo, p1, p2, p3, p4, _ = _inputs("cpu", torch.float32, cfg=False)
    p3.requires_grad_(True)
    p4.requires_grad_(True)
    coef = _coef("cpu", ROW).requires_grad_(True)
    out, _ = dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=p2, x0_prev3=p3, x0_prev4=p4)
    g3, g4, gc = torch.autograd.grad(out.sum(), (p3, p4, coef))
    torch.testing.assert_close(g3, torch.full_like(p3, ROW[8]))
    torch.testing.assert_close(g4, torch.full_like(p4, ROW[9]))
    torch.testing.assert_close(gc[8], p3.detach().sum())
    torch.testing.assert_close(gc[9], p4.detach().sum())


def test_compiled_call_passes_x0_prev3_and_x0_prev4():
    x, mo, p1, p2, p3, p4, _ = _inputs("cpu", torch.float32, cfg=False)
    coef = _coef("cpu", ROW)

    def f(x, mo, coef, p1, p2, p3, p4):
        return dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=p2, x0_prev3=p3, x0_prev4=p4)

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, mo, coef, p1, p2, p3, p4)
    ref = f(x, mo, coef, p1, p2, p3, p4)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    assert not torch.equal(ref[0], dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=p2)[0])


def test_validation_names_the_argument_and_writes_nothing():
    x, mo, p1, p2, p3, p4, z = _inputs("cpu", torch.float32, cfg=False)
    coef = _coef("cpu", ROW)
    snap = [t.clone() for t in (x, mo, p1, p2, p3, p4, z, coef)]
    bad = [
        (dict(x0_prev2=None, x0_prev3=p3), ValueError, "x0_prev3 .*needs x0_prev2"),
        (dict(x0_prev3=None, x0_prev4=p4), ValueError, "x0_prev4 .*needs x0_prev3"),
        (dict(x0_prev3=torch.randn(3, 3, 7, 4)), ValueError, "x0_prev3 must have x's shape"),
        (dict(x0_prev4=torch.randn(3, 3, 7)), ValueError, "x0_prev4 must have x's shape"),
        (dict(x0_prev3=p3.to(torch.int32)), TypeError, "x0_prev3 must be float32"),
        (dict(x0_prev4=p4.to(torch.float64)), TypeError, "x0_prev4 must be float32"),
        (dict(x0_prev3=p3.to("meta")), ValueError, "x0_prev3 is on meta"),
        (dict(x0_prev4=p4.numpy()), TypeError, "x0_prev4 must be a torch.Tensor"),
        (dict(coef=coef[:8]), ValueError, r"coef must have >= 10 elements with x0_prev4"),
        (dict(coef=coef[:9]), ValueError, r"coef must have >= 10 elements .*got shape \(9,\)"),
        (dict(coef=coef[:8], x0_prev4=None), ValueError, r">= 9 elements with x0_prev3"),
    ]
    for backend in dict.fromkeys(b for _, b in CASES):  # in order (a set is PYTHONHASHSEED order)
        for kw, exc, msg in bad:
            kw = {"coef": coef, "x0_prev2": p2, "x0_prev3": p3, "x0_prev4": p4, "noise": z, **kw}
            with fastdiff.use_backend(backend), pytest.raises(exc, match=msg) as e:
                dpm_solver_2m_step(x, mo, x0_prev=p1, **kw)
            assert str(e.value).startswith("dpm_solver_2m_step: ")
    for a, b in zip((x, mo, p1, p2, p3, p4, z, coef), snap, strict=True):
        assert torch.equal(a, b)


def test_every_kernel_backend_built_here_takes_x0_prev3():
    """No backend that runs the 3M step lacks x0_prev3 / x0_prev4 (a stale fastdiff._C would)."""
    x = torch.empty(1)
    assert _unsupported(x, x, dpm=True, x0_prev3=x) == _unsupported(x, x, dpm=True)


@pytest.mark.skipif(("cpu", "cpu") not in CASES, reason="needs the cpu backend")
def test_a_stale_build_without_x0_prev3_is_refused_by_name(monkeypatch):
    """A fastdiff._C built before x0_prev3 (no sampler_step_prev4): an explicit cpu request for
    a call with it is a RuntimeError naming the stale build (its kernel would ignore the terms);
    auto runs the torch reference; a 3M call still runs on the cpu kernel."""
    from fastdiff import _ext
    from fastdiff.ops import sampler_step as mod

    real = _ext._C

    class Stale:
        def __getattr__(self, name):
            if name == "sampler_step_prev4":
                raise AttributeError(name)
            return getattr(real, name)

    x, mo, p1, p2, p3, p4, z = _inputs("cpu", torch.float32, cfg=False)
    coef = _coef("cpu", ROW)
    want = _step("torch", x, mo, coef, p1, x0_prev2=p2, x0_prev3=p3, x0_prev4=p4, noise=z)
    monkeypatch.setattr(_ext, "_C", Stale())
    monkeypatch.setattr(mod, "_UNSUPPORTED", [object(), {}, {}, {}, {}])
    with pytest.raises(RuntimeError, match="no x0_prev3 / x0_prev4 operands .*stale build"):
        _step("cpu", x, mo, coef, p1, x0_prev2=p2, x0_prev3=p3, x0_prev4=p4, noise=z)
    got = dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=p2, x0_prev3=p3, x0_prev4=p4, noise=z)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    _step("cpu", x, mo, coef, p1, x0_prev2=p2, noise=z)  # no refusal without x0_prev3


@pytest.mark.skipif(("cpu", "cpu") not in CASES, reason="needs the cpu backend")
def test_raw_cpu_binding_refuses_x0_prev3_without_x0_prev2():
    """The C++ boundary: x0_prev3 without x0_prev2, x0_prev4 without x0_prev3 are ValueErrors,
    nothing written; the planned entry point takes them as a 13th / 14th argument."""
    from fastdiff import _ext

    c = _ext.native()
    x, mo, q, q3, q4 = (torch.randn(2, 3) for _ in range(5))
    coef = _coef("cpu", [*ROW[:7], 0.0, *ROW[8:]])
    out = poison_(torch.empty(2, 3))

    def call(q_, q3_, q4_):
        c.sampler_step_cpu(1, 2, 3, 0, 3, x.data_ptr(), 3, mo.data_ptr(), 3, 0, 0, 0, 0,
                           x.data_ptr(), 3, 0, 0, 0, coef.data_ptr(), out.data_ptr(), 0, 0, 0, 2,
                           False, 0.0, False, False, 0.0, q_, 3, q3_, 3, q4_, 3)  # fmt: skip

    with pytest.raises(ValueError, match="x0_prev3 needs x0_prev2"):
        call(0, q3.data_ptr(), 0)
    with pytest.raises(ValueError, match="x0_prev4 needs x0_prev3"):
        call(q.data_ptr(), 0, q4.data_ptr())
    assert torch.isnan(out).all()
    call(q.data_ptr(), q3.data_ptr(), q4.data_ptr())  # prediction "sample": x0 = mo
    r = ROW
    want = r[2] * x + r[3] * mo + r[4] * x + r[6] * q + r[8] * q3 + r[9] * q4
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    plan = c.sampler_step_cpu_plan(1, 2, 3, 0, 3, 3, 0, 3, 0, 0, 0, 0, 3, 0, 0, 2, False, False,
                                   False, False, 0, 3, 3, 3)  # fmt: skip
    ptrs = [x.data_ptr(), mo.data_ptr(), x.data_ptr(), 0, coef.data_ptr(), out.data_ptr(), 0]
    poison_(out)
    c.sampler_step_cpu_run(plan, *ptrs, 0.0, 0.0, 0, q.data_ptr(), q3.data_ptr(), q4.data_ptr())
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    poison_(out)
    c.sampler_step_cpu_run(plan, *ptrs, 0.0, 0.0, 0, q.data_ptr(), q3.data_ptr())
    torch.testing.assert_close(out, want - r[9] * q4, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="got 15"):
        c.sampler_step_cpu_run(plan, *ptrs, 0.0, 0.0, 0, 0, 0, 0, 0)
