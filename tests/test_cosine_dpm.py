"""CosineDPMSolverSampler ("cosine_dpm++") vs diffusers' CosineDPMSolverMultistepScheduler, and
through sample() (no host sync, the fake CUDA-graph loop and the unknown-option refusal are in
the shared contract: tests/_sampler_cases.py).

diffusers' scheduler draws its SDE noise from torchsde's Brownian tree; the reference runs here
replace its ``noise_sampler`` with the per-step N(0, I) draws fastdiff gets (the same values),
so the runs must agree: relative error <= 1e-5 (max |ours - ref| / max |ref|) against diffusers'
loop run in float64, and <= 1e-5 plus diffusers' own fp32 error against its stock fp32 loop.
Without torchsde installed diffusers exports a stand-in class; the real one is imported with a
placeholder ``torchsde`` module (its Brownian tree is never used here).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from _sampler_cases import rel
from helpers import PARITY_RTOL, assert_fa_rule, backend_cases, case_id, import_without_torchsde

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, CosineDPMSolverSampler, EDMDPMSolverSampler

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL = (2, 3, 6, 5), PARITY_RTOL
STEPS = [1, 2, 5, 12, 25]
CONFIGS = {
    "default": {},
    "order1": {"solver_order": 1},
    "karras": {"sigma_schedule": "karras", "rho": 5.0},
    "eps-heun": {"prediction_type": "epsilon", "solver_type": "heun"},
    "sigma_min": {"final_sigmas_type": "sigma_min", "sigma_min": 0.05, "sigma_data": 0.5},
    "euler_at_final": {"lower_order_final": False, "euler_at_final": True, "sigma_max": 80.0},
}


COS = import_without_torchsde(
    "diffusers.schedulers.scheduling_cosine_dpmsolver_multistep",
    "CosineDPMSolverMultistepScheduler",
)


def ftoy(u: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in model F(c_in X, c_noise) of continuous t in [0, 1)."""
    tt = torch.as_tensor(t, dtype=u.dtype).reshape(-1, *([1] * (u.ndim - 1)))
    return 0.6 * torch.tanh(0.8 * u + 0.1) + 0.5 * torch.sin(3.0 * tt) - 0.2 * tt * u


def _diffusers_loop(opts, n, z, noises, model=ftoy, f64=False, begin=0, x=None):
    """The pipeline loop (init_noise_sigma z, scale_model_input, step) with the SDE noise of
    step i = ``noises[i]``; ``f64``: the same code in float64 (its sigmas cast)."""
    sch = COS(**opts)
    sch.set_timesteps(n)
    if f64:
        sch.sigmas = sch.sigmas.double()
    it = iter(noises[begin:])
    sch.noise_sampler = lambda s, t: next(it).to(torch.float64 if f64 else torch.float32)
    if begin:
        sch.set_begin_index(begin)
    x = z * sch.init_noise_sigma if x is None else x
    x = x.double() if f64 else x
    for t in sch.timesteps[begin:]:
        u = sch.scale_model_input(x, t)
        x = sch.step(model(u, t.to(u.dtype).expand(u.shape[0])), t, x).prev_sample
    return x


def _noises(n, seed, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------ grid
@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("n", [*STEPS, 50])
def test_grid_and_timesteps_are_diffusers(cfg, n):
    sch, smp = COS(**CONFIGS[cfg]), CosineDPMSolverSampler(None, n, **CONFIGS[cfg])
    sch.set_timesteps(n)
    assert smp.timesteps.dtype == torch.float32
    assert torch.equal(smp.timesteps, sch.timesteps)  # atan(sigma) 2 / pi, float32
    assert torch.equal(torch.from_numpy(smp.sigmas).float(), sch.sigmas)
    assert smp.init_noise_scale == pytest.approx(
        sch.init_noise_sigma / math.sqrt(float(sch.sigmas[0]) ** 2 + smp.sigma_data**2), rel=1e-12
    )
    assert len(smp) == n and smp.sde and isinstance(smp, EDMDPMSolverSampler)


# ------------------------------------------------------------------------------ runs
@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("n", STEPS)
def test_run_matches_diffusers_with_the_same_noise(cfg, n):
    """Step by step with diffusers' per-step noise: ours (state u = c_in X; the last step
    returns X) vs diffusers' loop in float64 and its stock fp32 loop."""
    opts = CONFIGS[cfg]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(n))
    noises = _noises(n, 100 + n)
    want = _diffusers_loop(opts, n, z, noises)
    want64 = _diffusers_loop(opts, n, z, noises, f64=True)
    smp = CosineDPMSolverSampler(None, n, **opts)
    u = z * smp.init_noise_scale
    for i, t in enumerate(smp.timesteps):
        u = smp.step(ftoy(u, t.expand(2)), i, u, noise=noises[i])
    assert u.dtype == torch.float32 and torch.isfinite(u).all()
    if not torch.isfinite(want64).all():
        # final sigma_min: diffusers' last sigma (float32(sigma_min)) is an ulp above its grid's
        # exp(log(sigma_min)); its float64 SDE last step takes sqrt(1 - e^{-2h}) of h < 0 (NaN),
        # its fp32 one rounds h to 0. Ours clamps h to 0 (EDMDPMSolverSampler).
        assert cfg == "sigma_min"
        assert rel(u, want) <= RTOL
        return
    assert rel(u, want64) <= RTOL, f"{cfg} {n}: {rel(u, want64):.2e}"
    assert rel(u, want) <= RTOL + rel(want, want64)


@pytest.mark.parametrize("as_config", [False, True], ids=["object", "saved-config"])
@pytest.mark.parametrize("cfg", ["default", "order1", "karras", "eps-heun"])
def test_sample_with_the_scheduler_is_diffusers_loop(cfg, as_config):
    """sample(schedule=<scheduler or its saved config>) infers "cosine_dpm++" with its settings
    (no warning; a saved config also without torchsde, where diffusers exports a stand-in
    class), calls the model at c_in X and atan(sigma) 2 / pi, and with a generator draws x_T then
    one N(0, I) per step: diffusers' loop fed the same draws."""
    opts, n = CONFIGS[cfg], 9
    sch = COS(**opts)
    arg = json.loads(sch.to_json_string()) if as_config else sch
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    seen = []

    def model(u, t):
        seen.append(t.clone())
        return ftoy(u, t)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fastdiff.sample(model, steps=n, schedule=arg, noise=z,
                              generator=torch.Generator().manual_seed(5))  # fmt: skip
    sch.set_timesteps(n)
    assert [float(t[0]) for t in seen] == sch.timesteps.tolist()
    noises = _noises(n, 5)
    want64 = _diffusers_loop(opts, n, z, noises, f64=True)
    assert rel(got, want64) <= RTOL
    # the settings were applied: the default sampler lands elsewhere
    if opts:
        plain = fastdiff.sample(ftoy, steps=n, sampler="cosine_dpm++", noise=z,
                                generator=torch.Generator().manual_seed(5))  # fmt: skip
        assert rel(plain, got) > 1e-3


def test_noise_sources_guidance_and_channels_last():
    """noise from a generator list, in-kernel Philox (reproducible with torch.manual_seed;
    another seed differs), guidance = stepping with the combined output, channels_last x_T."""
    n = 7
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    a = fastdiff.sample(ftoy, steps=n, sampler="cosine_dpm++", noise=z)
    torch.manual_seed(0)
    b = fastdiff.sample(ftoy, steps=n, sampler="cosine_dpm++", noise=z)
    torch.manual_seed(1)
    c = fastdiff.sample(ftoy, steps=n, sampler="cosine_dpm++", noise=z)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert rel(a, c) > 1e-3
    gens = [torch.Generator().manual_seed(k) for k in (3, 4)]
    got = fastdiff.sample(ftoy, steps=n, sampler="cosine_dpm++", noise=z, generator=gens)
    per = [_noises(n, k, (1, *SHAPE[1:])) for k in (3, 4)]  # one generator per sample
    noises = [torch.cat([per[0][i], per[1][i]]) for i in range(n)]
    assert rel(got, _diffusers_loop({}, n, z, noises, f64=True)) <= RTOL
    cl = fastdiff.sample(ftoy, steps=n, sampler="cosine_dpm++",
                         noise=z.contiguous(memory_format=torch.channels_last),
                         generator=[torch.Generator().manual_seed(k) for k in (3, 4)])  # fmt: skip
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, got, rtol=1e-6, atol=1e-6)
    cond, uncond, w = torch.randn(2, 4), torch.randn(2, 4), 3.0

    def cmodel(u, t, encoder_hidden_states=None):
        return ftoy(u, t) + encoder_hidden_states.mean(1).reshape(-1, 1, 1, 1)

    g = torch.Generator().manual_seed(8)
    guided = fastdiff.sample(cmodel, steps=n, sampler="cosine_dpm++", noise=z, cond=cond,
                             uncond=uncond, guidance_scale=w, generator=g)  # fmt: skip
    smp = CosineDPMSolverSampler(None, n)
    u, noises = z * smp.init_noise_scale, _noises(n, 8)
    for i, t in enumerate(smp.timesteps):
        tt = t.expand(2)
        un, co = cmodel(u, tt, uncond), cmodel(u, tt, cond)
        u = smp.step(un + w * (co - un), i, u, noise=noises[i])
    assert rel(guided, u) <= 1e-6


def test_img2img_start_is_diffusers():
    """sample(image=, strength=0.6): diffusers' img2img start (get_timesteps, set_begin_index,
    add_noise = image + sigma z, then a first-order step), the same generator for z and the
    per-step noise."""
    n, strength = 10, 0.6
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)).clamp(-1, 1)
    got = fastdiff.sample(ftoy, steps=n, sampler="cosine_dpm++", image=image, strength=strength,
                          generator=torch.Generator().manual_seed(6))  # fmt: skip
    begin = n - int(n * strength)
    draws = _noises(1 + n - begin, 6)
    sch = COS()
    sch.set_timesteps(n)
    x = image.double() + float(sch.sigmas[begin]) * draws[0].double()
    noises = [None] * begin + draws[1:]
    want64 = _diffusers_loop({}, n, None, noises, f64=True, begin=begin, x=x)
    assert rel(got, want64) <= RTOL
    assert rel(got, fastdiff.sample(ftoy, steps=n, sampler="cosine_dpm++", noise=draws[0])) > 1e-2


@pytest.mark.parametrize("mname", ["binary", "soft"])
def test_inpainting_is_diffusers_inpaint_loop(mname):
    """sample(image=, mask=) at strength 1 and 0.6 vs diffusers' inpaint pipeline loop
    (tests/test_inpaint.py's, spatially mixing model) with this scheduler, its SDE noise drawn
    from the same generator as fastdiff's; the kept region is the image exactly."""
    from test_inpaint import _diffusers_inpaint, _masks
    from test_inpaint import _model as mixing

    image = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    mask, n = _masks()[mname], 10

    class Fed(COS):  # the Brownian tree replaced by draws from the loop's generator
        gen = None

        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self.noise_sampler = lambda s, t: torch.randn(image.shape, generator=self.gen)

    for strength in (1.0, 0.6):
        sch = Fed()
        sch.gen = gen = torch.Generator().manual_seed(0)
        theirs = _diffusers_inpaint("cosine_dpm++", sch, image, mask, strength, n, gen)
        ours = fastdiff.sample(
            mixing,
            n,
            sampler="cosine_dpm++",
            image=image,
            mask=mask,
            strength=strength,
            generator=torch.Generator().manual_seed(0),
        )
        assert rel(ours, theirs) <= RTOL, (mname, strength, rel(ours, theirs))
        keep = (mask == 0).expand_as(image)
        assert torch.equal(ours[keep], image[keep])


# ------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
def test_every_backend_matches_diffusers(case):
    """A guided run at an odd size on each backend of the fused op, with fed noise, equals
    diffusers' loop on the combined output (contiguous and channels_last); fp16: the
    FlashAttention rule against float64, diffusers' own fp16 loop as eager."""
    dev, backend = case
    g = torch.Generator().manual_seed(4)
    shape = (2, 3, 5, 7)
    z = torch.randn(shape, generator=g)
    w = torch.randn(4, *shape[1:], generator=g)
    gs, n = 2.5, 8
    noises = _noises(n, 12, shape)

    def raw(u, t):
        uu = torch.cat([u, u]).float()
        return (torch.tanh(0.4 * uu) + 0.2 * w + torch.sin(3 * t[:1].float())).to(u.dtype)

    def combined(u, t):
        un, co = raw(u, t.expand(u.shape[0])).chunk(2)
        return un + gs * (co - un)

    opts = {"solver_type": "heun"}
    ref = _diffusers_loop(opts, n, z, noises, combined)
    ref64 = _diffusers_loop(opts, n, z, noises, combined, f64=True)
    smp = CosineDPMSolverSampler(None, n, **opts)
    for layout in (torch.contiguous_format, torch.channels_last):
        u = (z * smp.init_noise_scale).to(dev).contiguous(memory_format=layout)
        with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
            for i, t in enumerate(smp.timesteps):
                out = raw(u.cpu(), t.expand(4)).to(dev)
                u = smp.step(out, i, u, noise=noises[i].to(dev), guidance_scale=gs)
        assert u.device.type == dev and u.is_contiguous(memory_format=layout)
        err = rel(u.cpu(), ref)
        assert 0.0 < err <= 2 * RTOL, f"{backend}: rel err {err:.2e}"
    half = _diffusers_loop(opts, n, z.half(), [e.half() for e in noises], combined)
    u = (z * smp.init_noise_scale).half().to(dev)
    with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
        for i, t in enumerate(smp.timesteps):
            u = smp.step(raw(u.cpu(), t.expand(4)).to(dev), i, u, noise=noises[i].to(dev),
                         guidance_scale=gs)  # fmt: skip
    assert u.dtype == torch.float16
    assert_fa_rule(u.cpu(), ref64, half, atol=1e-3, name=f"{backend} fp16")


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("sched", ["exponential", "karras"])
def test_gaussian_data_exact_denoiser_gives_the_chain_law(sched):
    """Gaussian data N(mu, tau^2): with the exact denoiser D(X; sigma) = mu + k (X - mu), k =
    tau^2 / (tau^2 + sigma^2), as the model's preconditioned v output, each first-order SDE step
    X_t = r^2 X + (1 - r^2) D + sigma_t sqrt(1 - r^2) z (r = sigma_t / sigma_s; alpha = 1, e^{-h}
    = r) is linear-Gaussian, so the chain's end law is N(m, v) with m, v from the float64
    recursion m <- a m + b, v <- a^2 v + c^2 (a = r^2 + (1 - r^2) k, b = (1 - r^2)(1 - k) mu,
    c = sigma_t sqrt(1 - r^2)) from X_T ~ N(0, sigma_max^2 + 1). 40k samples: their mean and
    std are within 4 standard errors of it (a wrong noise scale or step weight moves them)."""
    mu, tau, n = 0.3, 0.6, 12
    smp = CosineDPMSolverSampler(None, n, solver_order=1, sigma_schedule=sched)
    sd = smp.sigma_data

    def model(u, t):  # F with D = c_skip X + c_out F, X = u / c_in, at the step's sigma
        sigma = math.tan(float(t[0]) * math.pi / 2)
        x = u.double() * math.sqrt(sigma**2 + sd**2)
        d = mu + tau**2 * (x - mu) / (tau**2 + sigma**2)
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), -sigma * sd / math.sqrt(sigma**2 + sd**2)
        return ((d - c_skip * x) / c_out).float()

    m, v = 0.0, smp.sigma_max**2 + 1.0
    for i in range(n):
        s_s, s_t = float(smp.sigmas[i]), float(smp.sigmas[i + 1])
        r, k = s_t / s_s, tau**2 / (tau**2 + s_s**2)
        a, b, c = r * r + (1 - r * r) * k, (1 - r * r) * (1 - k) * mu, s_t * math.sqrt(1 - r * r)
        m, v = a * m + b, a * a * v + c * c
    torch.manual_seed(0)
    out = fastdiff.sample(model, sampler=smp, shape=(1, 200, 200), batch_size=1).double()
    count, std = out.numel(), math.sqrt(v)
    assert abs(out.mean().item() - m) < 4 * std / math.sqrt(count), (out.mean().item(), m)
    assert abs(out.std().item() - std) < 4 * std / math.sqrt(2 * count), (out.std().item(), std)
    assert std < 0.9 * tau  # the law is not the data's at 12 steps: the check can tell


# ------------------------------------------------------------------------------ refusals
def test_refusals_name_the_argument():
    z = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"solver_order: expected 1 or 2 .* got 3"):
        CosineDPMSolverSampler(None, 5, solver_order=3)
    with pytest.raises(ValueError, match=r"prediction_type: expected one of .* got 'sample'"):
        CosineDPMSolverSampler(None, 5, prediction_type="sample")
    with pytest.raises(TypeError, match=r"schedule: the cosine_dpm\+\+ sampler takes no VP"):
        CosineDPMSolverSampler(NoiseSchedule("linear"), 5)
    with pytest.raises(ValueError, match=r"solver_type: expected one of"):
        CosineDPMSolverSampler(None, 5, solver_type="bh3")
    with pytest.raises(ValueError, match=r"sigma_min, sigma_max: expected sigma_min < sigma_max"):
        CosineDPMSolverSampler(None, 5, sigma_min=600.0)
    with pytest.raises(ValueError, match=r"solver_order: expected 1 or 2 .* got 3"):
        fastdiff.sample(ftoy, steps=5, noise=z, schedule=COS(solver_order=3))
    with pytest.raises(ValueError, match=r"sampler 'cosine_dpm\+\+' needs None or diffusers' Cos"):
        fastdiff.sample(ftoy, steps=5, noise=z, sampler="cosine_dpm++",
                        schedule=diffusers.EDMDPMSolverMultistepScheduler())  # fmt: skip
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(ftoy, steps=5, noise=z, sampler="cosine_dpm++", eta=0.5)
    for opt in ("algorithm_type", "thresholding"):  # not settings of diffusers' scheduler
        with pytest.raises(TypeError, match=rf"unknown option\(s\) \['{opt}'\]"):
            fastdiff.sample(ftoy, steps=5, noise=z, sampler="cosine_dpm++", **{opt: None})
    with pytest.raises(ValueError, match="has no beta schedule"):
        fastdiff.sample(ftoy, steps=5, noise=z, sampler="ddim",
                        schedule=json.loads(COS().to_json_string()))  # fmt: skip
    assert SAMPLERS["cosine_dpm++"] is CosineDPMSolverSampler
