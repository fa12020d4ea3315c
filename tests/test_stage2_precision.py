"""Heun's / DPM2's / DPM2 a's second stage, call by call, under the FlashAttention rule against
diffusers' own step in the same dtype, and the eps term of ``dpm_solver_2m_step`` (coef[7]) that
lets them form it as diffusers does.

The second stage is x_sigma + h d with the ODE derivative d = (x' - x0) / sigma' at its sample
x' (Karras et al. 2022, eq. 4), i.e. the model's eps. diffusers computes d from its x0
prediction; where sigma' is small against h (few steps, the end of a Karras / beta grid) its
fp32 step loses digits to that cancellation, and so did fastdiff's former x0-form row (c_x x +
c_x0 x0 with |c_x|, |c_x0| ~ h / sigma'; up to ~5x diffusers' own error). With the eps term the
rows have no cancelling terms: Heun [a', s', 1/2, 0, a' / (2 a_i), 0, 0, a' h / 2], DPM2
[a_m, s_m, 0, 0, a_{i+1} / a_i, a_{i+1} sigma_up, 0, a_{i+1} (t - sigma_i)].

Per call (tests/_stage2_ref.py): both sides start from the same float64 state, each rounded to
the working dtype in its own space; the error vs a float64 run of the same update must be <= 2x
diffusers' own error in that dtype plus a floor of 2 units of the dtype's rounding (relative to
the result's max; the two sides round their inputs in different spaces, which alone costs
~1 ulp), with the NaN / inf masks equal. Backends: every one available here (torch, cpu,
triton interpreted), fp32 and fp16; bf16 on the backends with bf16 arithmetic here.
"""

from __future__ import annotations

import importlib.util
import math

import _dpm_step_ref as _ref
import pytest
import torch
from _dpm_step_ref import PREDS
from _dpm_step_ref import coef as _coef
from _dpm_step_ref import inputs as _inputs
from _dpm_step_ref import layouts as _layouts
from _dpm_step_ref import step as _step
from _stage2_ref import run_calls
from helpers import assert_fa_rule, backend_cases, case_id

from fastdiff.ops.sampler_step import dpm_solver_2m_step

# the per-call checks compare with diffusers' schedulers (the op tests do not need it)
needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed"
)
CASES = backend_cases("dpm_solver_2m_step")
INTERP = ("cpu", "triton")  # the Triton interpreter: no bf16 arithmetic, slow

# (kind, schedule, steps, options): calls where sigma' << h (the cancellation), v / sample
# models, clip_sample, Karras / beta grids, cosine (sigma_max ~ 2e4)
ILL = [
    ("heun", "scaled_linear", 2, {}),
    ("heun", "linear", 2, {"prediction_type": "v_prediction"}),
    ("heun", "scaled_linear", 2, {"use_karras_sigmas": True}),
    ("heun", "linear", 5, {}),
    ("heun", "scaled_linear", 6, {"use_beta_sigmas": True}),
    ("heun", "scaled_linear", 3, {"prediction_type": "sample"}),
    ("heun", "linear", 3, {"clip_sample": True, "clip_sample_range": 0.5}),
    ("dpm2", "scaled_linear", 2, {}),
    ("dpm2", "cosine", 10, {}),
    ("dpm2", "scaled_linear", 5, {"use_karras_sigmas": True, "prediction_type": "v_prediction"}),
    ("dpm2", "scaled_linear", 6, {"use_beta_sigmas": True}),
    ("dpm2_a", "scaled_linear", 2, {}),
    ("dpm2_a", "scaled_linear", 5, {}),
    ("dpm2_a", "cosine", 20, {"timestep_spacing": "trailing"}),
    ("dpm2_a", "linear", 10, {"prediction_type": "v_prediction"}),
]
# the few the interpreter runs (each call is a kernel launch)
ILL_INTERP = [ILL[0], ILL[1], ILL[6], ILL[7], ILL[11]]


def _ill_id(c) -> str:
    kind, sched, steps, opts = c
    extra = "-".join(f"{k}={v}" for k, v in opts.items())
    return f"{kind}-{sched}-{steps}" + (f"-{extra}" if extra else "")


def _dtypes(case) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([] if case == INTERP else [torch.bfloat16])


def _check_run(run, dtype, what: str) -> float:
    """Every call within 2x diffusers' own error plus the floor; returns the largest own error
    of a second stage over the floor (how ill-conditioned the run's calls are)."""
    floor = 2 * torch.finfo(dtype).eps
    worst = 0.0
    calls = [c for c in run.calls if c.in_range]  # inputs past the dtype's range: no claim
    assert len(calls) >= len(run.calls) / 2, f"{what}: most calls out of the dtype's range"
    for c in calls:
        assert c.masks_equal, f"{what} call {c.i}: NaN / inf masks differ"
        assert math.isfinite(c.own), f"{what} call {c.i}: diffusers' own step is not finite"
        assert c.ours <= 2 * c.own + floor, (
            f"{what} call {c.i} (stage {2 if c.stage2 else 1}): {c.ours:.2e} vs diffusers' own "
            f"{c.own:.2e} (2x + {floor:.1e})"
        )
        if c.stage2:
            worst = max(worst, c.own / floor)
    return worst


@needs_diffusers
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("ill", ILL, ids=_ill_id)
def test_stage2_calls_flash_attention_rule(case, ill):
    if case == INTERP and ill not in ILL_INTERP:
        pytest.skip("the interpreter runs the ILL_INTERP subset")
    dev, backend = case
    kind, sched, steps, opts = ill
    # cosine's sigma_max ~ 2e4: x_sigma is past fp16's range (diffusers' step is inf / NaN) and
    # x0's part of the VP sample a x_sigma (a ~ 5e-5) below its resolution
    for dtype in _dtypes(case) if sched != "cosine" else [torch.float32]:
        run = run_calls(kind, sched, steps, opts, dtype=dtype, backend=backend, seed=steps,
                        device=dev)  # fmt: skip
        _check_run(run, dtype, f"{backend} {dtype}")


@needs_diffusers
@pytest.mark.parametrize("ill", [c for c in ILL if c[1] == "scaled_linear"], ids=_ill_id)
def test_stage2_calls_fp16_thousandfold_inputs(ill):
    """x and the model output 1000x larger (fp16 keeps 3 digits at any size: the ratios stay;
    x_sigma = x0 + sigma eps still fits fp16 at scaled_linear's sigma_max ~ 14.6)."""
    kind, sched, steps, opts = ill
    run = run_calls(kind, sched, steps, opts, dtype=torch.float16, backend="cpu", seed=1,
                    scale=1000.0)  # fmt: skip
    _check_run(run, torch.float16, "x1000")


@needs_diffusers
def test_the_cases_are_ill_conditioned_and_the_x0_form_fails_them(monkeypatch):
    """The check bites: on the 2-step calls diffusers' own fp32 error is far above the floor,
    and the former x0-form rows (c_x x + c_x0 x0, no eps term) exceed 2x it there."""
    from fastdiff.samplers import DPM2Sampler, HeunSampler

    run = run_calls("heun", "scaled_linear", 2, backend="cpu", seed=2)
    assert _check_run(run, torch.float32, "heun") > 20
    run = run_calls("dpm2_a", "scaled_linear", 2, backend="cpu")
    assert _check_run(run, torch.float32, "dpm2_a") > 20

    def x0_form(cls):
        rows_of = cls.coefficients

        def rows(self):
            r = rows_of(self)
            for k in range(1, len(r), 2):  # c_x x + c_x0 x0 = c_eps eps for an eps model
                a, s, c_eps = r[k, 0], r[k, 1], r[k, 7]
                r[k, 2] += c_eps / s
                r[k, 3] -= c_eps * a / s
                r[k, 7] = 0.0
            return r

        return rows

    # (the x0 form measured 2.7x there (Heun) and 5.4x (DPM2); ~2.3x / ~2.8x median on seeds)
    for cls, kind, seed in ((HeunSampler, "heun", 2), (DPM2Sampler, "dpm2", 1)):
        monkeypatch.setattr(cls, "coefficients", x0_form(cls))
        run = run_calls(kind, "scaled_linear", 2, backend="cpu", seed=seed)
        with pytest.raises(AssertionError, match="stage 2"):
            _check_run(run, torch.float32, kind)


# ------------------------------------------------------------------------- the op's eps term
# [a, s, c_x, c_x0, c_prev, c_noise, c_prev2, c_eps]: every term nonzero, of mixed signs
ROW = [0.8, 0.6, 0.91, 1.7, -0.95, 0.33, 0.27, -0.45]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("pred", PREDS)
def test_eps_term_against_float64(case, pred, poisoned):
    """c_eps eps with every other operand combination (x0_prev, x0_prev2, noise), CFG and clip
    (eps of the clipped x0), each dtype: the FlashAttention rule vs float64."""
    dev, backend = case
    for dtype in _dtypes(case):
        x, mo, p1, p2, z = _inputs(dev, dtype)
        for prev, prev2, noise in ((None, None, None), (p1, None, None), (p1, None, z),
                                   (p1, p2, z)):  # fmt: skip
            for g, clip in ((2.0, 1.5), (None, None)):
                m = mo if g is not None else mo[: x.shape[0]]
                out, x0 = _step(backend, x, m, _coef(dev, ROW), prev, x0_prev2=prev2,
                                prediction_type=pred, guidance_scale=g, clip_range=clip,
                                noise=noise)  # fmt: skip
                assert out.dtype == dtype and out.shape == x.shape
                r, rx0 = _ref.reference(x, m, prev, prev2, noise, pred, torch.float64, g, clip,
                                        row=ROW)  # fmt: skip
                e, ex0 = _ref.reference(x, m, prev, prev2, noise, pred, dtype, g, clip, row=ROW)
                name = f"{dtype} prev={prev is not None} prev2={prev2 is not None} g={g}"
                assert_fa_rule(out, r, e, atol=1e-6, name=name)
                assert_fa_rule(x0, rx0, ex0, atol=1e-6, name=f"x0 {name}")
                # the term is really there: without it the result is another one
                no_eps, _ = _ref.reference(x, m, prev, prev2, noise, pred, torch.float64, g,
                                           clip, row=[*ROW[:7], 0.0])  # fmt: skip
                assert (no_eps - r).abs().max() > 0.1


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_eps_term_layouts_and_zero_coefficients(case, poisoned):
    """Every layout of x (dense, channels_last, sliced); the stage-2 rows' zero c_x / c_x0
    (their terms absent: an inf x0 does not make NaN) with the eps term formed."""
    dev, backend = case
    for name, x in _layouts(dev, torch.float32):
        mo, p1 = torch.randn_like(x), torch.randn_like(x)
        for row in (ROW, [0.8, 0.6, 0.0, 0.0, 1.2, 0.0, 0.0, -0.7]):
            out, _ = _step(backend, x, mo, _coef(dev, row), p1, prediction_type="v_prediction")
            r, _ = _ref.reference(x, mo, p1, None, None, "v_prediction", torch.float64, row=row)
            e, _ = _ref.reference(x, mo, p1, None, None, "v_prediction", torch.float32, row=row)
            assert_fa_rule(out, r, e, atol=2e-6, name=name)
            if name == "channels_last":
                assert out.is_contiguous(memory_format=torch.channels_last)
    x, mo, p1, _, _ = _inputs(dev, torch.float32, cfg=False)
    x[0, 0, 0, 0] = x[1, 2, 3, 4] = 1e30  # x0 = (x - eps) / 1e-30: inf there, x's term absent
    row = [1e-30, 1.0, 0.0, 0.0, 1.2, 0.0, 0.0, -0.7]
    out, x0 = _step(backend, x, mo, _coef(dev, row), p1)
    assert torch.isinf(x0).any() and torch.isfinite(out).all()
    torch.testing.assert_close(out, 1.2 * p1 - 0.7 * mo, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_eps_term_absent_at_zero_and_formed_otherwise(case):
    """c_eps = 0 forms no term (an infinite eps gives no NaN); a formed term propagates inf /
    NaN of eps (masks as the float64 reference's)."""
    dev, backend = case
    x, mo, p1, _, _ = _inputs(dev, torch.float32, cfg=False)
    row0 = [*ROW[:5], 0.0, 0.0, 0.0]
    mo_bad = mo.clone()
    mo_bad[0, 0, 0, 0], mo_bad[1, 1, 1, 1] = math.inf, math.nan
    s0 = [row0[0], 0.0, *row0[2:]]  # s = 0: eps = (x - a x0) / 0 of a sample model is +-inf
    got, _ = _step(backend, x, mo, _coef(dev, s0), p1, prediction_type="sample")
    ref, _ = _step("torch", x, mo, _coef(dev, s0), p1, prediction_type="sample")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    row = [*row0[:7], 0.5]
    got, _ = _step(backend, x, mo_bad, _coef(dev, row), p1)  # eps model: eps = mo
    r, _ = _ref.reference(x, mo_bad, p1, None, None, "epsilon", torch.float64, row=row)
    assert torch.equal(torch.isnan(got), torch.isnan(r)) and torch.equal(
        torch.isinf(got), torch.isinf(r)
    )
    assert torch.isnan(got).any()


def test_eps_term_passes_opcheck():
    """The custom op (schema, fake, autograd registration) with a formed eps term."""
    x, mo, p1, _, _ = _inputs("cpu", torch.float32, cfg=False)
    args = (x, mo, _coef("cpu", ROW), p1, None, None, "auto", 0, 1.5, None)
    torch.library.opcheck(torch.ops.fastdiff.dpm_solver_2m_step.default, args)


def test_eps_term_gradients():
    """d x_next / d coef[7] is eps (the model output of an eps model), d / d model_output
    gets c_eps (autograd through the torch reference)."""
    x, mo, p1, _, _ = _inputs("cpu", torch.float64, cfg=False)
    x, mo, p1 = x.float(), mo.float().requires_grad_(), p1.float()
    coef = _coef("cpu", ROW).requires_grad_()
    out, _ = dpm_solver_2m_step(x, mo, coef, p1)
    gc, gm = torch.autograd.grad(out.sum(), (coef, mo))
    torch.testing.assert_close(gc[7], mo.detach().sum(), rtol=1e-5, atol=1e-4)
    a, s, c_x0, c_eps = (float(_coef("cpu", ROW)[i]) for i in (0, 1, 3, 7))
    torch.testing.assert_close(gm, torch.full_like(mo, c_eps - c_x0 * s / a), rtol=1e-5, atol=0)
