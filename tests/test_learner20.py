"""The formulas the DDPM / DDIM / CFG docstrings state, checked against the code in float64.

Each test evaluates a formula exactly as a docstring (or docs/math.md) writes it, with the
paper's equation number, and compares the sampler's coefficients or its step with it:

* DDPM eq. 7 / eq. 11 with a strided step's effective beta'_t = 1 - ab_t / ab_prev
  (improved DDPM section 4), the two fixed variances of DDPM section 3.2;
* improved DDPM eq. 15 at its end points v = 0 / 1, and v not clamped;
* improved DDPM eq. 17 (cosine schedule) for several T, at the paper's t = 1 and t = T;
* DDIM eq. 12 / 16 with eta = 1 as DDPM's ``fixed_small`` step (DDIM section 4.1);
* classifier-free guidance, Ho & Salimans eq. 6 with w against ``guidance_scale`` s = 1 + w.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import stable_seed

from fastdiff import NoiseSchedule
from fastdiff._conditioning import _rescaled_guidance
from fastdiff.samplers import DDIMSampler, DDPMSampler
from fastdiff.samplers.ddim import _combine_cfg

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 steps against float64 references


def _inputs(seed: int, n: int = 3, shape=(2, 3, 5, 7)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _strided(smp, i: int) -> tuple[float, float]:
    """(ab_t, ab_prev) of step i, prev the next listed timestep (ab_prev = 1 after the last)."""
    ab = smp.schedule.alphas_cumprod
    ts = smp.timesteps
    ab_prev = float(ab[int(ts[i + 1])]) if i + 1 < len(ts) else 1.0
    return float(ab[int(ts[i])]), ab_prev


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_rows_are_eq7_with_the_strided_beta(spacing):
    """Every row: eq. 7's weights and both fixed variances with beta'_t = 1 - ab_t / ab_prev;
    beta~'_t <= beta'_t (improved DDPM's two bounds), and no noise at t = 0 (Algorithm 2)."""
    sch = NoiseSchedule("scaled_linear")
    rows = {
        v: DDPMSampler(sch, 37, variance_type=v, timestep_spacing=spacing).coef64
        for v in ("fixed_small", "fixed_large", "learned_range")
    }
    smp = DDPMSampler(sch, 37, timestep_spacing=spacing)
    assert len(set(smp.timesteps.tolist())) == 37
    for i, t in enumerate(smp.timesteps.tolist()):
        ab_t, ab_prev = _strided(smp, i)
        beta = 1 - ab_t / ab_prev
        beta_tilde = (1 - ab_prev) / (1 - ab_t) * beta
        assert beta_tilde <= beta
        for r in rows.values():
            assert r[i, 0] == pytest.approx(math.sqrt(ab_t), rel=1e-14)
            assert r[i, 1] == pytest.approx(math.sqrt(1 - ab_t), rel=1e-14)
            assert r[i, 2] == pytest.approx(math.sqrt(ab_prev) * beta / (1 - ab_t), rel=1e-12)
            assert r[i, 3] == 0.0
            assert r[i, 4] == pytest.approx(
                math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t), rel=1e-12
            )
            assert r[i, 6] == pytest.approx(math.log(beta), rel=1e-12)
            assert r[i, 7] == pytest.approx(math.log(max(beta_tilde, 1e-20)), rel=1e-12)
        noise = {"fixed_small": max(beta_tilde, 1e-20), "fixed_large": beta, "learned_range": 1.0}
        for v, r in rows.items():
            want = 0.0 if t == 0 else math.sqrt(noise[v])
            assert r[i, 5] == pytest.approx(want, rel=1e-12, abs=0.0), (v, i, t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_strided_step_is_eq11(prediction_type):
    """The step is eq. 11 with the strided alpha'_t, beta'_t: 1/sqrt(alpha') (x_t - beta' /
    sqrt(1 - ab_t) eps) + sqrt(beta~') z; a v model's eps = sqrt(ab) v + sqrt(1 - ab) x_t."""
    sch = NoiseSchedule("linear")
    smp = DDPMSampler(sch, 20, clip_sample=False, prediction_type=prediction_type)
    for i in (0, 7, 18):
        x, m, z = _inputs(stable_seed("eq11", prediction_type, i))
        ab_t, ab_prev = _strided(smp, i)
        beta = 1 - ab_t / ab_prev
        x64, m64 = x.double(), m.double()
        eps = m64 if prediction_type == "epsilon" else ab_t**0.5 * m64 + (1 - ab_t) ** 0.5 * x64
        mean = (x64 - beta / (1 - ab_t) ** 0.5 * eps) / (1 - beta) ** 0.5
        sigma = ((1 - ab_prev) / (1 - ab_t) * beta) ** 0.5
        out = smp.step(m, i, x, noise=z)
        torch.testing.assert_close(out.double(), mean + sigma * z.double(), **TOL)


def test_learned_range_end_points_and_no_clamp():
    """Improved DDPM eq. 15, Sigma = exp(v log beta' + (1 - v) log beta~'), v = (r + 1) / 2:
    r = +1 is the fixed_large step, r = -1 the fixed_small one, and r = 3 (v = 2) is not clamped
    back into [beta~', beta'] (sigma^2 = beta'^2 / beta~')."""
    sch = NoiseSchedule("cosine")
    kw = dict(clip_sample=False)
    learned = DDPMSampler(sch, 25, variance_type="learned_range", **kw)
    large = DDPMSampler(sch, 25, variance_type="fixed_large", **kw)
    small = DDPMSampler(sch, 25, variance_type="fixed_small", **kw)
    i = 9
    x, eps, z = _inputs(stable_seed("eq15", i))
    ones = torch.ones_like(x)
    torch.testing.assert_close(
        learned.step(torch.cat([eps, ones], 1), i, x, noise=z), large.step(eps, i, x, noise=z)
    )
    torch.testing.assert_close(
        learned.step(torch.cat([eps, -ones], 1), i, x, noise=z), small.step(eps, i, x, noise=z)
    )
    ab_t, ab_prev = _strided(learned, i)
    beta = 1 - ab_t / ab_prev
    beta_tilde = (1 - ab_prev) / (1 - ab_t) * beta
    mean = small.step(eps, i, x, noise=torch.zeros_like(z)).double()
    out = learned.step(torch.cat([eps, 3 * ones], 1), i, x, noise=z).double()
    sigma = (beta * beta / beta_tilde) ** 0.5
    assert sigma > beta**0.5 * 1.01  # outside the interpolated range
    torch.testing.assert_close(out, mean + sigma * z.double(), **TOL)


@pytest.mark.parametrize("T", [1, 2, 7, 1000])
def test_cosine_schedule_eq17_at_both_ends(T):
    """beta_t = min(1 - ab_t / ab_{t-1}, 0.999) with ab_t = f(t) / f(0) for every t; at the
    paper's t = 1 (index 0) ab = f(1)/f(0); at t = T, f(T) = 0 and the clip makes
    ab_T = 0.001 ab_{T-1}."""
    sch = NoiseSchedule("cosine", num_train_timesteps=T)

    def f(t: int) -> float:
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    want = [min(1 - f(t) / f(t - 1), 0.999) for t in range(1, T + 1)]
    torch.testing.assert_close(sch.betas, torch.tensor(want, dtype=torch.float64), rtol=1e-13,
                               atol=0.0)  # fmt: skip
    ab = sch.alphas_cumprod
    assert ab[0].item() == pytest.approx(min(f(1) / f(0), 1.0) if T > 1 else 0.001, rel=1e-12)
    assert sch.betas[-1].item() == 0.999 and f(T) < 1e-30
    prev = ab[-2].item() if T > 1 else 1.0
    assert ab[-1].item() == pytest.approx(0.001 * prev, rel=1e-12)
    if T > 2:  # below the clip the schedule is eq. 17 exactly
        ref = torch.tensor([f(t) / f(0) for t in range(1, T)], dtype=torch.float64)
        torch.testing.assert_close(ab[:-1], ref, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_eta1_is_the_ddpm_fixed_small_step(spacing):
    """DDIM eq. 12 with eq. 16's sigma at eta = 1 is DDPM's ancestral step with sigma^2 = beta~
    (DDIM section 4.1) on the same timesteps, with prev the next listed timestep and no clip; with
    diffusers' prev rule it is another step under these spacings (T = 1000 is not 30 x 33)."""
    sch = NoiseSchedule("linear")
    kw = dict(clip_sample=False, timestep_spacing=spacing)
    ddim = DDIMSampler(sch, 30, eta=1.0, prev_timestep="list", **kw)
    ddpm = DDPMSampler(sch, 30, variance_type="fixed_small", **kw)
    assert (ddim.timesteps == ddpm.timesteps).all()
    for i in range(30):
        x, eps, z = _inputs(stable_seed("eta1", spacing, i))
        torch.testing.assert_close(ddim.step(eps, i, x, noise=z), ddpm.step(eps, i, x, noise=z),
                                   **TOL)  # fmt: skip
    other = DDIMSampler(sch, 30, eta=1.0, **kw).coef64
    assert abs(other[:, 2] - ddim.coef64[:, 2]).max() > 1e-3


@pytest.mark.parametrize("s", [0.0, 1.0, 2.5, 7.5, -0.5])
def test_cfg_combine_is_eq6_with_s_equal_1_plus_w(s):
    """u + s (c - u) = (1 + w) c - w u with w = s - 1: s = 1 is c, s = 0 is u; the fused op, the
    torch combine (the thresholding path) and rescaled guidance at phi = 0 all compute it."""
    u, c, x = _inputs(stable_seed("cfg", s))
    out = torch.cat([u, c])
    w = s - 1.0
    paper = ((1 + w) * c.double() - w * u.double()).float()
    torch.testing.assert_close(_combine_cfg(out, s), paper, **TOL)
    torch.testing.assert_close(_rescaled_guidance(out, s, 0.0), paper, **TOL)
    if s == 1.0:
        torch.testing.assert_close(_combine_cfg(out, s), c)
    if s == 0.0:
        torch.testing.assert_close(_combine_cfg(out, s), u)
    assert _combine_cfg(out, None) is out
    sch = NoiseSchedule("linear")
    for smp in (DDIMSampler(sch, 10, clip_sample=False),
                DDPMSampler(sch, 10, thresholding=True, sample_max_value=3.0)):  # fmt: skip
        got = smp.step(out, 4, x, noise=torch.zeros_like(x), guidance_scale=s)
        torch.testing.assert_close(got, smp.step(paper, 4, x, noise=torch.zeros_like(x)), **TOL)
