"""A term of a fused step whose coefficient is exactly 0 is absent: it contributes exactly 0
whatever its operand (inf, NaN), on every backend (the sampler's math has no such term: LCM's eps
after clip_sample, DDIM's x, DDPM's eps, PNDM's warm-up rows); a formed term still propagates
inf / NaN. Each op x backend against a float64 reference that forms only the non-zero terms,
plus whole LCM / PNDM runs with an injected inf against diffusers' loops."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PARITY_RTOL, backend_cases, case_id

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.ops.sampler_step import dpm_solver_2m_step, sampler_step
from fastdiff.ops.unipc_step import unipc_step

SHAPE = (2, 3, 5, 7)
BAD = [float("inf"), float("-inf"), float("nan")]
SPOT = (1, 2, 3, 4)  # the poisoned element


def _finite_expected(nonzero: bool, where: str, bad: float, x0_formed: bool = True) -> bool:
    """The reference is finite: the poisoned term is absent, and the poison does not reach a
    formed term otherwise (a NaN x or output makes x0 NaN; an infinite one is clipped)."""
    return not nonzero and not (math.isnan(bad) and where in ("x", "mo") and x0_formed)


def _dtypes(case):
    return [torch.float32, torch.float16]


def _rand(seed: int, dev: str, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g).to(dev) for _ in range(n)]


def _ref_sum(terms):
    """float64 sum of the terms (c, v) with c != 0 (the others are absent)."""
    out = 0.0
    for c, v in terms:
        c = torch.as_tensor(c, dtype=torch.float64)
        if c.ndim == 0 and float(c) == 0.0:
            continue
        v = v.double()
        out = out + (c * torch.where(c == 0, 0.0, v) if c.ndim else c * v)
    return out


def _x0_eps(x, m, a, s, clip):
    x, m = x.double(), m.double()
    eps, x0 = m, (x - s * m) / a
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return x0, eps


def _check(got, ref, name, rtol=1e-5):
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.equal(got.isnan(), ref.isnan()), f"{name}: NaN mask differs"
    assert torch.equal(got.isinf(), ref.isinf()), f"{name}: inf mask differs"
    fin = ref.isfinite()
    tol = rtol * max(1.0, ref[fin].abs().max().item())
    assert (got[fin] - ref[fin]).abs().max().item() <= tol, name


# -------------------------------------------------------------------------- sampler_step
# (which coefficient is 0, the poisoned operand): the zero coefficient's operand is inf / NaN
SS_CASES = [
    ("c_eps", "mo"),  # LCM with clip_sample: eps = the output, x0 clipped (finite)
    ("c_x", "x"),  # DDIM: no x term; x0 of an infinite x is clipped
    ("c_noise", "z"),  # a step without noise that is handed one
    ("c_x0+c_x", "x"),  # DDPM-like rows: only eps formed
]
SS_COLS = {"c_x0": 2, "c_eps": 3, "c_x": 4, "c_noise": 5}


def _ss_coef(zero: str, dev: str) -> torch.Tensor:
    ab, abp = 0.5, 0.7
    c = [math.sqrt(ab), math.sqrt(1 - ab), math.sqrt(abp), 0.4, 0.3, 0.2, -1.2, -1.7]
    for name in zero.split("+"):
        c[SS_COLS[name]] = 0.0
    return torch.tensor(c, dtype=torch.float64).float().to(dev)


def _ss_ref(x, mo, coef, z, clip, lv_var=None):
    a, s, c_x0, c_eps, c_x, c_noise, lmax, lmin = coef.double().cpu().tolist()
    x0, eps = _x0_eps(x, mo, a, s, clip)
    terms = [(c_x0, x0), (c_eps, eps), (c_x, x)]
    if z is not None:
        sigma = c_noise
        if lv_var is not None:  # the kernels' fp32 sigma decides whether the term is formed
            f = (lv_var.float() + 1.0) * 0.5
            sigma = (c_noise * torch.exp(0.5 * (f * lmax + (1.0 - f) * lmin))).double()
        terms.append((sigma, z))
    return _ref_sum(terms)


@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
@pytest.mark.parametrize("zero,where", SS_CASES)
@pytest.mark.parametrize("nonzero", [False, True], ids=["zero", "nonzero"])
def test_sampler_step_zero_coefficient_term_is_absent(case, zero, where, nonzero):
    """c = 0: the output equals the reference without the term (finite); the same poison with
    the coefficient made non-zero gives the reference's inf / NaN (a formed term)."""
    dev, backend = case
    for dtype in _dtypes(case):
        for bad in BAD:
            x, mo, z = (t.to(dtype) for t in _rand(7, dev, 3))
            coef = _ss_coef(zero, dev)
            if nonzero:
                coef[[SS_COLS[n] for n in zero.split("+")]] = 0.25
            {"x": x, "mo": mo, "z": z}[where][SPOT] = bad
            with fastdiff.use_backend(backend, op="sampler_step"):
                got = sampler_step(x, mo, coef, noise=z, clip_range=1.0)
            ref = _ss_ref(x.cpu(), mo.cpu(), coef, z.cpu(), 1.0)
            name = f"{backend} {dtype} {zero} {where}={bad}"
            fin = _finite_expected(nonzero, where, bad, "c_x0" not in zero)
            assert bool(torch.isfinite(ref).all()) == fin, name
            _check(got, ref, name, 1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
def test_learned_variance_sigma_of_zero_is_absent(case):
    """A learned variance's sigma is the coefficient of z per element: c_noise = 0 (every
    element) or an fp32 sigma that underflows to 0 (one element) drops an inf z there."""
    dev, backend = case
    x, mo, z, v = _rand(11, dev, 4)
    v = v.clamp(-1, 1)
    z[SPOT] = float("inf")
    z[0, 0, 0, 0] = float("nan")
    for c_noise, v_spot in [(0.0, 0.5), (0.2, -1000.0)]:
        coef = _ss_coef("c_x", dev)
        coef[5] = c_noise
        vv = v.clone()
        vv[SPOT] = v_spot  # f * log var_max + (1 - f) log var_min ~ -256: exp(-128) = 0 in fp32
        if c_noise != 0.0:
            vv[0, 0, 0, 0] = v_spot
        mo2 = torch.cat([mo, vv], dim=1)
        with fastdiff.use_backend(backend, op="sampler_step"):
            got = sampler_step(x, mo2, coef, noise=z, clip_range=1.0, learned_variance=True)
        ref = _ss_ref(x.cpu(), mo.cpu(), coef, z.cpu(), 1.0, lv_var=vv.cpu())
        assert torch.isfinite(ref[SPOT]) and torch.isfinite(ref[0, 0, 0, 0])
        _check(got, ref, f"{backend} c_noise={c_noise}")


# ---------------------------------------------------------------------- dpm_solver_2m_step
# coef [a, s, c_x, c_x0, c_prev, c_noise, c_prev2, 0]
DPM_CASES = [("c_prev", "p"), ("c_prev2", "q"), ("c_noise", "z"), ("c_x", "x"),
             ("c_prev+c_prev2", "q")]  # fmt: skip
DPM_COLS = {"c_x": 2, "c_x0": 3, "c_prev": 4, "c_noise": 5, "c_prev2": 6}


@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
@pytest.mark.parametrize("zero,where", DPM_CASES)
@pytest.mark.parametrize("nonzero", [False, True], ids=["zero", "nonzero"])
def test_dpm_zero_coefficient_term_is_absent(case, zero, where, nonzero):
    """DPM-Solver++ 2M / 2M-SDE / 3M: as sampler_step (x0_prev, x0_prev2, the SDE noise, x)."""
    dev, backend = case
    for dtype in _dtypes(case):
        for bad in BAD:
            x, mo, p, q, z = (t.to(dtype) for t in _rand(5, dev, 5))
            c = [0.8, 0.6, 0.9, 0.3, -0.2, 0.15, 0.05, 0.0]
            for n in zero.split("+"):
                c[DPM_COLS[n]] = 0.25 if nonzero else 0.0
            coef = torch.tensor(c, dtype=torch.float64).float().to(dev)
            {"x": x, "p": p, "q": q, "z": z}[where][SPOT] = bad
            with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
                got, _ = dpm_solver_2m_step(x, mo, coef, x0_prev=p, x0_prev2=q, noise=z,
                                            clip_range=1.0)  # fmt: skip
            a, s, c_x, c_x0, c_p, c_n, c_p2, _ = coef.double().cpu().tolist()
            x0, _ = _x0_eps(x.cpu(), mo.cpu(), a, s, 1.0)
            ref = _ref_sum([(c_x, x.cpu()), (c_x0, x0), (c_p, p.cpu()), (c_p2, q.cpu()),
                            (c_n, z.cpu())])  # fmt: skip
            name = f"{backend} {dtype} {zero} {where}={bad}"
            assert bool(torch.isfinite(ref).all()) == _finite_expected(nonzero, where, bad), name
            _check(got, ref, name, 1e-5 if dtype == torch.float32 else 2e-3)


# ----------------------------------------------------------------------------- unipc_step
# coef [a, s, c_x, c_last, c_m, c_m1, c_m2, p_xc, p_m, p_m1, c_m3, p_m2]
UNI_CASES = [
    ("c_last", "last"),
    ("c_m1+p_m1", "m1"),
    ("c_m2+p_m2", "m2"),
    ("c_m3", "m3"),
    ("c_x", "x"),
    ("p_xc", "last"),  # x_c = ... + c_last last is inf, x_next does not form p_xc x_c
]
UNI_COLS = {"c_x": 2, "c_last": 3, "c_m": 4, "c_m1": 5, "c_m2": 6, "p_xc": 7, "p_m": 8,
            "p_m1": 9, "c_m3": 10, "p_m2": 11}  # fmt: skip


@pytest.mark.parametrize("case", backend_cases("unipc_step"), ids=case_id)
@pytest.mark.parametrize("zero,where", UNI_CASES)
@pytest.mark.parametrize("nonzero", [False, True], ids=["zero", "nonzero"])
@pytest.mark.parametrize("order3", [False, True], ids=["o2", "o3"])
def test_unipc_zero_coefficient_term_is_absent(case, zero, where, nonzero, order3):
    """unipc_step (UniPC, PNDM, DEIS, LMS rows): x_c and x_next against the reference."""
    if where == "m3" and not order3:
        pytest.skip("m_prev3 is an order-3 operand")
    dev, backend = case
    for dtype in _dtypes(case):
        for bad in BAD:
            x, mo, last, m1, m2, m3 = (t.to(dtype) for t in _rand(3, dev, 6))
            c = [0.8, 0.6, 0.9, 0.4, 0.3, -0.2, 0.1, 0.7, 0.2, -0.1, 0.05 if order3 else 0.0,
                 0.03 if order3 else 0.0]  # fmt: skip
            for n in zero.split("+"):
                c[UNI_COLS[n]] = 0.25 if nonzero else 0.0
            coef = torch.tensor(c, dtype=torch.float64).float().to(dev)
            ops = {"x": x, "last": last, "m1": m1, "m2": m2, "m3": m3}
            ops[where][SPOT] = bad
            with fastdiff.use_backend(backend, op="unipc_step"):
                xc, m, xn = unipc_step(x, mo, coef, last, m1, m2, m_prev3=m3 if order3 else None,
                                       clip_range=1.0)  # fmt: skip
            k = coef.double().cpu().tolist()
            m_ref, _ = _x0_eps(x.cpu(), mo.cpu(), k[0], k[1], 1.0)
            xc_ref = _ref_sum([(k[2], x.cpu()), (k[3], last.cpu()), (k[4], m_ref),
                               (k[5], m1.cpu()), (k[6], m2.cpu())]
                              + ([(k[10], m3.cpu())] if order3 else []))  # fmt: skip
            # x_next reads the kernel's fp32 x_c (the reference's own, rounded)
            xn_ref = _ref_sum([(k[7], xc_ref.float()), (k[8], m_ref), (k[9], m1.cpu()),
                               (k[11], m2.cpu())])  # fmt: skip
            name = f"{backend} {dtype} {zero} {where}={bad} o3={order3}"
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            _check(xc, xc_ref, name + " x_c", tol)
            _check(m, m_ref, name + " m", tol)
            _check(xn, xn_ref, name + " x_next", tol)
            fin = bool(torch.isfinite(xn_ref).all())
            assert fin == _finite_expected(nonzero, where, bad), name


# ------------------------------------------------------------------------------ whole runs
diffusers = pytest.importorskip("diffusers")


def _bounded(x, t):
    """A stand-in network whose output stays finite for an infinite input."""
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(0.8 * x.float() + 0.1) + 0.5 * torch.sin(tt / 150.0)


def _spiked(at_call: int):
    """_bounded with an infinite output at SPOT on model call ``at_call``."""
    calls = [0]

    def model(x, t):
        out = _bounded(x, t)
        if calls[0] == at_call:
            out[SPOT] = float("inf")
        calls[0] += 1
        return out

    return model


@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
@pytest.mark.parametrize("at_call", [0, 2])
def test_lcm_clip_sample_run_with_an_infinite_output_is_diffusers(case, at_call):
    """LCM with clip_sample: an infinite model output is clipped in x0 and its eps has
    coefficient 0, so the run stays finite, as diffusers' loop (was NaN at that element)."""
    from diffusers.schedulers import scheduling_lcm

    dev, backend = case
    steps = 4
    zs = torch.randn(steps + 1, *SHAPE, generator=torch.Generator().manual_seed(2))
    theirs = diffusers.LCMScheduler(clip_sample=True)
    theirs.set_timesteps(steps)
    draws = iter(zs[1:])
    model = _spiked(at_call)
    x = zs[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scheduling_lcm, "randn_tensor", lambda *a, **k: next(draws))
        for t in theirs.timesteps:
            x = theirs.step(model(x, t.expand(SHAPE[0])), t, x).prev_sample
    ref = x
    assert torch.isfinite(ref).all()
    from fastdiff.samplers import LCMSampler

    smp = LCMSampler(NoiseSchedule.from_diffusers(theirs), steps, clip_sample=True)
    model = _spiked(at_call)
    x = zs[0].to(dev)
    with fastdiff.use_backend(backend, op="sampler_step"):
        for i, t in enumerate(smp.timesteps):
            n = zs[1 + i].to(dev) if smp.needs_noise(i) else None
            x = smp.step(model(x.cpu(), t.expand(SHAPE[0])).to(dev), i, x, noise=n)
    assert torch.isfinite(x).all(), backend
    err = ((x.cpu().double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert err <= PARITY_RTOL, f"{backend}: rel err {err:.2e}"


@pytest.mark.parametrize("case", backend_cases("unipc_step"), ids=case_id)
@pytest.mark.parametrize("prk", [False, True], ids=["plms", "prk"])
def test_pndm_run_with_an_infinite_output_matches_diffusers_masks(case, prk):
    """PNDM (PLMS / F-PNDM warm-up rows, with their zero weights) with an infinite model output
    at call 1: the non-finite elements are diffusers' (formed terms propagate), the rest equal
    diffusers' loop."""
    dev, backend = case
    steps = 8
    sch = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, skip_prk_steps=not prk)  # fmt: skip
    sch.set_timesteps(steps)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    model = _spiked(1)
    x = z
    for t in sch.timesteps:
        x = sch.step(model(x, t.expand(SHAPE[0])), t, x).prev_sample
    ref = x
    assert not torch.isfinite(ref[SPOT]) and torch.isfinite(ref).sum() == ref.numel() - 1
    from fastdiff.samplers import PNDMSampler

    smp = PNDMSampler(NoiseSchedule.from_diffusers(sch), steps, skip_prk_steps=not prk)
    model = _spiked(1)
    x = z.to(dev)
    with fastdiff.use_backend(backend, op="unipc_step"):
        for i, t in enumerate(smp.timesteps):
            x = smp.step(model(x.cpu(), t.expand(SHAPE[0])).to(dev), i, x)
    got = x.cpu()
    assert torch.equal(got.isfinite(), ref.isfinite()), backend
    fin = ref.isfinite()
    err = ((got[fin].double() - ref[fin].double()).abs().max() / ref[fin].abs().max()).item()
    assert err <= PARITY_RTOL, f"{backend}: rel err {err:.2e}"


@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
def test_ddim_last_step_to_alpha_one_drops_eps_where_diffusers_gives_nan(case):
    """docs/math.md section 5: DDIM's last step with alpha_bar_prev = 1 has eps coefficient 0;
    for an infinite eps diffusers forms 0 * eps = NaN, fastdiff gives x0 (clipped: finite)."""
    from fastdiff.samplers import DDIMSampler

    dev, backend = case
    theirs = diffusers.DDIMScheduler(set_alpha_to_one=True, clip_sample=True)
    theirs.set_timesteps(5)
    g = torch.Generator().manual_seed(6)
    x, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    eps[SPOT] = float("inf")
    t = theirs.timesteps[-1]
    ref = theirs.step(eps, t, x).prev_sample
    assert torch.isnan(ref[SPOT]) and torch.isfinite(ref).sum() == ref.numel() - 1
    smp = DDIMSampler(NoiseSchedule.from_diffusers(theirs), 5, set_alpha_to_one=True,
                      clip_sample=True)  # fmt: skip
    assert float(smp.coefficients()[-1][3]) == 0.0  # c_eps of the last row
    with fastdiff.use_backend(backend, op="sampler_step"):
        got = smp.step(eps.to(dev), smp.steps - 1, x.to(dev)).cpu()
    assert torch.isfinite(got).all() and got[SPOT] == -1.0  # x0 = (x - s inf) / a, clipped
    fin = torch.isfinite(ref)
    err = ((got[fin].double() - ref[fin].double()).abs().max() / ref[fin].abs().max()).item()
    assert err <= PARITY_RTOL, f"{backend}: rel err {err:.2e}"


def test_gradient_of_a_zero_coefficient_is_its_operand():
    """d(out)/d(c) at c = 0 stays the operand (the derivative of c -> c v; a plain select would
    give 0 and freeze a coefficient that starts at 0); d(out)/d(operand) is c = 0."""
    x, mo, p = _rand(9, "cpu", 3)
    coef = torch.tensor([0.8, 0.6, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0], requires_grad=True)
    p.requires_grad_(True)
    out, _ = dpm_solver_2m_step(x, mo, coef, x0_prev=p)
    out.sum().backward()
    torch.testing.assert_close(coef.grad[2], x.sum())  # c_x = 0: d/dc_x = sum of x
    torch.testing.assert_close(coef.grad[4], p.detach().sum())  # c_prev = 0
    assert torch.equal(p.grad, torch.zeros_like(p))
    coef.grad = None
    out = sampler_step(x, mo, coef, clip_range=1.0)
    out.sum().backward()
    torch.testing.assert_close(coef.grad[4], x.sum())  # c_x of sampler_step's row
