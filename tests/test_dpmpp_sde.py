"""DPM++ SDE (``"dpm++_sde"``, k-diffusion's ``sample_dpmpp_sde``) against diffusers 0.42's
``DPMSolverSDEScheduler``.

diffusers draws the noise of both stages of a step from one torchsde Brownian tree over sigma,
on overlapping intervals: stage 2's increment z_2 = rho z_1 + sqrt(1 - rho^2) w. The reference
runs here replace its ``noise_sampler`` by one returning exactly those increments, built from the
z_1 and w fastdiff is fed (or draws from the same generator), so the runs must agree: relative
error (max |ours - ref| / max |ref|) <= 1e-5 against diffusers' loop in float64 and <= 1e-5 plus
its own fp32 error against its stock fp32 loop. The law itself (the covariance of the two stage
noises) is checked statistically on every backend and through ``sample()``.

Without torchsde diffusers exports a stand-in class; the real one is imported with a placeholder
``torchsde`` module (its Brownian tree is never built here).
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from _dpm_step_ref import dtypes as _dtypes
from _sampler_cases import GraphCase, check_graph_loop, rel, toy
from helpers import (
    DIFFUSERS_BETAS,
    PARITY_RTOL,
    assert_fa_rule,
    assert_no_host_sync,
    backend_cases,
    case_id,
    import_without_torchsde,
)

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.ops._philox import philox_randn
from fastdiff.samplers import DPMSolverSDESampler, make_sampler

diffusers = pytest.importorskip("diffusers")

RTOL = PARITY_RTOL
SHAPE = (2, 3, 5, 7)
STEPS = [1, 2, 5, 12, 25]


SDE = import_without_torchsde(
    "diffusers.schedulers.scheduling_dpmsolver_sde", "DPMSolverSDEScheduler"
)
CONFIGS = {
    "default": ("scaled_linear", {}),
    "karras": ("scaled_linear", {"use_karras_sigmas": True}),
    "v-linear": ("linear", {"prediction_type": "v_prediction"}),
    "leading": ("scaled_linear", {"timestep_spacing": "leading", "steps_offset": 1}),
    "trailing-v": ("scaled_linear", {"timestep_spacing": "trailing",
                                     "prediction_type": "v_prediction"}),
    "exponential": ("linear", {"use_exponential_sigmas": True}),
    "beta-cosine": ("cosine", {"use_beta_sigmas": True}),
    "seeded": ("scaled_linear", {"noise_sampler_seed": 7}),
}  # fmt: skip


def _theirs(cfg: str, n: int, **extra):
    sched, kw = CONFIGS[cfg]
    sch = SDE(**DIFFUSERS_BETAS[sched], **kw, **extra)
    sch.set_timesteps(n)
    return sch


def _ours(cfg: str, n: int, **extra) -> DPMSolverSDESampler:
    sched, kw = CONFIGS[cfg]
    schedule = NoiseSchedule.from_diffusers(SDE(**DIFFUSERS_BETAS[sched]))
    return make_sampler("dpm++_sde", schedule, n, **kw, **extra)


def _draws(smp, seed, shape=SHAPE):
    """One N(0, I) per model call: z_1 at a stage 1, w at a stage 2 (the last unused)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(smp.steps)]


def _increments(smp, draws):
    """diffusers' noise_sampler values, call by call: z_1, rho z_1 + sqrt(1 - rho^2) w."""
    split, out = smp.noise_split(), []
    for j in range(smp.num_inference_steps - 1):
        z1, w = draws[2 * j].double(), draws[2 * j + 1].double()
        out += [z1, split[j, 0] * z1 + split[j, 1] * w]
    return out


def _their_loop(sch, z, incs, model=toy, f64=False, s_noise=1.0):
    """The pipeline loop (init_noise_sigma z, scale_model_input, step) with the Brownian
    increments ``incs``; ``f64``: the same code in float64 (its sigmas cast)."""
    dt = torch.float64 if f64 else torch.float32
    sch.sigmas, it = sch.sigmas.to(dt), iter(incs)
    sch.noise_sampler = lambda s, t: next(it).to(dt)
    x = (z * sch.init_noise_sigma).to(dt)
    for t in sch.timesteps:
        u = sch.scale_model_input(x, t)
        out = model(u.float(), t.round().expand(u.shape[0])).to(dt)
        x = sch.step(out, t, x, s_noise=s_noise).prev_sample
    assert next(it, None) is None  # every increment used
    return x


def _our_loop(smp, z, draws, model=toy):
    x = z * smp.init_noise_scale
    for i in range(smp.steps):
        out = model(x, smp.timesteps[i].expand(x.shape[0]))
        x = smp.step(out, i, x, noise=draws[i] if smp.needs_noise(i) else None)
    return x


def _z(seed=0, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ grid
@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("n", [*STEPS, 50])
def test_grid_and_timesteps_are_diffusers(cfg, n):
    """2N - 1 calls, diffusers' timesteps (rounded; float32 with fractional_timesteps), its
    float32 step sigmas, the model-input noise levels and x_T's scale."""
    sch, smp = _theirs(cfg, n), _ours(cfg, n)
    frac = _ours(cfg, n, fractional_timesteps=True)
    assert len(smp) == len(sch.timesteps) == 2 * n - 1 and smp.num_inference_steps == n
    assert torch.equal(smp.timesteps, sch.timesteps.round().to(torch.int64))
    assert torch.equal(frac.timesteps, sch.timesteps.float())
    assert torch.equal(torch.from_numpy(smp.sigmas()[:-1]).float(), sch.sigmas[0::2])
    levels = []
    sch.noise_sampler = lambda s, t: torch.zeros(1)
    for t in sch.timesteps:  # the sigma scale_model_input divides by, call by call
        levels.append(float(sch.scale_model_input(torch.ones(1), t)))
        sch.step(torch.zeros(1), t, torch.zeros(1))
    assert levels == pytest.approx([1 / math.sqrt(1 + s * s) for s in smp.call_sigmas()[:-1]],
                                   rel=3e-7)  # fp32 division  # fmt: skip
    s0 = float(sch.sigmas[0])
    assert smp.init_noise_scale == pytest.approx(float(sch.init_noise_sigma)
                                                 / math.sqrt(s0 * s0 + 1), rel=1e-7)  # fmt: skip


# ------------------------------------------------------------------------------ runs
@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("n", STEPS)
def test_run_matches_diffusers_with_the_same_increments(cfg, n):
    sch, smp = _theirs(cfg, n), _ours(cfg, n)
    z, draws = _z(n), _draws(smp, 100 + n)
    got = _our_loop(smp, z, draws)
    want64 = _their_loop(_theirs(cfg, n), z, _increments(smp, draws), f64=True)
    want = _their_loop(sch, z, _increments(smp, draws))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel(got, want64) <= RTOL, f"{cfg} {n}: {rel(got, want64):.2e}"
    assert rel(got, want) <= RTOL + rel(want, want64)
    if n > 1:  # the noise matters: another draw lands elsewhere
        assert rel(_our_loop(_ours(cfg, n), z, _draws(smp, 1)), got) > 1e-3


def test_noise_sampler_seed_is_irrelevant():
    """diffusers' Brownian-tree seed: accepted, and fastdiff's run is the same with any."""
    a, b, z = _ours("default", 6), _ours("default", 6, noise_sampler_seed=123), _z(1)
    assert torch.equal(_our_loop(a, z, _draws(a, 2)), _our_loop(b, z, _draws(a, 2)))


@pytest.mark.parametrize("n", [4, 5])
@pytest.mark.parametrize("s_noise", [0.0, 0.5, 1.3])
def test_s_noise_is_diffusers_step_argument(n, s_noise):
    smp = _ours("karras", n, s_noise=s_noise)
    z, draws = _z(3), _draws(smp, 4)
    got = _our_loop(smp, z, draws)
    want64 = _their_loop(_theirs("karras", n), z, _increments(smp, draws), f64=True,
                         s_noise=s_noise)  # fmt: skip
    assert rel(got, want64) <= RTOL
    assert any(smp.needs_noise(i) for i in range(smp.steps)) == (s_noise > 0)


def _kdiffusion64(sig, mid, x, model, eta, s_noise, incs):
    """k-diffusion's sample_dpmpp_sde (r = 1/2) restated in float64 in sigma units: x0 + sigma
    eps, ``model(x_sigma, call)`` the denoiser, ``incs`` the Brownian increments."""
    it = iter(incs)
    call = 0
    for j in range(len(sig) - 1):
        s, nxt = sig[j], sig[j + 1]
        d = model(x, call)
        call += 1
        if nxt == 0:
            x = d
            continue
        up1 = min(mid[j], eta * math.sqrt(mid[j] ** 2 * (s**2 - mid[j] ** 2) / s**2))
        dn1 = math.sqrt(mid[j] ** 2 - up1**2)
        x2 = (dn1 / s) * x + (1 - dn1 / s) * d + next(it) * s_noise * up1
        d2 = model(x2, call)
        call += 1
        up2 = min(nxt, eta * math.sqrt(nxt**2 * (s**2 - nxt**2) / s**2))
        dn2 = math.sqrt(nxt**2 - up2**2)
        x = (dn2 / s) * x + (1 - dn2 / s) * d2 + next(it) * s_noise * up2
    return x


@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_eta_and_every_prediction_type_vs_kdiffusion_float64(eta, pred):
    """k-diffusion's ``eta`` (diffusers has only 1) and a ``sample`` model (diffusers raises
    NotImplementedError) against a float64 restatement of sample_dpmpp_sde."""
    smp = _ours("karras", 6, eta=eta, prediction_type=pred)
    sig, cs = smp.sigmas(), smp.call_sigmas()
    z, draws = _z(5), _draws(smp, 6)

    def raw(xs, i):  # the model's output at VP x = xs a (epsilon / v / x0 of toy's x0)
        s = cs[i]
        a = 1 / math.sqrt(1 + s * s)
        eps = toy(xs.float() * a, smp.timesteps[i].expand(2)).double()
        x0 = xs - s * eps
        return {"epsilon": eps, "v_prediction": a * eps - s * a * x0, "sample": x0}[pred], x0

    got = z * smp.init_noise_scale
    for i in range(smp.steps):
        got = smp.step(raw(got.double() / (1 / math.sqrt(1 + cs[i] ** 2)), i)[0].float(), i,
                       got, noise=draws[i] if smp.needs_noise(i) else None)  # fmt: skip
    x_t = z.double() * smp.init_noise_scale * math.sqrt(1 + sig[0] ** 2)  # sigma units
    incs = _increments(smp, draws)
    want = _kdiffusion64(sig, smp._mid, x_t, lambda xs, i: raw(xs, i)[1], eta, 1.0, incs)
    assert rel(got, want) <= RTOL
    assert any(smp.needs_noise(i) for i in range(smp.steps)) == (eta > 0)


def test_every_step_with_diffusers_own_samples():
    """Each call from diffusers' own sample (its stage-1 input kept by both): ours within
    1e-5 of its step run in float64 and of its fp32 step plus that one's own error."""
    for cfg in ("default", "v-linear", "trailing-v", "karras"):
        smp, sch = _ours(cfg, 6), _theirs(cfg, 6)
        draws = _draws(smp, 8)
        incs = _increments(smp, draws)
        x, cs = _z(9) * sch.init_noise_sigma, smp.call_sigmas()
        for i, t in enumerate(sch.timesteps):
            inc = incs[i] if i < len(incs) else None
            s64 = copy.deepcopy(sch)  # the same state, its step in float64
            s64.sigmas = s64.sigmas.double()
            s64.sample = None if sch.sample is None else sch.sample.double()
            s64.noise_sampler = lambda s, t, v=inc: v
            sch.noise_sampler = lambda s, t, v=inc: v.float()
            a, an = 1 / math.sqrt(1 + cs[i] ** 2), 1 / math.sqrt(1 + cs[i + 1] ** 2)
            out = toy(sch.scale_model_input(x, t), t.round().expand(2))
            want64 = s64.step(out.double(), t, x.double()).prev_sample
            got = smp.step(out, i, (x.double() * a).float(),
                           noise=draws[i] if smp.needs_noise(i) else None)  # fmt: skip
            want = sch.step(out, t, x).prev_sample
            err64, own = rel(got.double() / an, want64), rel(want, want64)
            assert err64 <= RTOL, f"{cfg} call {i}: {err64:.2e}"
            assert rel(got.double() / an, want) <= RTOL + own
            x = want


# ------------------------------------------------------------------------------ the noise law
def _stage_noises(smp, j, z1_and_w, dev):
    """Recover (z_1, z_2) of step j from a ``sample``-model run at x_i = 0 with x0 = 0: stage
    1 gives C z_1, stage 2 R z_2 (R = its noise coefficient over sqrt(1 - rho^2))."""
    x = torch.zeros(1, 1, 512, 512, device=dev)
    zero = torch.zeros_like(x)
    r1, r2 = smp.coef64[2 * j], smp.coef64[2 * j + 1]
    rest = smp.noise_split()[j, 1]
    xm = smp.step(zero, 2 * j, x, **z1_and_w(0))
    xn = smp.step(zero, 2 * j + 1, xm, **z1_and_w(1))
    return (xm / r1[5]).double().cpu().flatten(), (xn / (r2[5] / rest)).double().cpu().flatten()


def _check_law(z1, z2, rho):
    """Unit variances and Cov(z_1, z_2) = rho over 262144 draws (standard error ~0.002): an
    independent (Cov 0) or sign-flipped draw fails by > 0.3."""
    assert abs(z1.var().item() - 1) < 0.02 and abs(z2.var().item() - 1) < 0.02
    cov = ((z1 - z1.mean()) * (z2 - z2.mean())).mean().item()
    assert abs(cov - rho) < 0.015, (cov, rho)


@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
@pytest.mark.parametrize("source", ["generator", "philox"])
def test_stage_noises_have_the_brownian_covariance(case, source):
    dev, backend = case
    smp = _ours("karras", 5, prediction_type="sample")
    rhos = smp.noise_split()[:, 0]
    assert rhos.min() > 0.3 and rhos.max() < 0.95  # far from 0 and 1: the check can fail
    with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
        for j in (0, 2):
            g = torch.Generator().manual_seed(j)
            state = torch.tensor([77 + j, 0], dtype=torch.int64, device=dev)

            def src(k, g=g, state=state):
                return {"generator": g} if source == "generator" else {"generator_state": state}

            z1, z2 = _stage_noises(smp, j, src, dev)
            _check_law(z1, z2, rhos[j])


def test_sample_loop_noises_have_the_brownian_law():
    """Through sample() (generator and in-kernel Philox): from x_T = 0 with a zero x0 model
    the trajectory gives z_1 and z_2 of every step (x_m = A x_i + C z_1, x_next = P x_i + R
    z_2): Cov(z_1, z_2) = rho, and the next step's z_1 is independent of both."""
    smp = _ours("default", 4, prediction_type="sample")
    split, tab = smp.noise_split(), smp.coef64
    for gen in (torch.Generator().manual_seed(3), None):
        torch.manual_seed(4)
        _, traj = fastdiff.sample(lambda x, t: torch.zeros_like(x), sampler=smp,
                                  noise=torch.zeros(1, 1, 512, 512), generator=gen,
                                  return_trajectory=True)  # fmt: skip
        xs = traj["x"].double().flatten(1)
        zs = []
        for j in range(smp.num_inference_steps - 1):
            r1, r2, xi = tab[2 * j], tab[2 * j + 1], xs[2 * j]
            z1 = (xs[2 * j + 1] - r1[2] * xi) / r1[5]
            p = r2[4] + r2[2] * r1[2]  # stage 2's weight of x_i (row: P - k A)
            z2 = (xs[2 * j + 2] - p * xi) / (r2[5] / split[j, 1])
            _check_law(z1, z2, split[j, 0])
            zs.append((z1, z2))
        for (a1, a2), (b1, _) in zip(zs, zs[1:], strict=False):  # different steps: independent
            for a in (a1, a2):
                assert abs(((a - a.mean()) * b1).mean().item()) < 0.015


# ------------------------------------------------------------------------------ backends, dtypes
@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_models_flashattention_rule(case, dtype):
    """fp16 / bf16 state, model outputs and noise, every call on each backend: error vs
    diffusers' step run in float64 on the same (rounded) inputs and increments <= 2x that of
    diffusers' own step run in that dtype, + one ulp of the output's scale. Stage 2 starts from
    our stage-1 sample (both references too), whose z_1 it recovers."""
    dev, backend = case
    if dtype not in _dtypes(case):
        pytest.skip(f"{backend} on {dev} has no {dtype}")
    n, ulp = 6, torch.finfo(dtype).eps
    smp, s64, sh = _ours("karras", n), _theirs("karras", n), _theirs("karras", n)
    s64.sigmas = s64.sigmas.double()
    split, cs, g = smp.noise_split(), smp.call_sigmas(), torch.Generator().manual_seed(11)
    x = _z(12).double() * smp.init_noise_scale  # VP, float64
    with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
        for i, (t, td) in enumerate(zip(smp.timesteps, s64.timesteps, strict=True)):
            a, an = 1 / math.sqrt(1 + cs[i] ** 2), 1 / math.sqrt(1 + cs[i + 1] ** 2)
            xh = x.to(dtype)
            out = (toy(xh.float(), t.expand(2)) + 0.01 * torch.randn(SHAPE, generator=g)).to(dtype)
            noise = torch.randn(SHAPE, generator=g).to(dtype)
            if i % 2 == 0:
                z1, inc = noise, noise.double()
            else:
                j = i // 2
                inc = split[j, 0] * z1.double() + split[j, 1] * noise.double()
            s64.noise_sampler = lambda s, t, v=inc: v
            sh.noise_sampler = lambda s, t, v=inc: v.to(dtype)
            ve = xh.double() / a
            ref = s64.step(out.double(), td, ve).prev_sample * an
            eager = sh.step(out, td, ve.to(dtype)).prev_sample.double() * an
            got = smp.step(out.to(dev), i, xh.to(dev),
                           noise=noise.to(dev) if smp.needs_noise(i) else None)  # fmt: skip
            assert got.dtype == dtype
            assert_fa_rule(got.cpu(), ref, eager, atol=ulp * ref.abs().max().item(),
                           name=f"{backend} {dtype} call {i}")  # fmt: skip
            x = got.cpu().double()


@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
def test_fp32_run_and_philox_stream_on_every_backend(case):
    """A whole fp32 run (v-prediction, trailing) on each backend equals diffusers' float64 loop
    fed the same increments; generator_state: each call's z is philox_randn of the state it is
    given (offset then advanced), the same run fed those z as noise is the same run."""
    dev, backend = case
    smp, fed = _ours("trailing-v", 5), _ours("trailing-v", 5)
    z, draws = _z(13), _draws(smp, 14)
    want64 = _their_loop(_theirs("trailing-v", 5), z, _increments(smp, draws), f64=True)
    gs = torch.tensor([4242, 0], dtype=torch.int64, device=dev)
    with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
        got = _our_loop(smp, z.to(dev), [d.to(dev) for d in draws],
                        model=lambda x, t: toy(x.cpu(), t).to(dev))  # fmt: skip
        x = y = (z * smp.init_noise_scale).to(dev)
        for i, t in enumerate(smp.timesteps):
            out = toy(x.cpu(), t.expand(2)).to(dev)
            state = gs.clone()
            x = smp.step(out, i, x, generator_state=gs)
            zi = philox_randn(state, SHAPE) if smp.needs_noise(i) else None
            y = fed.step(toy(y.cpu(), t.expand(2)).to(dev), i, y, noise=zi)
            assert int(gs[1]) == int(state[1]) + (x.numel() if smp.needs_noise(i) else 0)
            torch.testing.assert_close(x, y, rtol=0, atol=2e-5)
    assert rel(got.cpu(), want64) <= RTOL


# ------------------------------------------------------------------------------ sample()
@pytest.mark.parametrize("as_config", [False, True], ids=["object", "saved-config"])
@pytest.mark.parametrize("cfg", ["default", "karras", "v-linear", "leading"])
def test_sample_with_the_scheduler_is_diffusers_loop(cfg, as_config):
    """sample(schedule=<scheduler or its saved config>) infers "dpm++_sde" with its settings
    (no warning; a saved config also without torchsde), calls the model at diffusers'
    (rounded) timesteps, and with a generator draws x_T then z_1 / w per call: diffusers' loop
    fed the increments of those draws."""
    n = 7
    sch = _theirs(cfg, n)
    arg = json.loads(sch.to_json_string()) if as_config else sch
    z, seen = _z(15), []

    def model(x, t):
        seen.append(int(t[0]))
        return toy(x, t)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fastdiff.sample(model, steps=n, schedule=arg, noise=z,
                              generator=torch.Generator().manual_seed(5))  # fmt: skip
    smp = _ours(cfg, n)
    assert seen == smp.timesteps.tolist() == sch.timesteps.round().long().tolist()
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(SHAPE, generator=g) if smp.needs_noise(i) else None
             for i in range(smp.steps)]  # fmt: skip
    want64 = _their_loop(_theirs(cfg, n), z, _increments(smp, draws), f64=True)
    assert rel(got, want64) <= RTOL
    by_name = fastdiff.sample(toy, steps=n, sampler="dpm++_sde", noise=z,
                              schedule=NoiseSchedule.from_diffusers(sch),
                              generator=torch.Generator().manual_seed(5),
                              **CONFIGS[cfg][1])  # fmt: skip
    assert rel(by_name, got) <= 1e-6


@pytest.mark.parametrize("as_config", [False, True], ids=["object", "saved-config"])
@pytest.mark.parametrize("grid", [None, "karras", "exponential", "beta"])
def test_leftover_sigma_min_max_are_diffusers_behaviour(grid, as_config):
    """``DPMSolverSDEScheduler.from_config(<a config with sigma_min / sigma_max>)`` keeps them
    (an Euler-family config's leftovers); diffusers' exponential / beta grids read them, its
    default and Karras grids ignore them. sample(schedule=that scheduler or its saved config)
    runs diffusers' loop on diffusers' grid either way (no refusal)."""
    n, kw = 5, ({f"use_{grid}_sigmas": True} if grid else {})
    sch = SDE.from_config({**SDE(**DIFFUSERS_BETAS["linear"], **kw).config,
                           "sigma_min": 0.1, "sigma_max": 5.0})  # fmt: skip
    assert (sch.config.sigma_min, sch.config.sigma_max) == (0.1, 5.0)
    arg = json.loads(sch.to_json_string()) if as_config else sch
    z, seen = _z(4), []

    def model(x, t):
        seen.append(int(t[0]))
        return toy(x, t)

    got = fastdiff.sample(model, steps=n, schedule=arg, noise=z,
                          generator=torch.Generator().manual_seed(5))  # fmt: skip
    sch.set_timesteps(n)
    assert seen == sch.timesteps.round().long().tolist()
    reads = grid in ("exponential", "beta")
    assert (abs(float(sch.sigmas[0]) - 5.0) < 1e-4) == reads  # (the check can fail)
    smp = make_sampler("dpm++_sde", NoiseSchedule.from_diffusers(sch), n, **kw,
                       sigma_min=0.1, sigma_max=5.0)  # fmt: skip
    assert torch.equal(torch.from_numpy(smp.sigmas()[:-1]).float(), sch.sigmas[0::2])
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(SHAPE, generator=g) if smp.needs_noise(i) else None
             for i in range(smp.steps)]  # fmt: skip
    fresh = SDE.from_config(sch.config)
    fresh.set_timesteps(n)
    assert rel(got, _their_loop(fresh, z, _increments(smp, draws), f64=True)) <= RTOL


def test_leftover_sigma_ends_are_checked():
    """A leftover sigma_min >= sigma_max under the grids that read them is a ValueError naming
    both (diffusers' grid would run upwards); a wrong type a TypeError, also under Karras."""
    schedule = NoiseSchedule("linear")
    with pytest.raises(ValueError, match="sigma_min, sigma_max: the exponential sigma grid needs"):
        make_sampler("dpm++_sde", schedule, 4, use_exponential_sigmas=True, sigma_min=3.0,
                     sigma_max=2.0)  # fmt: skip
    with pytest.raises(TypeError, match="sigma_max: expected None or a finite float > 0, got str"):
        make_sampler("dpm++_sde", schedule, 4, use_karras_sigmas=True, sigma_max="5")


@pytest.mark.parametrize("kw,exc,match", [
    ({"s_noise": -1.0}, ValueError, "s_noise: expected a finite float >= 0, got -1.0"),
    ({"eta": float("nan")}, ValueError, "eta: expected a finite float >= 0"),
    ({"s_noise": True}, TypeError, "s_noise: expected a finite float >= 0, got bool"),
    ({"noise_sampler_seed": 1.5}, TypeError, "noise_sampler_seed: expected None or an int"),
])  # fmt: skip
def test_bad_options_name_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        make_sampler("dpm++_sde", NoiseSchedule("linear"), 5, **kw)


def test_stage_2_needs_its_stage_1():
    """A stage-2 call without its stage 1 (or after the stage-1 input changed in place) is
    refused by name; a run may start at any stage 1 (img2img)."""
    smp = _ours("default", 4)
    x = _z(16) * smp.init_noise_scale
    with pytest.raises(ValueError, match="model call 1 is the second .* call 0"):
        smp.step(toy(x, smp.timesteps[1].expand(2)), 1, x)
    y = smp.step(toy(x, smp.timesteps[2].expand(2)), 2, x)
    x.add_(1.0)
    with pytest.raises(ValueError, match="modified in place"):
        smp.step(toy(y, smp.timesteps[3].expand(2)), 3, y)


def test_trajectory_x0_rows_are_each_calls_x0_prediction():
    smp = _ours("v-linear", 4)
    z = _z(17)
    out, traj = fastdiff.sample(toy, sampler=smp, noise=z, return_trajectory=True,
                                generator=torch.Generator().manual_seed(1))  # fmt: skip
    xs, cs = traj["x"], smp.call_sigmas()
    assert traj["x0"].shape[0] == smp.steps and torch.equal(xs[-1], out)
    for i in range(smp.steps):
        a = 1 / math.sqrt(1 + cs[i] ** 2)
        v = toy(xs[i], smp.timesteps[i].expand(2))
        torch.testing.assert_close(traj["x0"][i], a * xs[i] - cs[i] * a * v, rtol=1e-5,
                                   atol=1e-5)  # fmt: skip


# ------------------------------------------------------------------------------ img2img, inpaint
class _Fed(SDE):
    """diffusers' scheduler whose Brownian tree is replaced by increments built from draws of
    the loop's generator as fastdiff draws them (z_1 at stage 1, w at stage 2)."""

    gen, split, shape = None, None, None

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.noise_sampler, self._z1 = self._draw, None

    def _draw(self, s, t):
        z = torch.randn(self.shape, generator=self.gen)
        if self.step_index % 2 == 0:
            self._z1 = z
            return z
        rho, rest = self.split[self.step_index // 2]
        return (rho * self._z1.double() + rest * z.double()).float()


@pytest.mark.parametrize("n,strength", [(6, 0.6), (7, 0.5), (5, 1.0), (9, 0.3)])
def test_img2img_start_is_diffusers_order_2_rule(n, strength):
    """sample(image=, strength=): diffusers' img2img start (get_timesteps, begin index t_start
    x order 2, add_noise = image + sigma z, a stage 1 first) with the same generator."""
    from test_img2img import _diffusers_img2img
    from test_img2img import _model as pointwise

    image = _z(18).clamp(-1, 1)
    smp = _ours("karras", n)
    sch = _Fed(**DIFFUSERS_BETAS["scaled_linear"], use_karras_sigmas=True)
    sch.gen, sch.split, sch.shape = torch.Generator().manual_seed(6), smp.noise_split(), SHAPE
    got = fastdiff.sample(pointwise, steps=n, sampler="dpm++_sde", schedule="scaled_linear",
                          use_karras_sigmas=True, image=image, strength=strength,
                          generator=torch.Generator().manual_seed(6))  # fmt: skip
    with torch.no_grad():
        want, ts = _diffusers_img2img("dpm++_sde", sch, image, strength, n, sch.gen)
    assert len(ts) == smp.steps - smp.img2img_start(strength)
    assert smp.img2img_start(strength) % 2 == 0
    assert rel(got, want) <= RTOL, rel(got, want)


@pytest.mark.parametrize("mname", ["binary", "soft"])
def test_inpainting_is_diffusers_inpaint_loop(mname):
    """sample(image=, mask=) at strength 1 and 0.6 vs diffusers' inpaint pipeline loop
    (test_inpaint's spatially mixing model) with this scheduler fed the same draws; the kept
    region is the image exactly. A soft mask's partly kept pixels need stage 2's take-back of
    the blend (its z_1 is stage 1's draw, as diffusers' Brownian increment)."""
    from test_inpaint import _diffusers_inpaint, _masks
    from test_inpaint import _model as mixing

    image = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    mask, n = _masks()[mname], 7
    smp = make_sampler("dpm++_sde", NoiseSchedule("scaled_linear"), n)
    for strength in (1.0, 0.6):
        sch = _Fed(**DIFFUSERS_BETAS["scaled_linear"])
        sch.gen, sch.split = torch.Generator().manual_seed(0), smp.noise_split()
        sch.shape = image.shape
        theirs = _diffusers_inpaint("dpm++_sde", sch, image, mask, strength, n, sch.gen)
        ours = fastdiff.sample(mixing, n, sampler="dpm++_sde", schedule="scaled_linear",
                               image=image, mask=mask, strength=strength,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert rel(ours, theirs) <= RTOL, (mname, strength, rel(ours, theirs))
        keep = (mask == 0).expand_as(image)
        assert torch.equal(ours[keep], image[keep])


# ------------------------------------------------------------------------------ loops
@torch.no_grad()
@pytest.mark.parametrize("gen", [True, False], ids=["generator", "philox"])
def test_cuda_graph_loop_equals_eager(gen, fake_cuda_graphs, monkeypatch):
    """sample(cuda_graph=True)'s loop with the fake graph (tests/conftest.py): the eager loop's
    samples and x0 rows, noise from a generator / in-kernel Philox, one capture for two runs;
    stage 2 reads x_i and m_1 from the UniPC-style static buffers (3)."""
    case = GraphCase("dpm++_sde", {"prediction_type": "v_prediction", "use_karras_sigmas": True},
                     runs=((1, 5, gen), (2, 5, gen)), hist=2, noisy=True)  # fmt: skip
    check_graph_loop(case, fake_cuda_graphs, monkeypatch)


def test_no_host_sync_in_the_loop():
    assert_no_host_sync(
        lambda m: fastdiff.sample(m, steps=5, sampler="dpm++_sde", shape=SHAPE[1:],
                                  batch_size=2, use_karras_sigmas=True),
        toy,
    )  # fmt: skip


def test_sample_eta_reaches_the_sampler_and_others_still_refuse_it():
    """sample(eta=...) is k-diffusion's ancestral eta for "dpm++_sde" (0: no noise drawn, the
    run is deterministic); samplers without an eta still refuse it by name."""
    z = _z(19)
    runs = [
        fastdiff.sample(toy, steps=5, sampler="dpm++_sde", noise=z, eta=0.0,
                        generator=torch.Generator().manual_seed(s))
        for s in (1, 2)
    ]  # fmt: skip
    assert torch.equal(runs[0], runs[1])
    smp = make_sampler("dpm++_sde", NoiseSchedule("linear"), 5, eta=0.0)
    assert torch.equal(runs[0], fastdiff.sample(toy, sampler=smp, noise=z))
    assert not any(smp.needs_noise(i) for i in range(smp.steps))
    with pytest.raises(ValueError, match="eta: only the 'ddim' and 'tcd' samplers take eta"):
        fastdiff.sample(toy, steps=5, sampler="dpm2", noise=z, eta=0.5)
